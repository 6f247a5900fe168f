/**
 * Datasets as the Python runtime's `runtime/data.py` keeps them: images as uint8 HWC (normalised per batch),
 * feature rows and prefix outputs as float32, labels mapped through the manifest; seeded validation split; batches
 * of model inputs computed in float32 exactly as numpy computes them. `.npz` and CSV readers for the formats the
 * CLI accepts (image decoding belongs to the platform adapters).
 */

import {DataError} from "./errors.js";
import {prepareImage, roundHalfEven, type Pixels} from "./image.js";
import type {Manifest, TokenSpec} from "./manifest.js";
import {permutation} from "./rng.js";
import type {WordPiece} from "./text.js";

export interface Dataset {
  /** uint8 HWC images, or float32 model inputs (rows, features, prefix outputs) */
  samples: Uint8Array | Float32Array;
  /** per-sample shape of `samples` */
  sampleShape: number[];
  /** class indices (cross-entropy), or float32 targets [N, outputs] */
  targets: Int32Array | Float32Array;
  isImage: boolean;
  names: string[];
  skipped: [string, string][];
  /** samples are already the graphs' inputs (a split bundle's prefix outputs) */
  features?: boolean;
}

export const size = (d: Dataset): number => d.names.length;
const product = (shape: number[]) => shape.reduce((a, b) => a * b, 1);

export function subset(d: Dataset, index: number[]): Dataset {
  const width = product(d.sampleShape);
  const samples = new (d.samples.constructor as any)(index.length * width) as Uint8Array | Float32Array;
  index.forEach((i, k) => samples.set(d.samples.subarray(i * width, (i + 1) * width), k * width));
  const per = d.targets.length / size(d);
  const targets = new (d.targets.constructor as any)(index.length * per) as Int32Array | Float32Array;
  index.forEach((i, k) => targets.set(d.targets.subarray(i * per, (i + 1) * per), k * per));
  return {...d, samples, targets, names: index.map((i) => d.names[i])};
}

/** Seeded split into train and validation, as the Python runtime's (`np.random.default_rng(seed)`). */
export function split(d: Dataset, valFraction: number, seed: number): [Dataset, Dataset | null] {
  const count = roundHalfEven(size(d) * valFraction); // Python's round(): 25 samples × 0.1 → 2
  if (count < 1 || size(d) - count < 1) return [d, null];
  const order = permutation(seed, size(d));
  const sorted = (values: number[]) => values.sort((a, b) => a - b);
  return [subset(d, sorted(order.slice(count))), subset(d, sorted(order.slice(0, count)))];
}

/** Label names (or class indices) through the manifest's labels; an unknown one is a DataError naming it. */
export function encodeLabels(values: string[], manifest: Manifest, where: string): Int32Array {
  const index = new Map(manifest.labels.map((name, i) => [name, i]));
  return Int32Array.from(values, (value) => {
    const key = String(value).trim();
    const found = index.get(key);
    if (found !== undefined) return found;
    if (/^-?\d+$/.test(key) && Number(key) >= 0 && Number(key) < manifest.labels.length) return Number(key);
    const shown = manifest.labels.slice(0, 8).join(", ") + (manifest.labels.length > 8 ? " …" : "");
    throw new DataError(`label '${key}' in ${where} is not among the bundle's labels (${shown}); rename it or ` +
      "re-export with --labels that include it.");
  });
}

/** Images from decoded pixels, one label each: the dataset the trainer takes (the browser's and app's path). */
export function imageDataset(images: {pixels: Pixels; label: string; name?: string}[], manifest: Manifest): Dataset {
  const spec = manifest.input;
  if (spec.kind !== "image") throw new DataError(`the bundle takes ${spec.layout} inputs, not images.`);
  const [height, width] = spec.resize, channels = spec.channels === "L" ? 1 : 3;
  const samples = new Uint8Array(images.length * height * width * channels);
  images.forEach((image, i) => samples.set(prepareImage(image.pixels, spec), i * height * width * channels));
  return {samples, sampleShape: [height, width, channels],
    targets: encodeLabels(images.map((image) => image.label), manifest, "the images"), isImage: true,
    names: images.map((image, i) => image.name ?? `image ${i}`), skipped: []};
}

