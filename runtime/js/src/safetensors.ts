/**
 * safetensors in plain TypeScript: an 8-byte little-endian header length, a JSON header, raw little-endian tensors.
 * The header is written byte for byte as the Python runtime writes it (compact JSON, ASCII, padded to 8 bytes), so
 * the same tensors give the same file in both runtimes.
 */

import {pyDumps} from "./pyjson.js";

export type DType = "F32" | "F64" | "I64" | "I32" | "U8";
const ITEM_SIZE: Record<DType, number> = {F32: 4, F64: 8, I64: 8, I32: 4, U8: 1};
const MAX_HEADER = 100 << 20;

export interface RawTensor {
  dtype: DType;
  shape: number[];
  bytes: Uint8Array; // little-endian, exactly size × item size
}

export function f32Tensor(values: Float32Array, shape: number[]): RawTensor {
  return {dtype: "F32", shape, bytes: new Uint8Array(values.buffer, values.byteOffset, values.byteLength)};
}

export function i64Scalar(value: number): RawTensor {
  const bytes = new Uint8Array(8);
  new DataView(bytes.buffer).setBigInt64(0, BigInt(value), true);
  return {dtype: "I64", shape: [], bytes};
}

/** A copy as float32 values (the bytes may sit at any offset of a shared buffer). */
export function asFloat32(tensor: RawTensor): Float32Array {
  const copy = tensor.bytes.slice();
  return new Float32Array(copy.buffer, 0, copy.byteLength / 4);
}

export function asInteger(tensor: RawTensor): number {
  return Number(new DataView(tensor.bytes.buffer, tensor.bytes.byteOffset, 8).getBigInt64(0, true));
}

/** The header bytes (length prefix included) for these tensors and metadata. */
export function header(tensors: Map<string, RawTensor>, metadata: Record<string, string>): Uint8Array {
  const info: Record<string, {dtype: string; shape: number[]; data_offsets: number[]}> = {};
  let offset = 0;
  for (const [name, t] of tensors) {
    info[name] = {dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.bytes.byteLength]};
    offset += t.bytes.byteLength;
  }
  let text = pyDumps({__metadata__: metadata, ...info}, {compact: true});
  text += " ".repeat((8 - (text.length % 8)) % 8);
  const out = new Uint8Array(8 + text.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(text.length), true);
  for (let i = 0; i < text.length; i++) out[8 + i] = text.charCodeAt(i); // ASCII (pyDumps escapes the rest)
  return out;
}

export function encode(head: Uint8Array, tensors: Map<string, RawTensor>): Uint8Array {
  const total = head.byteLength + [...tensors.values()].reduce((n, t) => n + t.bytes.byteLength, 0);
  const out = new Uint8Array(total);
  out.set(head, 0);
  let offset = head.byteLength;
  for (const t of tensors.values()) {
    out.set(t.bytes, offset);
    offset += t.bytes.byteLength;
  }
  return out;
}

export interface Decoded {
  tensors: Map<string, RawTensor>;
  metadata: Record<string, string>;
  headerLength: number;
  rawHeader: Record<string, unknown>;
}

/** Tensors and metadata; throws Error with the reason when the bytes are not a well-formed file. */
export function decode(data: Uint8Array): Decoded {
  if (data.byteLength < 8) throw new Error("shorter than its header length");
  const length = Number(new DataView(data.buffer, data.byteOffset, 8).getBigUint64(0, true));
  if (length > Math.min(MAX_HEADER, data.byteLength - 8)) throw new Error("header length out of range");
  const rawHeader = JSON.parse(new TextDecoder("utf-8", {fatal: true}).decode(data.subarray(8, 8 + length)));
  if (typeof rawHeader !== "object" || rawHeader === null || Array.isArray(rawHeader)) {
    throw new Error("the header is not an object");
  }
  const metadata = rawHeader.__metadata__ ?? {};
  if (typeof metadata !== "object" || Object.values(metadata).some((v) => typeof v !== "string")) {
    throw new Error("the metadata is not a map of strings");
  }
  const body = data.subarray(8 + length);
  const tensors = new Map<string, RawTensor>();
  for (const [name, info] of Object.entries(rawHeader as Record<string, any>)) {
    if (name === "__metadata__") continue;
    const dtype = info?.dtype as DType;
    const shape = info?.shape;
    const [begin, end] = info?.data_offsets ?? [];
    if (!(dtype in ITEM_SIZE) || !Array.isArray(shape) || !shape.every((d) => Number.isInteger(d) && d >= 0) ||
        !(Number.isInteger(begin) && Number.isInteger(end) && 0 <= begin && begin <= end && end <= body.byteLength) ||
        end - begin !== ITEM_SIZE[dtype] * shape.reduce((a: number, d: number) => a * d, 1)) {
      throw new Error(`tensor ${name} is out of range`);
    }
    tensors.set(name, {dtype, shape, bytes: body.subarray(begin, end)});
  }
  return {tensors, metadata, headerLength: length, rawHeader};
}
