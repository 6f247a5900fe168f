/**
 * `state.safetensors`, the single source of the trained state (runtime/COMPATIBILITY.md rule 7), as the Python
 * runtime's `runtime/state.py` reads and writes it: `params/<name>` per trainable tensor, `optimizer/<key>`,
 * `statistics/<name>`, `best/<name>`, the progress as JSON in the metadata, and the device's HMAC
 * (`edgeadapt.device_mac`) over the file as it would be without that entry.
 */

import {BundleError, TrainingError} from "./errors.js";
import type {Manifest, TensorLayout} from "./manifest.js";
import {pyDumps, pyLoads, type Json} from "./pyjson.js";
import {asFloat32, decode, encode, f32Tensor, header, type RawTensor} from "./safetensors.js";

export const MAC_KEY = "edgeadapt.device_mac";
const PROGRESS_FLOATS = new Set(["lr_scale", "best_metric", "time", "lr", "train_loss", "train_accuracy", "val_loss",
  "val_accuracy", "seconds"]);

/** One epoch's results (what `onEpoch` reports). */
export interface EpochRecord {
  epoch: number;
  step: number;
  lr: number;
  train_loss: number;
  train_accuracy: number | null;
  val_loss: number | null;
  val_accuracy: number | null;
  seconds: number;
}

/** An epoch's line in the progress and the training log: the record, when, and on what it ran. */
export interface EpochLine extends EpochRecord {
  time: number;
  engine: string;
  device: string;
  split: boolean;
  run: string;
}

/** Where a run stands (the Python runtime's `Progress`, field for field and in its order). */
export interface Progress {
  bundle_id: string;
  run_config: string;
  epoch: number;
  batch: number;
  step: number;
  lr_scale: number;
  best_metric: number;
  best_epoch: number;
  bad_epochs: number;
  nan_events: number;
  finished: number;
  run_id: string;
  records: EpochLine[];
}

export function newProgress(bundleId: string, runConfig: string, runId: string): Progress {
  return {bundle_id: bundleId, run_config: runConfig, epoch: 0, batch: 0, step: 0, lr_scale: 1.0,
    best_metric: -Infinity, best_epoch: -1, bad_epochs: 0, nan_events: 0, finished: 0, run_id: runId, records: []};
}

export interface TrainState {
  params: Float32Array;
  optimizer: Map<string, RawTensor>;
  progress: Progress | null;
  statistics: Float32Array | null;
  best: Float32Array | null;
}

/** A fresh state (no optimizer, no progress) with `params` (default: these) and these statistics. */
export function carried(state: TrainState, params?: Float32Array): TrainState {
  return {params: params ?? state.params, optimizer: new Map(), progress: null, statistics: state.statistics,
    best: null};
}

function named(vector: Float32Array, layout: TensorLayout[], group: string, into: Map<string, RawTensor>): void {
  for (const p of layout) into.set(`${group}/${p.name}`, f32Tensor(vector.subarray(p.offset, p.offset + p.size), p.shape));
}

/** The tensors and metadata of a state file, in the Python runtime's order. */
function contents(state: TrainState, manifest: Manifest, bundleId: string) {
  const tensors = new Map<string, RawTensor>();
  named(state.params, manifest.portable.layout, "params", tensors);
  for (const [key, value] of state.optimizer) tensors.set(`optimizer/${key}`, value);
  if (state.statistics) named(state.statistics, manifest.portable.statistics, "statistics", tensors);
  if (state.best) named(state.best, manifest.portable.layout, "best", tensors);
  const metadata: Record<string, string> = {"edgeadapt.bundle_id": bundleId, format: "pt"};
  if (state.progress) {
    metadata["edgeadapt.progress"] = pyDumps(state.progress as unknown as Json, {floatKeys: PROGRESS_FLOATS});
  }
  return {tensors, metadata};
}

const PREFIX = new TextEncoder().encode("edgeadapt-device-seal\0");

/** The byte strings the device MAC covers: its domain, kind and bundle id, then the content. */
export function sealParts(kind: string, bundleId: string, content: Uint8Array[]): Uint8Array[] {
  return [PREFIX, new TextEncoder().encode(`${kind}\0${bundleId}\0`), ...content];
}

export type Mac = (parts: Uint8Array[]) => Promise<string>;

/** The state file's bytes; with `mac` (the device seal), authenticated by this device. */
export async function encodeState(state: TrainState, manifest: Manifest, bundleId: string,
                                  mac?: Mac): Promise<Uint8Array> {
  const {tensors, metadata} = contents(state, manifest, bundleId);
  if (mac) {
    const bodies = [...tensors.values()].map((t) => t.bytes);
    metadata[MAC_KEY] = await mac(sealParts("state", bundleId, [header(tensors, metadata), ...bodies]));
  }
  return encode(header(tensors, metadata), tensors);
}

