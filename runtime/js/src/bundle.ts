/**
 * A bundle, sealed (runtime/COMPATIBILITY.md S1-S9): the manifest is read once (the bytes checked against the
 * signature are the bytes parsed), every file the runtime reads is a plain, listed name whose bytes match the
 * manifest's sha256 before they reach the engine, and a trained state is used under a trusted key only when it is
 * the exported one or this device's key authenticates it.
 */

import {BundleError, ConfigError} from "./errors.js";
import {checkGraph, type GraphRole} from "./graph.js";
import {isPlainName, MANIFEST_NAME, ortTrainingFiles, parseManifest, STATE_FILE, type Manifest} from "./manifest.js";
import type {BundleStorage, CryptoProvider, DeviceKeyStore} from "./platform.js";
import {decodeState, deviceAuthenticated, encodeState, type Mac, type TrainState} from "./state.js";
import {WordPiece} from "./text.js";

export const SIGNATURE_NAME = "manifest.sig";
export const TRAIN_LOG = "train_log.jsonl";
const MAX_MANIFEST_BYTES = 16 << 20;
const MAX_FILE_BYTES = 2 ** 33;

export interface OpenOptions {
  crypto: CryptoProvider;
  deviceKey: DeviceKeyStore;
  /** PEM of the host's ed25519 public key: only signed content, or content this device authenticated, is used. */
  trustedKey?: string;
  /** Check every listed file now (default); false defers each check to the file's first read. */
  verify?: boolean;
}

export interface GraphFiles {
  inputName: string;
  trainStep: string;
  forward: string;
  /** trainStep is the accumulating step (micro-batches: `PortableEngine.accumulate`) */
  accumulates: boolean;
}

/** The accumulating step's extra inputs (its extra output is `grad_sum.new`). */
export const GRAD_SUM = "grad_sum", GRAD_SHARE = "grad_share";

export class Bundle {
  private constructor(readonly storage: BundleStorage, readonly manifest: Manifest, readonly crypto: CryptoProvider,
                      readonly deviceKey: DeviceKeyStore, readonly trusted: boolean) {}

  static async open(storage: BundleStorage, options: OpenOptions): Promise<Bundle> {
    const raw = await storage.read(MANIFEST_NAME, MAX_MANIFEST_BYTES);
    if (raw === null) {
      throw new BundleError(`${storage.location} has no ${MANIFEST_NAME}: it is not an edgeadapt bundle; create one ` +
        "with `edgeadapt export`.");
    }
    if (options.trustedKey !== undefined) await verifySignature(storage, raw, options.trustedKey, options.crypto);
    let text: string;
    try {
      text = new TextDecoder("utf-8", {fatal: true}).decode(raw);
    } catch {
      throw new BundleError(`${storage.location}/${MANIFEST_NAME} is not UTF-8 text; re-export the bundle.`);
    }
    const manifest = parseManifest(text, `${storage.location}/${MANIFEST_NAME}`);
    const bundle = new Bundle(storage, manifest, options.crypto, options.deviceKey, options.trustedKey !== undefined);
    if (options.verify ?? true) await bundle.verify();
    return bundle;
  }

  get location(): string {
    return this.storage.location;
  }

  /** Ties state files to this bundle's training step. */
  get bundleId(): string {
    return this.manifest.files[this.manifest.portable.train_step].slice(0, 16);
  }

  /** The whole graph's files, or (split) the suffix's; `accumulating`: the accumulating step as the training step. */
  graphs(split = false, accumulating = false): GraphFiles {
    const m = this.manifest, p = m.portable;
    if (accumulating && !p.accumulating_step) {
      throw new ConfigError(`${this.location} was exported before gradient accumulation (edgeadapt < 0.4) and has ` +
        "no accumulating step: train without accumulate or re-export the bundle.");
    }
    const prefix = split && m.split ? m.split.suffix_prefix : "";
    return {inputName: split && m.split ? m.split.boundary : m.input.name,
      trainStep: prefix + (accumulating ? p.accumulating_step : p.train_step), forward: prefix + p.forward,
      accumulates: accumulating};
  }

  /** Every listed file is present and matches its sha256 (graphs: and their checks); the state is usable. ONNX
   * Runtime training's artifacts may be absent (a bundle packed for apps); present, they are checked too. */
  async verify(): Promise<void> {
    const optional = new Set(ortTrainingFiles(this.manifest));
    for (const name of Object.keys(this.manifest.files).sort()) {
      if (name === STATE_FILE) await this.loadState();
      else if (optional.has(name)) await this.readOptional(name);
      else if (name.endsWith(".onnx")) await this.readGraph(name);
      else await this.read(name);
    }
  }

  private async readOptional(name: string): Promise<void> {
    const data = await this.storage.read(name, this.manifest.sizes[name] ?? MAX_FILE_BYTES);
    if (data === null) return;
    await this.checkHash(name, data);
    if (name.endsWith(".onnx")) checkGraph(`${this.location}/${name}`, data, null, this.manifest);
  }

  private async readPlain(name: string, limit: number): Promise<Uint8Array> {
    if (!isPlainName(name)) {
      throw new BundleError(`'${name}' is not a plain file name inside ${this.location}; re-export the bundle.`);
    }
    const data = await this.storage.read(name, limit);
    if (data === null) {
      throw new BundleError(`bundle ${this.location} misses ${name}; re-export it or copy the whole bundle again.`);
    }
    return data;
  }

  /** An exported file's bytes, verified against the manifest's sha256. */
  async read(name: string): Promise<Uint8Array> {
    const expected = this.manifest.files[name];
    if (expected === undefined) {
      throw new BundleError(`${name} is not listed in ${this.location}/${MANIFEST_NAME}; re-export the bundle.`);
    }
    const data = await this.readPlain(name, this.manifest.sizes[name] ?? MAX_FILE_BYTES);
    await this.checkHash(name, data);
    return data;
  }