/** The model input for samples `index`: images normalised to float32 NCHW (numpy's float32 arithmetic, in order:
 * /255, −mean, /std), rows (x − mean)/std, prefix outputs as they are. */
export function batchInputs(d: Dataset, index: number[], manifest: Manifest): {data: Float32Array | BigInt64Array;
  dims: number[]} {
  const spec = manifest.input;
  const width = product(d.sampleShape);
  if (spec.kind === "tokens" && !d.features) { // token ids, as they are
    const ids = new BigInt64Array(index.length * width);
    index.forEach((i, k) => { for (let j = 0; j < width; j++) ids[k * width + j] = BigInt(d.samples[i * width + j]); });
    return {data: ids, dims: [index.length, width]};
  }
  const out = new Float32Array(index.length * width);
  const f = Math.fround;
  const mean = spec.mean.map(f), std = spec.std.map(f);
  if (d.features) {
    index.forEach((i, k) => out.set(d.samples.subarray(i * width, (i + 1) * width), k * width));
    return {data: out, dims: [index.length, ...d.sampleShape]};
  }
  if (d.isImage) {
    const [h, w, c] = d.sampleShape, plane = h * w;
    index.forEach((i, k) => {
      const src = d.samples.subarray(i * width, (i + 1) * width);
      for (let p = 0; p < plane; p++) {
        for (let ch = 0; ch < c; ch++) {
          const m = mean.length > 1 ? mean[ch] : mean[0], s = std.length > 1 ? std[ch] : std[0];
          out[k * width + ch * plane + p] = f(f(f(src[p * c + ch] / 255) - m) / s);
        }
      }
    });
    return {data: out, dims: [index.length, c, h, w]};
  }
  // rows: one mean for all, per feature (NC), or per channel (the second axis)
  const perChannel = mean.length > 1, channelSize = d.sampleShape.length > 1 ? product(d.sampleShape.slice(1)) : 1;
  index.forEach((i, k) => {
    for (let j = 0; j < width; j++) {
      const ch = perChannel ? Math.floor(j / channelSize) : 0;
      out[k * width + j] = f(f(d.samples[i * width + j] - mean[ch]) / std[ch]);
    }
  });
  return {data: out, dims: [index.length, ...d.sampleShape]};
}

// ---- CSV rows and .npz arrays -----------------------------------------------------------------------------------

function csvRows(text: string): string[][] {
  const rows: string[][] = [];
  let row: string[] = [], cell = "", quoted = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') { cell += '"'; i++; } else if (c === '"') quoted = false; else cell += c;
    } else if (c === '"') quoted = true;
    else if (c === ",") { row.push(cell); cell = ""; } else if (c === "\n" || c === "\r") {
      if (c === "\r" && text[i + 1] === "\n") i++;
      row.push(cell);
      if (row.length > 1 || row[0] !== "") rows.push(row);
      row = [];
      cell = "";
    } else cell += c;
  }
  if (cell !== "" || row.length) {
    row.push(cell);
    rows.push(row);
  }
  return rows;
}

const isNumber = (text: string) => text.trim() !== "" && !Number.isNaN(Number(text));

/** Rows of `features…, label` (classification) or `features…, target…`; a header is optional. */
export function csvDataset(text: string, manifest: Manifest, where: string): Dataset {
  let rows = csvRows(text.replace(/^\ufeff/, ""));
  if (rows.length && !isNumber(rows[0][0])) rows = rows.slice(1);
  const sampleShape = manifest.input.shape.slice(1), width = product(sampleShape);
  const classify = manifest.loss === "cross_entropy", targetsPerRow = classify ? 1 : manifest.labels.length;
  const samples = new Float32Array(rows.length * width);
  const labels: string[] = [], targets = new Float32Array(classify ? 0 : rows.length * targetsPerRow);
  rows.forEach((row, r) => {
    if (row.length !== width + targetsPerRow) {
      throw new DataError(`${where} row ${r + 1} has ${row.length} columns, expected ${width} features + ` +
        `${targetsPerRow} target(s); fix the row.`);
    }
    for (let j = 0; j < width; j++) {
      if (!isNumber(row[j])) throw new DataError(`${where} row ${r + 1} has a non-numeric feature; features must be numbers.`);
      samples[r * width + j] = Number(row[j]);
    }
    if (classify) labels.push(row[width]);
    else row.slice(width).forEach((v, j) => { targets[r * targetsPerRow + j] = Number(v); });
  });
  if (!samples.every(Number.isFinite)) throw new DataError(`${where} has NaN or infinite values; clean or drop those samples.`);
  return {samples, sampleShape, targets: classify ? encodeLabels(labels, manifest, where) : targets, isImage: false,
    names: rows.map((_, r) => `${where}:${r + 1}`), skipped: []};
}

