/**
 * The runtime on Node: open a bundle folder, load data in the CLI's formats (class folders of images, `.npz`,
 * CSV), and train/evaluate/predict with onnxruntime-node. Images are decoded with `sharp` (libvips; JPEG through
 * libjpeg-turbo's decoder, as Pillow's), an optional dependency needed for image files only.
 */

import {promises as fs} from "node:fs";
import path from "node:path";
import {inflateRawSync} from "node:zlib";
import {Bundle} from "../bundle.js";
import {csvDataset, imageDataset, npzDataset, readNpz, size, type Dataset} from "../data.js";
import type {Ort} from "../engine.js";
import {DataError, ConfigError} from "../errors.js";
import type {Pixels} from "../image.js";
import {webCrypto} from "../platform.js";
import {deviceKeyPath, FileDeviceKey, FileStorage} from "./storage.js";

export {FileStorage, FileDeviceKey, deviceKeyPath};

export const IMAGE_SUFFIXES = new Set([".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"]);

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

/** A class folder of images, an .npz with x and y, or a CSV of `features…, label`. */
export async function loadDataset(source: string, bundle: Bundle, maxBadFraction = 0.1): Promise<Dataset> {
  const m = bundle.manifest;
  let info;
  try {
    info = await fs.stat(source);
  } catch {
    throw new DataError(`data ${source} does not exist; give a folder of class subfolders of images, an .npz or a .csv file.`);
  }
  if (m.input.kind === "tokens" || m.input.kind === "audio") {
    if (path.extname(source) !== ".npz") {
      throw new DataError(`the JavaScript runtime reads ${m.input.kind} bundles' data as an .npz of model inputs; ` +
        "tokenize the texts (or compute the log-mel features) first.");
    }
  }
  let data: Dataset;
  if (info.isDirectory()) {
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

/** Inputs to predict: image files, folders of them (every image below, in name order), or .npz/.csv files. */
export async function loadInputs(sources: string[], bundle: Bundle): Promise<Dataset> {
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
