/**
 * Just enough of ONNX's protobuf wire format to check a graph before any engine sees it (COMPATIBILITY.md S3, S4):
 * no tensor keeps its data outside the model, portable graphs use standard operators and need only inputs the
 * runtime feeds, and the logits have one value per label. Field numbers are onnx.proto3's (see the Python
 * runtime's runtime/onnx_wire.py, which checks the same).
 */

import {BundleError} from "./errors.js";
import type {Manifest} from "./manifest.js";

const VARINT = 0, LENGTH = 2;
const STANDARD_DOMAINS = new Set(["", "ai.onnx"]);
const ELEMENT_TYPES: Record<number, string> = {1: "float32", 6: "int32", 7: "int64", 10: "float16", 11: "float64"};

interface Field {
  number: number;
  wire: number;
  value: number; // varints
  content: Uint8Array; // length-delimited fields
}

function varint(data: Uint8Array, pos: number): [number, number] {
  let value = 0, scale = 1;
  for (;;) {
    if (pos >= data.length) throw new RangeError("truncated varint");
    const byte = data[pos++];
    value += (byte & 0x7f) * scale;
    scale *= 128;
    if (!(byte & 0x80)) return [value, pos];
    if (scale > 2 ** 70) throw new RangeError("varint too long");
  }
}

function* fields(data: Uint8Array): Generator<Field> {
  let pos = 0;
  while (pos < data.length) {
    const [key, next] = varint(data, pos);
    pos = next;
    const number = Math.floor(key / 8), wire = key & 7;
    if (wire === VARINT) {
      const [value, after] = varint(data, pos);
      pos = after;
      yield {number, wire, value, content: data.subarray(0, 0)};
    } else if (wire === LENGTH) {
      const [size, after] = varint(data, pos);
      if (after + size > data.length) throw new RangeError("truncated field");
      pos = after + size;
      yield {number, wire, value: 0, content: data.subarray(after, pos)};
    } else if (wire === 1 || wire === 5) {
      pos += wire === 1 ? 8 : 4;
    } else {
      throw new RangeError(`unsupported wire type ${wire}`);
    }
  }
}

const text = (bytes: Uint8Array) => new TextDecoder("utf-8", {fatal: true}).decode(bytes);

function stringField(message: Uint8Array, number: number): string {
  for (const f of fields(message)) if (f.number === number && f.wire === LENGTH) return text(f.content);
  return "";
}

function messageField(message: Uint8Array, number: number): Uint8Array {
  for (const f of fields(message)) if (f.number === number && f.wire === LENGTH) return f.content;
  return new Uint8Array(0);
}

export interface GraphInterface {
  inputs: Map<string, [string, number[]]>;
  outputs: Map<string, [string, number[]]>;
  initializers: Set<string>;
  domains: Set<string>;
  externalData: boolean;
}

function valueInfo(info: Uint8Array): [string, [string, number[]]] {
  const tensorType = messageField(messageField(info, 2), 1);
  let element = 0;
  for (const f of fields(tensorType)) if (f.number === 1 && f.wire === VARINT) element = f.value;
  const dims: number[] = [];
  for (const f of fields(messageField(tensorType, 2))) {
    if (f.number !== 1 || f.wire !== LENGTH) continue;
    let dim = -1;
    for (const d of fields(f.content)) if (d.number === 1 && d.wire === VARINT) dim = d.value;
    dims.push(dim);
  }
  return [stringField(info, 1), [ELEMENT_TYPES[element] ?? `type ${element}`, dims]];
}