export interface NpyArray {
  dtype: string; // numpy's descr, e.g. "<f4", "|u1", "<i8"
  shape: number[];
  data: Uint8Array;
}

const MAX_ARRAY_BYTES = 4 * 2 ** 30;
const NPY_SIZES: Record<string, number> = {"|u1": 1, "|i1": 1, "<i2": 2, "<u2": 2, "<i4": 4, "<u4": 4, "<i8": 8,
  "<u8": 8, "<f4": 4, "<f8": 8, "|b1": 1};

/** One `.npy` array, its size bounded from its header before anything is copied (no pickles, no objects). */
export function parseNpy(bytes: Uint8Array, where: string): NpyArray {
  const magic = String.fromCharCode(...bytes.subarray(0, 6));
  if (magic !== "\x93NUMPY") throw new DataError(`${where} is not a .npy array.`);
  const major = bytes[6];
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(bytes.subarray(start, start + headerLength));
  const descr = /'descr':\s*'([^']+)'/.exec(header)?.[1];
  const order = /'fortran_order':\s*(True|False)/.exec(header)?.[1];
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header)?.[1];
  if (!descr || !order || shapeText === undefined) throw new DataError(`${where} has an unreadable .npy header.`);
  if (order === "True") throw new DataError(`${where} is stored in Fortran order; save it with numpy.savez from a C-ordered array.`);
  const unicode = /^<U(\d+)$/.exec(descr); // numpy's fixed-width UTF-32 strings (label names)
  const itemSize = unicode ? 4 * Number(unicode[1]) : NPY_SIZES[descr];
  if (!itemSize) throw new DataError(`${where} has dtype ${descr}; give numbers (uint8 images or float features).`);
  const shape = shapeText.split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  const bytesNeeded = itemSize * product(shape);
  if (bytesNeeded > MAX_ARRAY_BYTES) throw new DataError(`${where} would take ${(bytesNeeded / 2 ** 30).toFixed(1)} GiB decoded, over the 4 GiB limit; split the data.`);
  const data = bytes.subarray(start + headerLength, start + headerLength + bytesNeeded);
  if (data.byteLength !== bytesNeeded) throw new DataError(`${where} is truncated.`);
  return {dtype: descr, shape, data};
}

/** The strings of a numpy unicode array (`<Un`: n UTF-32 code points each, NUL-padded). */
export function npyStrings(array: NpyArray): string[] {
  const width = Number(array.dtype.slice(2)), count = product(array.shape);
  const view = new DataView(array.data.buffer, array.data.byteOffset, array.data.byteLength);
  return Array.from({length: count}, (_, i) => {
    const points: number[] = [];
    for (let j = 0; j < width; j++) {
      const point = view.getUint32((i * width + j) * 4, true);
      if (point === 0) break;
      points.push(point);
    }
    return String.fromCodePoint(...points);
  });
}

