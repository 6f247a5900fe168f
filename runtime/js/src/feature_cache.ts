/**
 * Prefix features kept between runs by the platform's FeatureStore (the browser's IndexedDB), so only the first run
 * pays for a split bundle's frozen prefix. Keys: each sample's content hash, within a namespace derived from the
 * prefix graph's sha256, the BN statistics, the input spec and the execution providers (another engine gives other
 * features). Every entry carries this device's MAC over the namespace, the key and the features: one that does not
 * verify (damaged, planted, another device's) is a miss, and is recomputed. A store keeps one namespace per bundle.
 */

import type {Bundle} from "./bundle.js";
import type {Dataset} from "./data.js";
import {concat} from "./platform.js";
import {sealParts, type Mac} from "./state.js";

export interface FeatureEntry {
  features: Float32Array;
  mac: string;
}

export interface FeatureStore {
  /** Make `space` the one namespace kept: entries of any other are deleted. */
  use(space: string): Promise<void>;
  /** The entries of `keys` in `space`, null where absent. */
  get(space: string, keys: string[]): Promise<(FeatureEntry | null)[]>;
  put(space: string, entries: [string, FeatureEntry][]): Promise<void>;
}

const text = (value: string) => new TextEncoder().encode(value);
const bytesOf = (a: Float32Array | Uint8Array) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

export async function featureSpace(bundle: Bundle, statistics: Float32Array | null,
                                   providers: string[]): Promise<string> {
  const m = bundle.manifest;
  const material = JSON.stringify({prefix: m.files[m.split!.prefix_model], input: m.input, providers,
    statistics: statistics ? await bundle.crypto.sha256(bytesOf(statistics)) : null});
  return (await bundle.crypto.sha256(text(material))).slice(0, 20);
}

export async function sampleKeys(bundle: Bundle, data: Dataset): Promise<string[]> {
  const n = data.names.length, width = data.samples.length / Math.max(n, 1);
  return Promise.all(Array.from({length: n}, (_, i) =>
    bundle.crypto.sha256(bytesOf(data.samples.subarray(i * width, (i + 1) * width)))));
}

export class SealedFeatures {
  notes: string[] = [];

  constructor(private readonly store: FeatureStore, private readonly space: string, private readonly bundleId: string,
              private readonly mac: Mac) {}

  private tag(key: string, features: Float32Array): Promise<string> {
    return this.mac(sealParts("feature_cache", this.bundleId, [concat([text(`${this.space}\0${key}\0`),
      bytesOf(features)])]));
  }

  /** The authenticated features of `keys` (null: absent, the wrong width, or not authenticated by this device). */
  async get(keys: string[], width: number): Promise<(Float32Array | null)[]> {
    await this.store.use(this.space);
    const entries = await this.store.get(this.space, keys);
    let rejected = 0;
    const out = await Promise.all(entries.map(async (entry, i) => {
      if (entry === null) return null;
      if (entry.features.length === width && entry.mac === await this.tag(keys[i], entry.features)) {
        return entry.features;
      }
      rejected++;
      return null;
    }));
    const hits = out.filter((f) => f !== null).length;
    this.notes.push(`feature cache: ${hits} of ${keys.length} samples' prefix features reused` +
      (rejected ? `; ${rejected} not authenticated by this device, recomputed` : ""));
    return out;
  }

  async put(entries: [string, Float32Array][]): Promise<void> {
    if (!entries.length) return;
    await this.store.put(this.space, await Promise.all(entries.map(async ([key, features]) =>
      [key, {features, mac: await this.tag(key, features)}] as [string, FeatureEntry])));
  }
}
