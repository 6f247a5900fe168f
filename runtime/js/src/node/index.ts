/**
 * The runtime on Node: open a bundle folder, load data in the CLI's formats (class folders of images, `.npz`,
 * CSV; for text bundles .txt class folders and CSV/JSONL tables; for speech bundles .wav class folders), and train/evaluate/predict with onnxruntime-node. Images are decoded with `sharp` (libvips; JPEG through
 * libjpeg-turbo's decoder, as Pillow's), an optional dependency needed for image files only.
 */

import {promises as fs} from "node:fs";
import path from "node:path";
import {inflateRawSync} from "node:zlib";
import {Bundle} from "../bundle.js";
import {wavFeatures} from "../audio.js";
import {audioDataset, csvDataset, cutText, imageDataset, npzDataset, readNpz, readTable, size, textDataset,
  type Dataset} from "../data.js";
import type {Ort} from "../engine.js";
import {DataError, ConfigError} from "../errors.js";
import type {Pixels} from "../image.js";
import {webCrypto} from "../platform.js";
import {deviceKeyPath, FileDeviceKey, FileStorage} from "./storage.js";

export {FileStorage, FileDeviceKey, deviceKeyPath};

export const IMAGE_SUFFIXES = new Set([".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"]);
const TEXT_SUFFIXES = new Set([".txt"]);
const AUDIO_SUFFIXES = new Set([".wav", ".wave"]);

export async function openBundle(folder: string, options: {trustedKey?: string; verify?: boolean} = {}): Promise<Bundle> {
  let info;
  try {
    info = await fs.stat(folder);
  } catch {
    info = null;
  }
  if (!info?.isDirectory()) {
    throw new ConfigError(`bundle ${folder} does not exist or is not a folder; create it with \`edgeadapt export\`.`);
  }
  let trustedKey: string | undefined;
  if (options.trustedKey !== undefined) {
    try {
      trustedKey = await fs.readFile(options.trustedKey, "utf8");
    } catch {
      throw new ConfigError(`${options.trustedKey} is not a readable public ed25519 key; create one with \`edgeadapt keygen\`.`);
    }
  }
  return Bundle.open(new FileStorage(folder), {crypto: webCrypto(), deviceKey: new FileDeviceKey(deviceKeyPath(), folder),
    trustedKey, verify: options.verify});
}

/** onnxruntime-node, loaded when first needed. */
export async function nodeOrt(): Promise<Ort> {
  try {
    return (await import("onnxruntime-node" as string)) as Ort;
  } catch {
    throw new ConfigError("the Node runtime needs onnxruntime-node: npm install onnxruntime-node.");
  }
}

/** RGBA pixels of an image file (sharp; the file's own pixels: no colour management, no EXIF rotation, 8 bits). */
export async function decodeImage(file: string): Promise<Pixels> {
  let sharp: any;
  try {
    sharp = (await import("sharp" as string)).default;
  } catch {
    throw new ConfigError("reading image files needs sharp: npm install sharp (or give an .npz of uint8 images).");
  }
  const {data, info} = await sharp(file, {failOn: "error", limitInputPixels: 64_000_000}).ensureAlpha()
    .toColourspace("srgb").raw({depth: "uchar"}).toBuffer({resolveWithObject: true});
  return {width: info.width, height: info.height, data: new Uint8Array(data.buffer, data.byteOffset, data.byteLength)};
}

/** (file, class) for every image in the class subfolders of `root`, in the Python runtime's (sorted) order. */
export async function classFiles(root: string, suffixes = IMAGE_SUFFIXES): Promise<[string, string][]> {
  const files: [string, string][] = [];
  const sortedNames = (entries: string[]) => entries.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  const folders = (await fs.readdir(root, {withFileTypes: true})).filter((e) => e.isDirectory() && !e.name.startsWith("."));
  for (const folder of sortedNames(folders.map((e) => e.name))) {
    const entries = await fs.readdir(path.join(root, folder), {withFileTypes: true});
    for (const name of sortedNames(entries.filter((e) => e.isFile()).map((e) => e.name))) {
      if (suffixes.has(path.extname(name).toLowerCase())) files.push([path.join(root, folder, name), folder]);
    }
  }
  return files;
}

export async function loadImageFolder(root: string, bundle: Bundle, maxBadFraction = 0.1): Promise<Dataset> {
  const files = await classFiles(root);
  const images: {pixels: Pixels; label: string; name: string}[] = [];
  const skipped: [string, string][] = [];
  for (const [file, label] of files) {
    try {
      images.push({pixels: await decodeImage(file), label, name: file});
    } catch (error) {
      if (error instanceof ConfigError) throw error;
      skipped.push([file, String((error as Error).message).slice(0, 80)]);
    }
  }
  if (files.length && skipped.length > maxBadFraction * files.length) {
    throw new DataError(`${skipped.length} of ${files.length} images in ${root} cannot be read (first: ${skipped[0][0]}: ` +
      `${skipped[0][1]}); fix or remove them (limit ${Math.round(maxBadFraction * 100)}%).`);
  }
  return {...imageDataset(images, bundle.manifest), skipped};
}