/** The float64 values of a numeric array (the loaders' common currency before their own dtype). */
export function npyValues(array: NpyArray): Float64Array {
  const n = product(array.shape), out = new Float64Array(n);
  const view = new DataView(array.data.buffer, array.data.byteOffset, array.data.byteLength);
  const size = NPY_SIZES[array.dtype];
  const read: Record<string, (o: number) => number> = {
    "|u1": (o) => view.getUint8(o), "|b1": (o) => view.getUint8(o), "|i1": (o) => view.getInt8(o),
    "<i2": (o) => view.getInt16(o, true), "<u2": (o) => view.getUint16(o, true), "<i4": (o) => view.getInt32(o, true),
    "<u4": (o) => view.getUint32(o, true), "<i8": (o) => Number(view.getBigInt64(o, true)),
    "<u8": (o) => Number(view.getBigUint64(o, true)), "<f4": (o) => view.getFloat32(o, true),
    "<f8": (o) => view.getFloat64(o, true),
  };
  for (let i = 0; i < n; i++) out[i] = read[array.dtype](i * size);
  return out;
}

/** An `.npz`'s `x` and `y` as a dataset: uint8 N×H×W[×C] images take the image path, anything else must have the
 * model's input shape. `decode` gives resized images (the Python runtime resizes array images with Pillow too). */
export function npzDataset(arrays: Map<string, NpyArray>, manifest: Manifest, where: string): Dataset {
  const x = arrays.get("x"), y = arrays.get("y");
  if (!x || !y) {
    throw new DataError(`${where} must hold arrays named x and y, found ${[...arrays.keys()].sort().join(", ")}; ` +
      "save it with numpy.savez(path, x=..., y=...).");
  }
  const count = x.shape[0];
  if (x.shape.length === 0 || y.shape.length === 0 || y.shape[0] !== count) {
    throw new DataError(`${where}: x has ${x.shape[0]} samples but y has ${y.shape[0]}; they must match.`);
  }
  const spec = manifest.input, want = spec.shape.slice(1);
  const names = Array.from({length: count}, (_, i) => `${where}[${i}]`);
  const targets = targetsOf(y, manifest, where);
  if (spec.kind === "image" && x.dtype === "|u1" && (x.shape.length === 3 || x.shape.length === 4)) {
    const [h, w] = [x.shape[1], x.shape[2]], c = x.shape.length === 4 ? x.shape[3] : 1;
    if (![1, 3, 4].includes(c)) throw new DataError(`${where}: image array has ${c} channels; give 1 (gray), 3 or 4.`);
    const images = names.map((name, i) => {
      const rgba = new Uint8Array(h * w * 4);
      for (let p = 0; p < h * w; p++) {
        const src = x.data.subarray((i * h * w + p) * c, (i * h * w + p + 1) * c);
        rgba.set(c === 1 ? [src[0], src[0], src[0], 255] : [src[0], src[1], src[2], c === 4 ? src[3] : 255], p * 4);
      }
      return {pixels: {width: w, height: h, data: rgba}, label: "0", name};
    });
    return {...imageDataset(images, manifest), targets};
  }
  if (x.shape.slice(1).join(",") !== want.join(",")) {
    throw new DataError(`${where}: x has sample shape (${x.shape.slice(1)}), the bundle expects (${want}) (or uint8 ` +
      "images N×H×W[×C]); reshape the data.");
  }
  if (spec.kind === "tokens") return {samples: tokenIds(x, spec.tokens!, where), sampleShape: want, targets,
    isImage: false, names, skipped: []};
  const samples = Float32Array.from(npyValues(x));
  if (!samples.every(Number.isFinite)) throw new DataError(`${where} has NaN or infinite values; clean or drop those samples.`);
  return {samples, sampleShape: want, targets, isImage: false, names, skipped: []};
}

/** An .npz's `x` as token ids: integers inside the vocabulary (held exactly in float32: vocabularies < 2^24). */
function tokenIds(x: NpyArray, spec: TokenSpec, where: string): Float32Array {
  if (!/^[<|][iu][1248]$/.test(x.dtype)) {
    throw new DataError(`${where}: x must hold integer token ids of shape N×${spec.max_length}, got ${x.dtype}; ` +
      "give texts (CSV, JSONL, .txt folders) or ids of that shape.");
  }
  const ids = Float32Array.from(npyValues(x));
  if (ids.some((id) => id < 0 || id >= spec.vocab_size)) {
    throw new DataError(`${where}: x holds token ids outside the vocabulary (0..${spec.vocab_size - 1}).`);
  }
  return ids;
}

