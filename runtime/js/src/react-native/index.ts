/**
 * React Native's platform adapter: the same core over the app's own file-system module (react-native-fs,
 * expo-file-system or any with these calls), a key store for the device key (the app's secure storage), and a
 * WebCrypto-compatible `crypto` (react-native-quick-crypto) or any CryptoProvider. Commits are write-temp-then-move:
 * a crash leaves the old or the new state. Not run here (no device or simulator); type-checked in the tests against
 * onnxruntime-react-native's types.
 */

import {Bundle} from "../bundle.js";
import {BundleError, TrainingError} from "../errors.js";
import type {BundleStorage, CryptoProvider, DeviceKeyStore} from "../platform.js";

/** The calls the adapter needs from the app's file-system module (react-native-fs names them so). */
export interface NativeFileSystem {
  exists(path: string): Promise<boolean>;
  stat(path: string): Promise<{size: number | string; isFile(): boolean}>;
  readFile(path: string, encoding: "base64"): Promise<string>;
  writeFile(path: string, contents: string, encoding: "base64"): Promise<void>;
  appendFile(path: string, contents: string, encoding: "utf8"): Promise<void>;
  moveFile(from: string, to: string): Promise<void>;
  unlink(path: string): Promise<void>;
}

/** The app's secure key-value storage (e.g. expo-secure-store's getItemAsync/setItemAsync, wrapped). */
export interface SecureStore {
  getItem(key: string): Promise<string | null>;
  setItem(key: string, value: string): Promise<void>;
}

const toBase64 = (bytes: Uint8Array): string => {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
};
const fromBase64 = (text: string): Uint8Array => Uint8Array.from(atob(text), (c) => c.charCodeAt(0));

export class NativeStorage implements BundleStorage {
  private locked = false;

  constructor(private readonly fs: NativeFileSystem, readonly location: string) {}

  private path(name: string): string {
    return `${this.location}/${name}`;
  }

  async read(name: string, limit: number): Promise<Uint8Array | null> {
    if (!await this.fs.exists(this.path(name))) return null;
    const info = await this.fs.stat(this.path(name));
    if (!info.isFile()) throw new BundleError(`${this.path(name)} is not a regular file; copy the bundle again.`);
    if (Number(info.size) > limit) {
      throw new BundleError(`${this.path(name)} has ${info.size} bytes, more than the ${limit} it may have; copy the bundle again.`);
    }
    return fromBase64(await this.fs.readFile(this.path(name), "base64"));
  }

  async replace(name: string, data: Uint8Array): Promise<void> {
    const temp = this.path(`.${name}.tmp-rn`);
    await this.fs.writeFile(temp, toBase64(data), "base64");
    if (await this.fs.exists(this.path(name))) await this.fs.unlink(this.path(name));
    await this.fs.moveFile(temp, this.path(name));
  }

  async append(name: string, text: string): Promise<void> {
    await this.fs.appendFile(this.path(name), text, "utf8");
  }

  /** One trainer per bundle within the app (an app process is the only writer of its files). */
  async lock(): Promise<() => Promise<void>> {
    if (this.locked) throw new TrainingError(`${this.location} is being trained already; wait for it to finish.`);
    this.locked = true;
    return async () => { this.locked = false; };
  }
}

export class SecureDeviceKey implements DeviceKeyStore {
  constructor(private readonly store: SecureStore, private readonly random: (count: number) => Uint8Array) {}

  async get(): Promise<Uint8Array | null> {
    const text = await this.store.getItem("edgeadapt.device_key");
    return text && /^[0-9a-f]{64}$/.test(text) ? Uint8Array.from(text.match(/../g)!, (h) => parseInt(h, 16)) : null;
  }

  async getOrCreate(): Promise<Uint8Array> {
    const existing = await this.get();
    if (existing) return existing;
    const key = this.random(32);
    await this.store.setItem("edgeadapt.device_key", Array.from(key, (b) => b.toString(16).padStart(2, "0")).join(""));
    return key;
  }
}

/** Open a bundle folder of the app's storage. */
export function openNativeBundle(folder: string, platform: {fs: NativeFileSystem; secureStore: SecureStore;
                                   crypto: CryptoProvider; trustedKey?: string}): Promise<Bundle> {
  return Bundle.open(new NativeStorage(platform.fs, folder), {crypto: platform.crypto,
    deviceKey: new SecureDeviceKey(platform.secureStore, (n) => platform.crypto.randomBytes(n)),
    trustedKey: platform.trustedKey});
}
