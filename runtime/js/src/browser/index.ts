/**
 * The browser's platform adapter: a bundle installed from a URL into the origin private file system (OPFS), state
 * commits through `createWritable` (written to a swap file, swapped in on `close`: readers see the old or the new
 * state), the training lock from the Web Locks API, the device key in IndexedDB (never in the bundle, never sent
 * anywhere), a split bundle's prefix features cached in IndexedDB, and images decoded by the browser into the RGBA
 * pixels the core prepares. Nothing is uploaded: the only network reads are the bundle's own files, from the URL the
 * app gives.
 */

import {Bundle, SIGNATURE_NAME} from "../bundle.js";
import {BundleError} from "../errors.js";
import type {Pixels} from "../image.js";
import {isPlainName, MANIFEST_NAME, ortTrainingFiles, parseManifest, STATE_FILE} from "../manifest.js";
import type {FeatureEntry, FeatureStore} from "../feature_cache.js";
import {webCrypto, type BundleStorage, type DeviceKeyStore} from "../platform.js";

export class OpfsStorage implements BundleStorage {
  private constructor(private readonly dir: FileSystemDirectoryHandle, readonly location: string) {}

  /** The OPFS folder `edgeadapt/<name>` (created when absent). */
  static async open(name: string): Promise<OpfsStorage> {
    if (!isPlainName(name)) throw new BundleError(`'${name}' is not a plain bundle name; use letters, digits, - and _.`);
    const root = await navigator.storage.getDirectory();
    const home = await root.getDirectoryHandle("edgeadapt", {create: true});
    return new OpfsStorage(await home.getDirectoryHandle(name, {create: true}), `opfs:edgeadapt/${name}`);
  }

  async read(name: string, limit: number): Promise<Uint8Array | null> {
    let file: File;
    try {
      file = await (await this.dir.getFileHandle(name)).getFile();
    } catch (error) {
      if ((error as DOMException).name === "NotFoundError") return null;
      throw new BundleError(`${this.location}/${name} cannot be read (${(error as DOMException).name}).`);
    }
    if (file.size > limit) {
      throw new BundleError(`${this.location}/${name} has ${file.size} bytes, more than the ${limit} it may have; ` +
        "install the bundle again.");
    }
    return new Uint8Array(await file.arrayBuffer());
  }

  async replace(name: string, data: Uint8Array): Promise<void> {
    const writable = await (await this.dir.getFileHandle(name, {create: true})).createWritable();
    try {
      await writable.write(data as BufferSource);
      await writable.close(); // the commit: the swap file replaces the file
    } catch (error) {
      await writable.abort().catch(() => undefined);
      throw error;
    }
  }

  async append(name: string, text: string): Promise<void> {
    const handle = await this.dir.getFileHandle(name, {create: true});
    const size = (await handle.getFile()).size;
    const writable = await handle.createWritable({keepExistingData: true});
    await writable.seek(size);
    await writable.write(text);
    await writable.close();
  }

  async lock(): Promise<() => Promise<void>> {
    let release!: () => void;
    const held = new Promise<void>((resolve) => { release = resolve; });
    const granted = await new Promise<boolean>((resolve) => {
      navigator.locks.request(`edgeadapt:${this.location}`, {ifAvailable: true}, async (lock) => {
        resolve(lock !== null);
        if (lock) await held;
      });
    });
    if (!granted) throw new BundleError(`${this.location} is being trained in another tab or worker; wait for it.`);
    return async () => release();
  }

  async has(name: string): Promise<boolean> {
    return (await this.read(name, Number.MAX_SAFE_INTEGER).catch(() => null)) !== null;
  }

  async remove(name: string): Promise<void> {
    await this.dir.removeEntry(name).catch((error: DOMException) => {
      if (error.name !== "NotFoundError") throw error;
    });
  }
}