const FORMATS = {
  tokens: "a CSV or JSONL of text,label, a folder of class subfolders of .txt files, or an .npz of ids",
  audio: "a folder of class subfolders of .wav files, or an .npz of log-mel features",
};

/** Every file of `suffixes` in `root`'s class subfolders, read by `read`; an unreadable one is skipped with its
 * reason, and more than `limit` of them is a DataError. */
async function readClassFolder<T>(root: string, suffixes: Set<string>, what: string, limit: number,
                                  read: (file: string) => Promise<T>) {
  const values: T[] = [], labels: string[] = [], names: string[] = [], skipped: [string, string][] = [];
  const files = await classFiles(root, suffixes);
  for (const [file, label] of files) {
    try {
      values.push(await read(file));
    } catch (error) {
      skipped.push([file, (error as Error).message]);
      continue;
    }
    labels.push(label);
    names.push(file);
  }
  checkBadFraction(skipped, files.length, what, root, limit);
  return {values, labels, names, skipped};
}

function checkBadFraction(skipped: [string, string][], total: number, what: string, root: string, limit: number) {
  if (total && skipped.length > limit * total) {
    throw new DataError(`${skipped.length} of ${total} ${what} in ${root} cannot be read (first: ${skipped[0][0]}: ` +
      `${skipped[0][1]}); fix or remove them (limit ${Math.round(limit * 100)}%).`);
  }
}

async function readTextFile(file: string): Promise<string> {
  let text: string;
  try {
    text = new TextDecoder("utf-8", {fatal: true}).decode(await fs.readFile(file)).replace(/^\ufeff/, "");
  } catch {
    throw new DataError(`${file} is not UTF-8 text; save it as UTF-8.`);
  }
  if (!text.trim()) throw new DataError(`${file} holds no text; write the sample or remove the file.`);
  return cutText(text);
}

/** A text bundle's data: class subfolders of .txt files, or a CSV/JSONL table of text and label. */
async function loadTexts(source: string, folder: boolean, bundle: Bundle, maxBadFraction: number): Promise<Dataset> {
  const tokenizer = await bundle.tokenizer();
  if (folder) {
    const read = await readClassFolder(source, TEXT_SUFFIXES, "text files", maxBadFraction, readTextFile);
    return textDataset(read.values, read.labels, read.names, tokenizer, bundle.manifest, source, read.skipped);
  }
  const suffix = path.extname(source).toLowerCase();
  if (suffix !== ".csv" && suffix !== ".jsonl") throw new DataError(`data ${source} is not ${FORMATS.tokens}; give one of those.`);
  let content: string;
  try {
    content = new TextDecoder("utf-8", {fatal: true}).decode(await fs.readFile(source));
  } catch {
    throw new DataError(`${source} is not UTF-8 text; save it as UTF-8.`);
  }
  const {texts, labels, names} = readTable(content, source, suffix === ".jsonl");
  return textDataset(texts, labels, names, tokenizer, bundle.manifest, source);
}

/** A speech bundle's data: class subfolders of .wav files, as log-mel features. */
async function loadAudioFolder(root: string, bundle: Bundle, maxBadFraction: number): Promise<Dataset> {
  const spec = bundle.manifest.input.audio!;
  const read = await readClassFolder(root, AUDIO_SUFFIXES, "audio files", maxBadFraction,
    async (file) => wavFeatures(new Uint8Array(await fs.readFile(file)), spec, file));
  return audioDataset(read.values, read.labels, read.names, bundle.manifest, root, read.skipped);
}

/** A class folder of images, an .npz with x and y, or a CSV of `features…, label`; text and speech bundles read
 * their formats (texts: .txt class folders, CSV/JSONL tables; speech: .wav class folders). */
export async function loadDataset(source: string, bundle: Bundle, maxBadFraction = 0.1): Promise<Dataset> {
  const m = bundle.manifest;
  let info;
  try {
    info = await fs.stat(source);
  } catch {
    throw new DataError(`data ${source} does not exist; give a folder of class subfolders of images, an .npz or a .csv file.`);
  }
  let data: Dataset;
  const suffix = path.extname(source).toLowerCase();
  if (m.input.kind === "tokens" && suffix !== ".npz") {
    data = await loadTexts(source, info.isDirectory(), bundle, maxBadFraction);
  } else if (m.input.kind === "audio" && suffix !== ".npz") {
    if (!info.isDirectory()) throw new DataError(`data ${source} is not ${FORMATS.audio}; give one of those.`);
    data = await loadAudioFolder(source, bundle, maxBadFraction);
  } else if (info.isDirectory()) {
    if (m.input.kind !== "image") throw new DataError(`${source} is an image folder but the bundle takes ${m.input.layout} rows; give a .csv or .npz.`);
    data = await loadImageFolder(source, bundle, maxBadFraction);
  } else if (path.extname(source) === ".npz") {
    const arrays = await readNpz(new Uint8Array(await fs.readFile(source)), async (raw) => inflateRawSync(raw), source);
    data = npzDataset(arrays, m, source);
  } else if (path.extname(source) === ".csv") {
    data = csvDataset(await fs.readFile(source, "utf8"), m, source);
  } else {
    throw new DataError(`data ${source} is not a folder, .npz or .csv; give one of those.`);
  }
  if (size(data) === 0) throw new DataError(`data ${source} holds no usable sample; add samples.`);
  return data;
}