/** Texts tokenized by the bundle's WordPiece: the dataset of a text bundle. */
export function textDataset(texts: string[], labels: string[], names: string[], tokenizer: WordPiece,
                            manifest: Manifest, where: string, skipped: [string, string][] = []): Dataset {
  return {samples: Float32Array.from(tokenizer.encodeBatch(texts)), sampleShape: manifest.input.shape.slice(1),
    targets: encodeLabels(labels, manifest, where), isImage: false, names, skipped};
}

/** Log-mel features of clips (`audio.ts`): the dataset of a speech bundle. */
export function audioDataset(features: Float32Array[], labels: string[], names: string[], manifest: Manifest,
                             where: string, skipped: [string, string][] = []): Dataset {
  const sampleShape = manifest.input.shape.slice(1), width = product(sampleShape);
  const samples = new Float32Array(features.length * width);
  features.forEach((f, i) => samples.set(f, i * width));
  return {samples, sampleShape, targets: encodeLabels(labels, manifest, where), isImage: false, names, skipped};
}

export const MAX_TEXT_CHARS = 100_000; // one sample; longer texts are cut (the model reads max_length tokens anyway)
const LINE_BREAKS = /\r\n|[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]/; // Python's str.splitlines

export function cutText(text: string): string {
  return text.length <= MAX_TEXT_CHARS ? text : Array.from(text).slice(0, MAX_TEXT_CHARS).join("");
}

/** (texts, labels, row names) of a CSV (`text,label`, a header optional) or JSONL file of samples, as the Python
 * runtime reads them; labels are "" where `labelled` is false. */
export function readTable(content: string, where: string, jsonl: boolean, labelled = true):
    {texts: string[]; labels: string[]; names: string[]} {
  const lines = content.replace(/^\ufeff/, "").split(LINE_BREAKS);
  const rows: [number, string, string | null][] = [];
  if (jsonl) {
    lines.forEach((raw, i) => {
      if (!raw.trim()) return;
      let record: any;
      try {
        record = JSON.parse(raw);
      } catch (error) {
        throw new DataError(`${where} line ${i + 1} is not JSON (${(error as Error).message}); write one object per line.`);
      }
      if (typeof record !== "object" || record === null || Array.isArray(record) || !("text" in record)) {
        throw new DataError(`${where} line ${i + 1} has no "text" field; write {"text": ..., "label": ...}.`);
      }
      rows.push([i + 1, record.text, record.label ?? null]);
    });
  } else {
    const parsed = lines.map((line, i) => [i + 1, line === "" ? [] : csvRows(line)[0] ?? []] as [number, string[]])
      .filter(([, r]) => r.length);
    const header = parsed.length ? parsed[0][1].map((c) => c.trim().toLowerCase()) : [];
    const named = header.includes("text");
    const textCol = named ? header.indexOf("text") : 0;
    const labelCol = named ? (header.includes("label") ? header.indexOf("label") : null) : 1;
    for (const [line, row] of named ? parsed.slice(1) : parsed) {
      if (row.length <= Math.max(textCol, labelCol ?? 0) && !(labelCol !== null && row.length === textCol + 1)) {
        throw new DataError(`${where} line ${line} has ${row.length} columns; give text and label columns (a header ` +
          "`text,label`).");
      }
      rows.push([line, row[textCol], labelCol !== null && labelCol < row.length ? row[labelCol] : null]);
    }
  }
  const out = {texts: [] as string[], labels: [] as string[], names: [] as string[]};
  for (const [line, text, label] of rows) {
    if (typeof text !== "string" || !text.trim()) throw new DataError(`${where} line ${line} has no text; fill it in or drop the line.`);
    if (labelled && (label === null || String(label).trim() === "")) {
      throw new DataError(`${where} line ${line} has no label; give each sample a label.`);
    }
    out.texts.push(cutText(text));
    out.labels.push(label === null ? "" : String(label));
    out.names.push(`${where}:${line}`);
  }
  return out;
}