  private async checkHash(name: string, data: Uint8Array): Promise<void> {
    if (await this.crypto.sha256(data) !== this.manifest.files[name]) {
      throw new BundleError(`${this.location}/${name} does not match the sha256 in manifest.json: it was modified or ` +
        "corrupted; re-export the bundle or copy it again.");
    }
  }

  /** A graph's verified bytes, refused if it keeps data outside itself or (portable graphs) needs what the runtime
   * does not feed. */
  async readGraph(name: string): Promise<Uint8Array> {
    const data = await this.read(name);
    checkGraph(`${this.location}/${name}`, data, this.graphRoles().get(name) ?? null, this.manifest);
    return data;
  }

  /** Per portable graph, the inputs the runtime feeds it and whether it gives the logits. */
  private graphRoles(): Map<string, GraphRole> {
    const m = this.manifest, p = m.portable;
    const stats = p.statistics.length ? ["bn_stats"] : [];
    const roles = new Map<string, GraphRole>();
    const role = (name: string, inputs: string[], logits: boolean) => roles.set(name, {inputs: new Set(inputs), logits});
    if (p.statistics_graph) role(p.statistics_graph, [m.input.name, "params"], false);
    const targets: [string, string][] = [["", m.input.name]];
    if (m.split) targets.push([m.split.suffix_prefix, m.split.boundary]);
    for (const [prefix, input] of targets) {
      role(prefix + p.train_step, [input, "labels", "lr", "step", ...p.state, ...stats], true);
      if (p.accumulating_step) {
        role(prefix + p.accumulating_step, [input, "labels", "lr", "step", ...p.state, ...stats, GRAD_SUM, GRAD_SHARE],
          true);
      }
      role(prefix + p.forward, [input, "params", ...stats], true);
    }
    if (m.split) role(m.split.prefix_model, [m.input.name, ...stats], false);
    const lora = m.raw.lora as {merged_forward?: string} | null | undefined;
    if (lora?.merged_forward) role(lora.merged_forward, [m.input.name, "params", ...stats], true);
    return roles;
  }

  stateLimit(): number {
    const p = this.manifest.portable;
    return 64 * p.layout.reduce((n, t) => n + t.size, 0) + 4 * p.statistics.reduce((n, t) => n + t.size, 0) +
      (64 << 20);
  }

  /** The state file's bytes, read once: a consistent snapshot even while a trainer replaces it. */
  stateBytes(): Promise<Uint8Array> {
    return this.readPlain(STATE_FILE, this.stateLimit());
  }

  /** The trained state: the exported one, or one this device wrote; anything else only without a trusted key. */
  async loadState(): Promise<TrainState> {
    const data = await this.stateBytes();
    if (this.trusted && await this.crypto.sha256(data) !== this.manifest.files[STATE_FILE] &&
        !await deviceAuthenticated(data, this.bundleId, await this.verifier())) {
      throw new BundleError(`${this.location}/${STATE_FILE} is neither the exported state nor one this device ` +
        "trained (no valid device authentication); under --trusted-key it is refused: copy the bundle again from " +
        "its publisher.");
    }
    return decodeState(data, this.manifest, this.bundleId, `${this.location}/${STATE_FILE}`);
  }

  /** Atomically replace the state file, authenticated by this device. */
  async saveState(state: TrainState): Promise<void> {
    await this.storage.replace(STATE_FILE, await encodeState(state, this.manifest, this.bundleId,
      await this.deviceMac()));
  }

  /** The bundle's WordPiece tokenizer (text bundles), over its verified vocabulary. */
  async tokenizer(): Promise<WordPiece> {
    const spec = this.manifest.input.tokens;
    if (!spec) throw new ConfigError(`the bundle takes ${this.manifest.input.layout} inputs, not text.`);
    const text = new TextDecoder("utf-8", {fatal: true}).decode(await this.read(spec.vocab_file));
    return WordPiece.fromText(text, spec);
  }

  /** This device's MAC (its key created on first use): what authenticates the state and cached features. */
  async deviceMac(): Promise<Mac> {
    const key = await this.deviceKey.getOrCreate();
    return (parts) => this.crypto.hmacSha256(key, parts);
  }

  private async verifier(): Promise<Mac> {
    const key = await this.deviceKey.get();
    return key ? (parts) => this.crypto.hmacSha256(key, parts) : async () => "";
  }
}

async function verifySignature(storage: BundleStorage, manifest: Uint8Array, publicKey: string,
                               crypto: CryptoProvider): Promise<void> {
  const signature = await storage.read(SIGNATURE_NAME, 4096);
  if (signature === null) {
    throw new BundleError(`bundle ${storage.location} is not signed but a trusted key was given; ask its publisher ` +
      "for a signed bundle (`edgeadapt export --sign KEY`).");
  }
  let valid = false;
  try {
    const text = new TextDecoder("ascii", {fatal: true}).decode(signature).trim();
    if (!/^[A-Za-z0-9+/]+={0,2}$/.test(text)) throw new Error("not base64");
    valid = await crypto.verifyEd25519(publicKey, Uint8Array.from(atob(text), (c) => c.charCodeAt(0)), manifest);
  } catch (error) {
    if (error instanceof DOMException && error.name === "DataError") {
      throw new BundleError("the trusted key is not an ed25519 public key (PEM); create one with `edgeadapt keygen`.");
    }
    valid = false;
  }
  if (!valid) {
    throw new BundleError(`bundle ${storage.location} has a signature that does not match the trusted key: it was ` +
      "modified or signed by someone else; do not use it.");
  }
}