/** What `model` (a serialized ModelProto) reads, runs and references; a malformed protobuf throws. */
export function graphInterface(model: Uint8Array): GraphInterface {
  const found: GraphInterface = {inputs: new Map(), outputs: new Map(), initializers: new Set(), domains: new Set(),
    externalData: false};
  const tensor = (t: Uint8Array) => {
    for (const f of fields(t)) if (f.number === 13 || (f.number === 14 && f.wire === VARINT && f.value !== 0)) {
      found.externalData = true;
    }
  };
  const sparse = (s: Uint8Array) => {
    for (const f of fields(s)) if ((f.number === 1 || f.number === 2) && f.wire === LENGTH) tensor(f.content);
  };
  const node = (n: Uint8Array) => {
    found.domains.add(stringField(n, 7));
    for (const f of fields(n)) {
      if (f.number !== 5 || f.wire !== LENGTH) continue;
      for (const a of fields(f.content)) {
        if (a.wire !== LENGTH) continue;
        if (a.number === 5 || a.number === 10) tensor(a.content);
        else if (a.number === 6 || a.number === 11) graph(a.content, false);
        else if (a.number === 22 || a.number === 23) sparse(a.content);
      }
    }
  };
  const graph = (g: Uint8Array, top: boolean) => {
    for (const f of fields(g)) {
      if (f.wire !== LENGTH) continue;
      if (f.number === 1) node(f.content);
      else if (f.number === 5) {
        tensor(f.content);
        if (top) found.initializers.add(stringField(f.content, 8));
      } else if (f.number === 15) sparse(f.content);
      else if (top && (f.number === 11 || f.number === 12)) {
        const [name, typed] = valueInfo(f.content);
        (f.number === 11 ? found.inputs : found.outputs).set(name, typed);
      }
    }
  };
  for (const f of fields(model)) {
    if (f.wire !== LENGTH) continue;
    if (f.number === 7) graph(f.content, true);
    else if (f.number === 8) found.domains.add(stringField(f.content, 1));
    else if (f.number === 25) {
      for (const n of fields(f.content)) if (n.number === 7 && n.wire === LENGTH) node(n.content);
    }
  }
  return found;
}

/** A portable graph's role: the inputs the runtime feeds it, and whether it gives the logits. */
export interface GraphRole {
  inputs: Set<string>;
  logits: boolean;
}

/** Refuse a malformed graph, one with external data, and (with `expected` inputs) a portable graph that uses
 * non-standard operators, needs an input the runtime does not feed, or gives logits of the wrong width. */
export function checkGraph(where: string, model: Uint8Array, role: GraphRole | null,
                           manifest: Manifest): GraphInterface {
  let found: GraphInterface;
  try {
    found = graphInterface(model);
  } catch (error) {
    throw new BundleError(`${where} is not a readable ONNX model (${(error as Error).message}); re-export the bundle.`);
  }
  if (found.externalData) {
    throw new BundleError(`${where} keeps tensor data in external files; a bundle's graphs must hold all their data ` +
      "(nothing outside the bundle is read): re-export the bundle.");
  }
  if (role === null) return found;
  const expected = role.inputs;
  const custom = [...found.domains].filter((d) => !STANDARD_DOMAINS.has(d)).sort();
  if (custom.length) {
    throw new BundleError(`${where} uses operators of the domain '${custom[0]}'; portable graphs use standard ONNX ` +
      "only: re-export the bundle.");
  }
  const extra = [...found.inputs.keys()].find((name) => !found.initializers.has(name) && !expected.has(name));
  if (extra !== undefined) {
    throw new BundleError(`${where} needs the input '${extra}', which the runtime does not feed; re-export the bundle.`);
  }
  const logits = found.outputs.get(manifest.output_name);
  if (role.logits) {
    if (!logits) {
      throw new BundleError(`${where} has no output '${manifest.output_name}' (manifest output_name); re-export the ` +
        "bundle.");
    }
    const width = logits[1][logits[1].length - 1];
    if (width > 0 && width !== manifest.labels.length) {
      throw new BundleError(`${where} gives ${width} outputs per sample but the manifest has ` +
        `${manifest.labels.length} labels; re-export the bundle.`);
    }
    const labels = found.inputs.get("labels");
    const wanted = manifest.loss === "cross_entropy" ? "int64" : "float32";
    if (labels && labels[0] !== wanted) {
      throw new BundleError(`${where} takes ${labels[0]} labels, but the ${manifest.loss} loss is fed ${wanted}; ` +
        "re-export the bundle.");
    }
  }
  return found;
}