async function filesBelow(source: string, suffixes: Set<string>): Promise<string[]> {
  return (await fs.readdir(source, {recursive: true, withFileTypes: true}))
    .filter((e) => e.isFile() && suffixes.has(path.extname(e.name).toLowerCase()))
    .map((e) => path.join(e.parentPath ?? (e as any).path, e.name)).sort();
}

/** A text or speech bundle's inputs to predict: .txt or .wav files, folders of them, unlabelled CSV/JSONL tables
 * (text), or an .npz of model inputs. */
async function loadTextOrSpeechInputs(sources: string[], bundle: Bundle): Promise<Dataset> {
  const m = bundle.manifest, text = m.input.kind === "tokens", first = m.labels[0];
  const texts: string[] = [], features: Float32Array[] = [], names: string[] = [];
  const add = async (file: string) => {
    if (text) texts.push(await readTextFile(file));
    else features.push(wavFeatures(new Uint8Array(await fs.readFile(file)), m.input.audio!, file));
    names.push(file);
  };
  for (const source of sources) {
    const info = await fs.stat(source).catch(() => null);
    const suffix = path.extname(source).toLowerCase();
    if (!info) throw new DataError(`input ${source} does not exist; give ${text ? ".txt" : ".wav"} files or folders of them.`);
    if (suffix === ".npz") {
      if (sources.length > 1) throw new DataError("give an .npz of model inputs on its own.");
      return loadDataset(source, bundle);
    }
    if (info.isDirectory()) {
      for (const file of await filesBelow(source, text ? TEXT_SUFFIXES : AUDIO_SUFFIXES)) await add(file);
    } else if (text && (suffix === ".csv" || suffix === ".jsonl")) {
      const table = readTable(await fs.readFile(source, "utf8"), source, suffix === ".jsonl", false);
      texts.push(...table.texts);
      names.push(...table.names);
    } else {
      await add(source);
    }
  }
  if (!names.length) throw new DataError(`no input given; pass ${text ? ".txt" : ".wav"} files or folders of them.`);
  const labels = names.map(() => first);
  return text ? textDataset(texts, labels, names, await bundle.tokenizer(), m, "the inputs")
    : audioDataset(features, labels, names, m, "the inputs");
}

/** Inputs to predict: image files, folders of them (every image below, in name order), or .npz/.csv files; text
 * and speech bundles take their own files. */
export async function loadInputs(sources: string[], bundle: Bundle): Promise<Dataset> {
  if (bundle.manifest.input.kind === "tokens" || bundle.manifest.input.kind === "audio") {
    return loadTextOrSpeechInputs(sources, bundle);
  }
  const images: {pixels: Pixels; label: string; name: string}[] = [];
  const parts: Dataset[] = [];
  for (const source of sources) {
    const info = await fs.stat(source).catch(() => null);
    if (!info) throw new DataError(`input ${source} does not exist; give image files, folders of them, or .npz/.csv files.`);
    if (info.isDirectory()) {
      const found = (await fs.readdir(source, {recursive: true, withFileTypes: true}))
        .filter((e) => e.isFile() && IMAGE_SUFFIXES.has(path.extname(e.name).toLowerCase()))
        .map((e) => path.join(e.parentPath ?? (e as any).path, e.name)).sort();
      for (const file of found) images.push({pixels: await decodeImage(file), label: bundle.manifest.labels[0], name: file});
    } else if (IMAGE_SUFFIXES.has(path.extname(source).toLowerCase())) {
      images.push({pixels: await decodeImage(source), label: bundle.manifest.labels[0], name: source});
    } else {
      parts.push(await loadDataset(source, bundle));
    }
  }
  if (images.length) parts.unshift(imageDataset(images, bundle.manifest));
  if (!parts.length) throw new DataError("no input given; pass image files or .npz/.csv files.");
  if (parts.length === 1) return parts[0];
  const first = parts[0];
  if (parts.some((p) => p.isImage !== first.isImage)) throw new DataError("give either images or rows to predict, not both.");
  const total = parts.reduce((n, p) => n + p.samples.length, 0);
  const samples = new (first.samples.constructor as any)(total);
  let offset = 0;
  for (const p of parts) { samples.set(p.samples, offset); offset += p.samples.length; }
  const targets = new (first.targets.constructor as any)(parts.reduce((n, p) => n + p.targets.length, 0));
  offset = 0;
  for (const p of parts) { targets.set(p.targets, offset); offset += p.targets.length; }
  return {...first, samples, targets, names: parts.flatMap((p) => p.names)};
}
