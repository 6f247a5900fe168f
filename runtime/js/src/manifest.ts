/**
 * `manifest.json`, the contract from host to every runtime (runtime/COMPATIBILITY.md): the schema versions this
 * runtime reads, the fields it uses with their types, and the same refusals as the Python runtime's
 * `Manifest.from_json` for values no export writes. Unknown optional fields are ignored (rule 3).
 */

import {BundleError} from "./errors.js";

export const SUPPORTED_SCHEMAS = [2, 3];
export const MANIFEST_NAME = "manifest.json";
export const STATE_FILE = "state.safetensors";
const LOSSES = ["cross_entropy", "bce_with_logits", "mse", "l1"];
const LAYOUTS: Record<string, InputKind> = {NCHW: "image", NC: "features", NT: "tokens", NCT: "audio"};
const MAX_SIDE = 8192, MAX_SAMPLE_ELEMENTS = 1 << 26, MAX_LABELS = 100_000, MAX_BATCH = 1 << 16;
export const DEFAULT_BATCH = 32, DEFAULT_EPOCHS = 5;

export type InputKind = "image" | "features" | "tokens" | "audio";

export interface TensorLayout {
  name: string;
  shape: number[];
  offset: number;
  size: number;
}

export interface InputSpec {
  name: string;
  shape: number[];
  dtype: string;
  layout: string;
  channels: string;
  mean: number[];
  std: number[];
  resize: number[];
  crop: number;
  kind: InputKind;
  /** text bundles: the WordPiece tokenizer's settings */
  tokens: TokenSpec | null;
  /** speech bundles: the log-mel front end's settings */
  audio: AudioSpec | null;
}

export interface TokenSpec {
  vocab_file: string;
  vocab_size: number;
  max_length: number;
  pad_id: number;
  cls_id: number;
  sep_id: number;
  unk_id: number;
  lowercase: boolean;
  max_chars_per_word: number;
}

export interface AudioSpec {
  sample_rate: number;
  samples: number;
  n_mels: number;
  n_fft: number;
  hop_length: number;
}

export interface PortableSpec {
  layout: TensorLayout[];
  state: string[];
  opset: number;
  train_step: string;
  forward: string;
  state_file: string;
  statistics: TensorLayout[];
  statistics_graph: string;
  /** gradient accumulation (0.4): the step that also takes `grad_sum` and `grad_share` ("" in older bundles) */
  accumulating_step: string;
}

export interface SplitSpec {
  boundary: string;
  boundary_shape: number[];
  prefix_model: string;
  suffix_prefix: string;
}

export interface Manifest {
  schema_version: number;
  backbone: string;
  preset: string;
  input: InputSpec;
  output_name: string;
  labels: string[];
  loss: string;
  hyperparameters: Record<string, number>;
  trainable: string[];
  files: Record<string, string>;
  sizes: Record<string, number>;
  portable: PortableSpec;
  split: SplitSpec | null;
  /** fields this runtime does not interpret, as read (lora, sparse, memory, …) */
  raw: Record<string, unknown>;
}

export function isPlainName(name: unknown): name is string {
  return typeof name === "string" && name.length > 0 && name.length <= 200 && !name.startsWith(".") &&
    !/[/\\:\0]/.test(name) && name === name.trim() && !/[\u0000-\u001f\u007f-\u009f]/.test(name);
}

type Raw = Record<string, unknown>;

function field<T>(raw: Raw, key: string, check: (v: unknown) => boolean, what: string, source: string,
                  fallback?: T): T {
  if (!(key in raw) || raw[key] === undefined) {
    if (fallback !== undefined) return fallback;
    throw new BundleError(`${source} misses the field '${key}'; re-export the bundle.`);
  }
  if (!check(raw[key])) throw new BundleError(`${source}: ${key} must be ${what}; re-export the bundle.`);
  return raw[key] as T;
}

const isObject = (v: unknown): v is Raw => typeof v === "object" && v !== null && !Array.isArray(v);
const isInt = (v: unknown) => Number.isInteger(v);
const isNumber = (v: unknown) => typeof v === "number";
const isString = (v: unknown) => typeof v === "string";
const listOf = (check: (v: unknown) => boolean) => (v: unknown) => Array.isArray(v) && v.every(check);
const mapOf = (check: (v: unknown) => boolean) => (v: unknown) => isObject(v) && Object.values(v).every(check);

