/**
 * What the core needs from the platform, injected by a small adapter (Node, browser, React Native): the bundle's
 * storage, cryptography, and the device key. The core never touches a file system, `fetch` or a global engine.
 */

export interface BundleStorage {
  /** Where the bundle is, for messages. */
  readonly location: string;
  /** The bytes of a plain file of the bundle (no links, regular files only), at most `limit`; null when absent. */
  read(name: string, limit: number): Promise<Uint8Array | null>;
  /** Replace a file atomically: readers see the old or the new bytes, a crash leaves one of them. */
  replace(name: string, data: Uint8Array): Promise<void>;
  /** Append text to a file, durably (the training log). */
  append(name: string, text: string): Promise<void>;
  /** The training lock: one trainer per bundle; resolves to a release function. */
  lock(): Promise<() => Promise<void>>;
  /** Remove what a killed writer left behind (temporary files); called under the lock. */
  sweep?(): Promise<void>;
}

export interface CryptoProvider {
  sha256(data: Uint8Array): Promise<string>;
  hmacSha256(key: Uint8Array, parts: Uint8Array[]): Promise<string>;
  /** Whether `signature` is `publicKey`'s ed25519 signature of `message` (`publicKey`: PEM SubjectPublicKeyInfo). */
  verifyEd25519(publicKeyPem: string, signature: Uint8Array, message: Uint8Array): Promise<boolean>;
  randomBytes(count: number): Uint8Array;
}

/** The device key (32 bytes, never inside a bundle) that authenticates what this device trained. */
export interface DeviceKeyStore {
  /** The key, or null when this device has none yet. */
  get(): Promise<Uint8Array | null>;
  /** The key, created on first use. */
  getOrCreate(): Promise<Uint8Array>;
}

const hex = (bytes: ArrayBuffer): string =>
  Array.from(new Uint8Array(bytes), (b) => b.toString(16).padStart(2, "0")).join("");

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.byteLength, 0));
  let offset = 0;
  for (const part of parts) {
    out.set(part, offset);
    offset += part.byteLength;
  }
  return out;
}

function pemBody(pem: string): Uint8Array {
  const base64 = pem.replace(/-----[^-]+-----/g, "").replace(/\s+/g, "");
  return Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
}

/** WebCrypto (browsers, Node 18+, Deno); React Native apps inject their own provider. */
export function webCrypto(crypto: Crypto = globalThis.crypto): CryptoProvider {
  const subtle = crypto.subtle;
  return {
    async sha256(data) {
      return hex(await subtle.digest("SHA-256", data as BufferSource));
    },
    async hmacSha256(key, parts) {
      const imported = await subtle.importKey("raw", key as BufferSource, {name: "HMAC", hash: "SHA-256"}, false,
        ["sign"]);
      return hex(await subtle.sign("HMAC", imported, concat(parts) as BufferSource));
    },
    async verifyEd25519(publicKeyPem, signature, message) {
      const key = await subtle.importKey("spki", pemBody(publicKeyPem) as BufferSource, {name: "Ed25519"}, false,
        ["verify"]);
      return subtle.verify({name: "Ed25519"}, key, signature as BufferSource, message as BufferSource);
    },
    randomBytes(count) {
      return crypto.getRandomValues(new Uint8Array(count));
    },
  };
}

export {concat};