/** Whether `data` carries a valid MAC of this device (`mac` recomputes it). */
export async function deviceAuthenticated(data: Uint8Array, bundleId: string, mac: Mac): Promise<boolean> {
  let decoded;
  try {
    decoded = decode(data);
  } catch {
    return false;
  }
  const metadata = {...decoded.metadata};
  const tag = metadata[MAC_KEY];
  if (!tag) return false;
  delete metadata[MAC_KEY];
  const info: Record<string, unknown> = {...decoded.rawHeader};
  delete info.__metadata__;
  const canonical = header(new Map(Object.entries(info).map(([name, t]) => [name, decoded.tensors.get(name)!])),
    metadata);
  const expected = await mac(sealParts("state", bundleId, [canonical, data.subarray(8 + decoded.headerLength)]));
  return timingSafeEqual(expected, tag);
}

function timingSafeEqual(a: string, b: string): boolean {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a.charCodeAt(i) ^ b.charCodeAt(i);
  return diff === 0;
}

function gather(tensors: Map<string, RawTensor>, group: string, layout: TensorLayout[], source: string): Float32Array {
  const flat = new Float32Array(layout.reduce((n, p) => n + p.size, 0));
  for (const p of layout) {
    const t = tensors.get(`${group}/${p.name}`);
    if (!t || t.dtype !== "F32" || t.shape.join(",") !== p.shape.join(",")) {
      throw new BundleError(`state file ${source} lacks ${group} tensor ${p.name} of shape [${p.shape}]; copy the ` +
        "bundle's state file again or re-export the bundle.");
    }
    flat.set(asFloat32(t), p.offset);
  }
  return flat;
}

/** A TrainState from the bytes of a state file of this bundle's layout (BundleError when it is not one). */
export function decodeState(data: Uint8Array, manifest: Manifest, bundleId: string, source: string): TrainState {
  let decoded;
  try {
    decoded = decode(data);
  } catch (error) {
    throw new BundleError(`state file ${source} cannot be read (${(error as Error).message}); it is truncated or ` +
      "corrupt: re-export the bundle (or copy its state file again).");
  }
  const {tensors, metadata} = decoded;
  const owner = metadata["edgeadapt.bundle_id"];
  if (owner !== undefined && owner !== bundleId) {
    throw new BundleError(`state file ${source} belongs to another bundle; copy this bundle's state file again or ` +
      "re-export.");
  }
  const optimizer = new Map<string, RawTensor>();
  for (const [name, t] of tensors) {
    if (name.startsWith("optimizer/")) optimizer.set(name.slice("optimizer/".length), {...t, bytes: t.bytes.slice()});
  }
  const portable = manifest.portable;
  return {
    params: gather(tensors, "params", portable.layout, source),
    optimizer,
    progress: progressOf(metadata["edgeadapt.progress"], source),
    statistics: portable.statistics.length ? gather(tensors, "statistics", portable.statistics, source) : null,
    best: [...tensors.keys()].some((k) => k.startsWith("best/")) ? gather(tensors, "best", portable.layout, source)
      : null,
  };
}

const PROGRESS_FIELDS = ["bundle_id", "run_config", "epoch", "batch", "step", "lr_scale", "best_metric", "best_epoch",
  "bad_epochs", "nan_events", "finished", "run_id", "records"];

function progressOf(text: string | undefined, source: string): Progress | null {
  if (text === undefined) return null;
  try {
    const values = pyLoads(text) as Record<string, Json>;
    const unknown = Object.keys(values).filter((k) => !PROGRESS_FIELDS.includes(k));
    if (unknown.length || typeof values.bundle_id !== "string" || typeof values.run_config !== "string") {
      throw new Error("unexpected progress fields");
    }
    const progress = newProgress(values.bundle_id, values.run_config, String(values.run_id ?? ""));
    return {...progress, ...values} as unknown as Progress;
  } catch {
    throw new BundleError(`state file ${source} has unreadable progress; start a new run (without --resume) or ` +
      "re-export the bundle.");
  }
}

/** The interrupted run's progress, if `--resume` may continue it with these settings. */
/** Settings that runs of older releases did not record, with the value they had (the Python runtime's). */
const RECORDED_SINCE: Record<string, Json> = {accumulate: 1};

export function resumable(progress: Progress | null, runConfig: Record<string, Json>): Progress {
  if (!progress || progress.finished) {
    throw new TrainingError("nothing to resume: the bundle has no unfinished run; start one without --resume.");
  }
  const stored = {...RECORDED_SINCE, ...(pyLoads(progress.run_config) as Record<string, Json>)};
  const changed = Object.keys(runConfig).filter((k) => JSON.stringify(stored[k]) !== JSON.stringify(runConfig[k]));
  if (changed.length) {
    throw new TrainingError(`--resume needs the interrupted run's settings, but ${changed.join(", ")} changed (was ` +
      `${changed.map((k) => `${k}=${JSON.stringify(stored[k])}`).join(", ")}); use them or start anew.`);
  }
  return progress;
}