function layoutList(value: unknown, where: string): TensorLayout[] {
  if (!Array.isArray(value)) throw new BundleError(`${where} must be a list; re-export the bundle.`);
  return value.map((entry) => {
    if (!isObject(entry)) throw new BundleError(`${where} must hold objects; re-export the bundle.`);
    return {
      name: field<string>(entry, "name", isString, "a string", where),
      shape: field<number[]>(entry, "shape", listOf(isInt), "a list of integers", where),
      offset: field<number>(entry, "offset", isInt, "an integer", where),
      size: field<number>(entry, "size", isInt, "an integer", where),
    };
  });
}

function inputSpec(raw: unknown, source: string): InputSpec {
  const where = `${source}: input`;
  if (!isObject(raw)) throw new BundleError(`${where} must be an object; re-export the bundle.`);
  const layout = field<string>(raw, "layout", isString, "a string", where);
  return {
    name: field(raw, "name", isString, "a string", where),
    shape: field(raw, "shape", listOf(isInt), "a list of integers", where),
    dtype: field(raw, "dtype", isString, "a string", where),
    layout,
    channels: field(raw, "channels", isString, "a string", where),
    mean: field(raw, "mean", listOf(isNumber), "a list of numbers", where),
    std: field(raw, "std", listOf(isNumber), "a list of numbers", where),
    resize: field(raw, "resize", listOf(isInt), "a list of integers", where, []),
    crop: field(raw, "crop", isNumber, "a number", where, 0.875),
    kind: LAYOUTS[layout],
    tokens: raw.tokens == null ? null : tokenSpec(raw.tokens, `${where}.tokens`),
    audio: raw.audio == null ? null : audioSpec(raw.audio, `${where}.audio`),
  };
}

function tokenSpec(raw: unknown, where: string): TokenSpec {
  if (!isObject(raw)) throw new BundleError(`${where} must be an object; re-export the bundle.`);
  const int = (key: string) => field<number>(raw, key, isInt, "an integer", where);
  return {vocab_file: field(raw, "vocab_file", isString, "a string", where), vocab_size: int("vocab_size"),
    max_length: int("max_length"), pad_id: int("pad_id"), cls_id: int("cls_id"), sep_id: int("sep_id"),
    unk_id: int("unk_id"), lowercase: field(raw, "lowercase", (v) => typeof v === "boolean", "true or false", where, true),
    max_chars_per_word: field(raw, "max_chars_per_word", isInt, "an integer", where, 100)};
}

function audioSpec(raw: unknown, where: string): AudioSpec {
  if (!isObject(raw)) throw new BundleError(`${where} must be an object; re-export the bundle.`);
  const positive = (v: unknown) => Number.isInteger(v) && (v as number) > 0;
  const int = (key: string, fallback?: number) => field<number>(raw, key, positive, "a positive integer", where, fallback);
  return {sample_rate: int("sample_rate"), samples: int("samples"), n_mels: int("n_mels", 80), n_fft: int("n_fft", 400),
    hop_length: int("hop_length", 160)};
}

function portableSpec(raw: unknown, source: string): PortableSpec {
  const where = `${source}: portable`;
  if (!isObject(raw)) throw new BundleError(`${source} misses the field 'portable'; re-export the bundle.`);
  return {
    layout: layoutList(raw.layout, `${where}.layout`),
    state: field(raw, "state", listOf(isString), "a list of strings", where),
    opset: field(raw, "opset", isInt, "an integer", where),
    train_step: field(raw, "train_step", isString, "a string", where, "train_step.onnx"),
    forward: field(raw, "forward", isString, "a string", where, "forward.onnx"),
    state_file: field(raw, "state_file", isString, "a string", where, STATE_FILE),
    statistics: raw.statistics === undefined ? [] : layoutList(raw.statistics, `${where}.statistics`),
    statistics_graph: field(raw, "statistics_graph", isString, "a string", where, ""),
    accumulating_step: field(raw, "accumulating_step", isString, "a string", where, ""),
  };
}