function idbRequest<T>(request: IDBRequest<T>): Promise<T> {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

/** The device key in this origin's IndexedDB (`edgeadapt` / `keys` / `device`). */
export class IndexedDbDeviceKey implements DeviceKeyStore {
  private async store(mode: IDBTransactionMode): Promise<IDBObjectStore> {
    const open = indexedDB.open("edgeadapt", 1);
    open.onupgradeneeded = () => open.result.createObjectStore("keys");
    const db = await idbRequest(open);
    return db.transaction("keys", mode).objectStore("keys");
  }

  async get(): Promise<Uint8Array | null> {
    const value = await idbRequest((await this.store("readonly")).get("device"));
    return value instanceof Uint8Array && value.length === 32 ? value : null;
  }

  async getOrCreate(): Promise<Uint8Array> {
    const existing = await this.get();
    if (existing) return existing;
    const key = crypto.getRandomValues(new Uint8Array(32));
    await idbRequest((await this.store("readwrite")).add(key, "device")).catch(() => undefined); // a race: theirs
    return (await this.get())!;
  }
}

/**
 * A bundle's prefix features in this origin's IndexedDB (database `edgeadapt-features-<name>`, one record per sample:
 * `[namespace, key]` → features and MAC), for `TrainConfig.featureStore`: a reload trains without rerunning the
 * prefix over the photos it has already seen.
 */
export class IndexedDbFeatureStore implements FeatureStore {
  constructor(private readonly name: string) {
    if (!isPlainName(name)) throw new BundleError(`'${name}' is not a plain bundle name; use letters, digits, - and _.`);
  }

  private async store(mode: IDBTransactionMode): Promise<IDBObjectStore> {
    const open = indexedDB.open(`edgeadapt-features-${this.name}`, 1);
    open.onupgradeneeded = () => open.result.createObjectStore("features");
    const db = await idbRequest(open);
    return db.transaction("features", mode).objectStore("features");
  }

  async use(space: string): Promise<void> {
    // keys are [space, key] with string keys: all of one space lie between [space] and [space, []]
    const store = await this.store("readwrite");
    await idbRequest(store.delete(IDBKeyRange.upperBound([space], true)));
    await idbRequest(store.delete(IDBKeyRange.lowerBound([space, []], true)));
  }

  async get(space: string, keys: string[]): Promise<(FeatureEntry | null)[]> {
    const store = await this.store("readonly");
    const values = await Promise.all(keys.map((key) => idbRequest(store.get([space, key]))));
    return values.map((v) => (v && v.features instanceof Float32Array && typeof v.mac === "string" ? v : null));
  }

  async put(space: string, entries: [string, FeatureEntry][]): Promise<void> {
    const store = await this.store("readwrite");
    await Promise.all(entries.map(([key, entry]) => idbRequest(store.put(entry, [space, key]))));
  }
}

async function fetchBytes(url: string, limit: number): Promise<Uint8Array | null> {
  const response = await fetch(url, {cache: "no-store", credentials: "same-origin"});
  if (response.status === 404) return null;
  if (!response.ok) throw new BundleError(`${url} cannot be fetched (HTTP ${response.status}); check the bundle URL.`);
  const bytes = new Uint8Array(await response.arrayBuffer());
  if (bytes.byteLength > limit) throw new BundleError(`${url} is larger than the manifest allows; the bundle is damaged.`);
  return bytes;
}

/**
 * Install the bundle at `url` (a folder URL holding manifest.json) into OPFS as `name` and open it. Files already
 * installed with the same manifest are kept, and so is the state this device trained: a reload continues from it.
 */
export async function installBundle(url: string, name: string,
                                    options: {trustedKey?: string} = {}): Promise<Bundle> {
  const base = url.endsWith("/") ? url : `${url}/`;
  const storage = await OpfsStorage.open(name);
  const manifestBytes = await fetchBytes(base + MANIFEST_NAME, 16 << 20);
  if (!manifestBytes) throw new BundleError(`${base} has no ${MANIFEST_NAME}: it is not an edgeadapt bundle.`);
  const installed = await storage.read(MANIFEST_NAME, 16 << 20);
  const same = installed !== null && installed.length === manifestBytes.length && installed.every((b, i) => b === manifestBytes[i]);
  const manifest = parseManifest(new TextDecoder().decode(manifestBytes), base + MANIFEST_NAME);
  if (!same) {
    const unread = new Set(ortTrainingFiles(manifest)); // ONNX Runtime training's artifacts: no app reads them
    for (const file of unread) await storage.remove(file); // an earlier install's would fail verification
    for (const file of Object.keys(manifest.files).filter((name) => !unread.has(name))) {
      const bytes = await fetchBytes(base + file, manifest.sizes[file] ?? 2 ** 33);
      if (!bytes) throw new BundleError(`${base}${file} is missing; the bundle on the server is incomplete.`);
      await storage.replace(file, bytes);
    }
    const signature = await fetchBytes(base + SIGNATURE_NAME, 4096);
    if (signature) await storage.replace(SIGNATURE_NAME, signature);
    await storage.replace(MANIFEST_NAME, manifestBytes); // last: a half-installed bundle is installed again
  } else if (!await storage.has(STATE_FILE)) {
    const state = await fetchBytes(base + STATE_FILE, manifest.sizes[STATE_FILE] ?? 2 ** 33);
    if (state) await storage.replace(STATE_FILE, state);
  }
  return Bundle.open(storage, {crypto: webCrypto(), deviceKey: new IndexedDbDeviceKey(), trustedKey: options.trustedKey});
}

/** A bundle already in OPFS (installed earlier), opened and verified. */
export async function openInstalled(name: string, options: {trustedKey?: string} = {}): Promise<Bundle> {
  return Bundle.open(await OpfsStorage.open(name), {crypto: webCrypto(), deviceKey: new IndexedDbDeviceKey(),
    trustedKey: options.trustedKey});
}

/** RGBA pixels of an image (a File/Blob, an ImageBitmap, an ImageData or a canvas), as the file holds them: no
 * colour-space conversion, no premultiplied alpha. */
export async function imagePixels(source: Blob | ImageBitmap | ImageData | HTMLCanvasElement | OffscreenCanvas): Promise<Pixels> {
  if (typeof ImageData !== "undefined" && source instanceof ImageData) {
    return {width: source.width, height: source.height, data: source.data};
  }
  const bitmap = source instanceof Blob
    ? await createImageBitmap(source, {colorSpaceConversion: "none", premultiplyAlpha: "none"})
    : source;
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const context = canvas.getContext("2d", {willReadFrequently: true})!;
  context.drawImage(bitmap as CanvasImageSource, 0, 0);
  const data = context.getImageData(0, 0, bitmap.width, bitmap.height).data;
  return {width: bitmap.width, height: bitmap.height, data};
}