function targetsOf(y: NpyArray, manifest: Manifest, where: string): Int32Array | Float32Array {
  if (manifest.loss === "cross_entropy") {
    if (y.shape.length !== 1) throw new DataError(`${where}: y must be one label per sample, got shape (${y.shape}).`);
    const names = y.dtype.startsWith("<U") ? npyStrings(y) : Array.from(npyValues(y), String);
    return encodeLabels(names, manifest, where);
  }
  const values = Float32Array.from(npyValues(y));
  if (values.length !== y.shape[0] * manifest.labels.length) {
    throw new DataError(`${where}: y has ${values.length / y.shape[0]} columns per sample, the bundle predicts ` +
      `${manifest.labels.length}.`);
  }
  return values;
}

/** The members of a zip archive (.npz), stored or deflated; `inflate` is the platform's raw-deflate decoder. */
export async function unzip(bytes: Uint8Array, inflate: (data: Uint8Array) => Promise<Uint8Array>,
                            where: string): Promise<Map<string, Uint8Array>> {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let end = -1;
  for (let i = bytes.byteLength - 22; i >= Math.max(0, bytes.byteLength - 65557); i--) {
    if (view.getUint32(i, true) === 0x06054b50) { end = i; break; }
  }
  if (end < 0) throw new DataError(`${where} is not a readable .npz (no zip directory); save it with numpy.savez.`);
  const entries = view.getUint16(end + 10, true);
  let pos = view.getUint32(end + 16, true);
  const members = new Map<string, Uint8Array>();
  for (let n = 0; n < entries; n++) {
    if (view.getUint32(pos, true) !== 0x02014b50) throw new DataError(`${where} has a damaged zip directory.`);
    const method = view.getUint16(pos + 10, true);
    let compressed = view.getUint32(pos + 20, true);
    const nameLength = view.getUint16(pos + 28, true), extraLength = view.getUint16(pos + 30, true);
    const commentLength = view.getUint16(pos + 32, true);
    let local = view.getUint32(pos + 42, true);
    const name = new TextDecoder().decode(bytes.subarray(pos + 46, pos + 46 + nameLength));
    if (compressed === 0xffffffff || local === 0xffffffff) { // zip64 (numpy writes it for large arrays)
      const extra = bytes.subarray(pos + 46 + nameLength, pos + 46 + nameLength + extraLength);
      const ev = new DataView(extra.buffer, extra.byteOffset, extra.byteLength);
      let uncompressedSeen = view.getUint32(pos + 24, true) !== 0xffffffff;
      for (let e = 0; e + 4 <= extra.byteLength;) {
        const id = ev.getUint16(e, true), length = ev.getUint16(e + 2, true);
        if (id === 1) {
          let o = e + 4;
          if (!uncompressedSeen) { o += 8; uncompressedSeen = true; }
          if (compressed === 0xffffffff) { compressed = Number(ev.getBigUint64(o, true)); o += 8; }
          if (local === 0xffffffff) local = Number(ev.getBigUint64(o, true));
        }
        e += 4 + length;
      }
    }
    const dataStart = local + 30 + view.getUint16(local + 26, true) + view.getUint16(local + 28, true);
    const raw = bytes.subarray(dataStart, dataStart + compressed);
    if (method !== 0 && method !== 8) throw new DataError(`${where}: member ${name} uses zip method ${method}; save it with numpy.savez.`);
    members.set(name, method === 0 ? raw : await inflate(raw));
    pos += 46 + nameLength + extraLength + commentLength;
  }
  return members;
}

/** The `.npy` arrays of an `.npz`, by name without `.npy`. */
export async function readNpz(bytes: Uint8Array, inflate: (data: Uint8Array) => Promise<Uint8Array>,
                              where: string): Promise<Map<string, NpyArray>> {
  const arrays = new Map<string, NpyArray>();
  for (const [name, data] of await unzip(bytes, inflate, where)) {
    if (name.endsWith(".npy")) arrays.set(name.slice(0, -4).split("/").pop()!, parseNpy(data, `${where}: ${name}`));
  }
  return arrays;
}

/** Raw deflate with the platform's DecompressionStream (browsers, Node 18+). */
export async function inflateRaw(data: Uint8Array): Promise<Uint8Array> {
  const stream = new Blob([data as BlobPart]).stream().pipeThrough(new DecompressionStream("deflate-raw"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}