function splitSpec(raw: unknown, source: string): SplitSpec | null {
  if (raw === null || raw === undefined) return null;
  const where = `${source}: split`;
  if (!isObject(raw)) throw new BundleError(`${where} must be an object; re-export the bundle.`);
  return {
    boundary: field(raw, "boundary", isString, "a string", where),
    boundary_shape: field(raw, "boundary_shape", listOf(isInt), "a list of integers", where),
    prefix_model: field(raw, "prefix_model", isString, "a string", where, "prefix.onnx"),
    suffix_prefix: field(raw, "suffix_prefix", isString, "a string", where, "suffix_"),
  };
}

/** Parse and check `manifest.json`'s text; every problem is a one-line BundleError. */
export function parseManifest(text: string, source = MANIFEST_NAME): Manifest {
  let raw: unknown;
  try {
    raw = JSON.parse(text.replace(/-?Infinity|NaN/g, "null"));
  } catch (error) {
    throw new BundleError(`${source} is not valid JSON (${(error as Error).message}); re-export the bundle.`);
  }
  if (!isObject(raw)) throw new BundleError(`${source} must hold a JSON object; re-export the bundle.`);
  const version = raw.schema_version;
  if (version === 1) {
    throw new BundleError(`${source} is a schema-1 bundle (edgeadapt 0.1, onnxruntime-training only); this runtime ` +
      `reads schemas [${SUPPORTED_SCHEMAS.join(", ")}]: re-export it with \`edgeadapt export\`.`);
  }
  if (!SUPPORTED_SCHEMAS.includes(version as number)) {
    throw new BundleError(`${source} has schema_version ${JSON.stringify(version)}, this runtime reads ` +
      `[${SUPPORTED_SCHEMAS.join(", ")}]; update the app's edgeadapt runtime or re-export with a matching version.`);
  }
  const manifest: Manifest = {
    schema_version: version as number,
    backbone: field(raw, "backbone", isString, "a string", source),
    preset: field(raw, "preset", isString, "a string", source),
    input: inputSpec(raw.input, source),
    output_name: field(raw, "output_name", isString, "a string", source),
    labels: field(raw, "labels", listOf(isString), "a list of strings", source),
    loss: field(raw, "loss", isString, "a string", source),
    hyperparameters: field(raw, "hyperparameters", mapOf((v) => v === null || isNumber(v)), "an object of numbers",
      source),
    trainable: field(raw, "trainable", listOf(isString), "a list of strings", source),
    files: field(raw, "files", mapOf(isString), "an object of strings", source),
    sizes: field(raw, "sizes", mapOf(isInt), "an object of integers", source, {}),
    portable: portableSpec(raw.portable, source),
    split: splitSpec(raw.split, source),
    raw,
  };
  return checked(manifest, source);
}

/** The listed files only ONNX Runtime training reads (its artifacts, of the whole graph and of a split bundle's
 * suffix): no app runtime reads them, and a bundle packed for apps leaves them out. */
export function ortTrainingFiles(m: Manifest): string[] {
  const prefixes = m.split ? ["", m.split.suffix_prefix] : [""];
  const names = ["training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint"];
  return prefixes.flatMap((prefix) => names.map((name) => prefix + name)).filter((name) => name in m.files);
}

/** The files a runtime reads besides the manifest: each must be a plain name listed in `files`. */
export function referencedFiles(m: Manifest): string[] {
  const p = m.portable;
  const names = [p.train_step, p.forward, p.state_file];
  if (p.statistics_graph) names.push(p.statistics_graph);
  if (p.accumulating_step) names.push(p.accumulating_step);
  if (m.split) {
    names.push(m.split.prefix_model, m.split.suffix_prefix + p.train_step, m.split.suffix_prefix + p.forward);
    if (p.accumulating_step) names.push(m.split.suffix_prefix + p.accumulating_step);
  }
  return names;
}

function checked(m: Manifest, source: string): Manifest {
  const spec = m.input;
  const elements = spec.shape.slice(1).reduce((a, d) => a * Math.max(d, 1), 1);
  const names = [...Object.keys(m.files), ...referencedFiles(m), ...Object.keys(m.sizes)];
  const badName = names.find((n) => !isPlainName(n));
  const unlisted = referencedFiles(m).find((n) => !(n in m.files));
  const hp = m.hyperparameters;
  const whole = (key: string, limit: number) => {
    const value = hp[key] ?? 1;
    return !(Number.isInteger(value) && value >= 1 && value <= limit);
  };
  const problems: [boolean, string][] = [
    [!LOSSES.includes(m.loss), `loss '${m.loss}' is unknown`],
    [m.labels.length < 1 || new Set(m.labels).size !== m.labels.length, "labels are empty or repeated"],
    [m.labels.length > MAX_LABELS, `${m.labels.length} labels is more than ${MAX_LABELS}`],
    [!m.output_name, "output_name is empty"],
    [spec.shape.length < 2 || spec.shape[0] !== -1 || spec.shape.slice(1).some((d) => d < 1),
      `input shape [${spec.shape}] is not [-1, positive dims…]`],
    [elements > MAX_SAMPLE_ELEMENTS, `input shape [${spec.shape}] is over ${MAX_SAMPLE_ELEMENTS} values per sample`],
    [spec.kind === undefined, `layout '${spec.layout}' is unknown`],
    [spec.kind === "image" && (!["RGB", "L"].includes(spec.channels) || spec.resize.length !== 2 ||
      spec.resize.some((d) => d < 1) || spec.shape.length !== 4 || spec.shape[2] !== spec.resize[0] ||
      spec.shape[3] !== spec.resize[1]), "image input needs channels RGB or L, a 2-number resize and an NCHW shape"],
    [spec.resize.some((d) => d > MAX_SIDE), `resize [${spec.resize}] has a side over ${MAX_SIDE}`],
    [spec.mean.length === 0 || spec.mean.length !== spec.std.length || spec.std.some((v) => !(v >= 1e-6)) ||
      ![...spec.mean, ...spec.std].every(Number.isFinite), "mean/std are empty, of different lengths, or a std is below 1e-6"],
    [!(spec.crop > 0 && spec.crop <= 1), `crop ${spec.crop} is not in (0, 1]`],
    [m.trainable.length === 0, "no trainable parameter"],
    [m.portable.layout.map((p) => p.name).join("\n") !== m.trainable.join("\n"),
      "the portable step's state layout does not list the trainable parameters"],
    ["lr" in hp && !(Number.isFinite(hp.lr) && hp.lr > 0), "the default lr is not positive"],
    [whole("batch_size", MAX_BATCH), "the default batch_size is not a whole number in range"],
    [whole("epochs", 1_000_000), "the default epochs is not a whole number in range"],
    [whole("accumulate", MAX_ACCUMULATION), "the default accumulate is not a whole number in range"],
    [badName !== undefined, `file name '${badName}' is not a plain name inside the bundle folder`],
    [badName === undefined && unlisted !== undefined, `'${unlisted}' is read but not listed (and hashed) in files`],
    [Object.values(m.files).some((h) => !/^[0-9a-f]{64}$/.test(h)), "a sha256 in files is not 64 hex digits"],
    [m.portable.state_file !== STATE_FILE, `state_file '${m.portable.state_file}' is not ${STATE_FILE}`],
    [MANIFEST_NAME in m.files, "files lists manifest.json itself"],
    [Object.entries(m.sizes).some(([n, v]) => !(n in m.files) || v < 0), "sizes names unlisted files or negative sizes"],
  ];
  const failed = problems.find(([bad]) => bad);
  if (failed) throw new BundleError(`${source}: ${failed[1]}; re-export the bundle.`);
  return m;
}

export function defaultBatch(m: Manifest): number {
  return m.hyperparameters.batch_size ?? DEFAULT_BATCH;
}

export const MAX_ACCUMULATION = 1024;

/** Micro-batches per update the export chose (`--trainable auto` on a small memory budget), else 1. */
export function defaultAccumulation(m: Manifest): number {
  return m.hyperparameters.accumulate ?? 1;
}

export function parameterCount(layout: TensorLayout[]): number {
  return layout.reduce((total, p) => total + p.size, 0);
}
