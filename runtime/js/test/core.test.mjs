// Unit tests of the core's pure parts (node --test). Cross-runtime behaviour (against numpy, Pillow and the Python
// runtime) is tested from the Python suite: tests/test_js_runtime.py.
import assert from "node:assert/strict";
import {test} from "node:test";
import {parseManifest} from "../dist/manifest.js";
import {pyDumps, pyFloat, pyLoads} from "../dist/pyjson.js";
import {decode, encode, f32Tensor, header} from "../dist/safetensors.js";
import {resizeBilinear, roundHalfEven} from "../dist/image.js";
import {BundleError} from "../dist/errors.js";

test("floats are written as Python's repr writes them", () => {
  assert.deepEqual([1e-5, 1e-4, 1e16, 0.1, 3, -0, 2.5e-7, -Infinity, NaN].map(pyFloat),
    ["1e-05", "0.0001", "1e+16", "0.1", "3.0", "-0.0", "2.5e-07", "-Infinity", "NaN"]);
  assert.equal(pyDumps({a: 1, b: [1.5, "é"], c: -Infinity}, {floatKeys: new Set(["a"])}),
    '{"a": 1.0, "b": [1.5, "\\u00e9"], "c": -Infinity}');
  assert.deepEqual(pyLoads('{"x": -Infinity, "s": "NaN and Infinity", "n": [NaN]}'),
    {x: -Infinity, s: "NaN and Infinity", n: [NaN]});
});

test("safetensors round-trips and refuses out-of-range tensors", () => {
  const tensors = new Map([["params/w", f32Tensor(Float32Array.of(1, 2, 3, 4), [2, 2])]]);
  const bytes = encode(header(tensors, {format: "pt"}), tensors);
  assert.equal((bytes.length - 8) % 8, 0, "the header is padded to 8 bytes");
  const back = decode(bytes);
  assert.deepEqual([...new Float32Array(back.tensors.get("params/w").bytes.slice().buffer)], [1, 2, 3, 4]);
  assert.throws(() => decode(bytes.subarray(0, bytes.length - 4)), /out of range/);
  const huge = bytes.slice();
  new DataView(huge.buffer).setBigUint64(0, 1n << 40n, true);
  assert.throws(() => decode(huge), /header length/);
});

const MANIFEST = {
  schema_version: 3, backbone: "tiny", preset: "head", output_name: "logits", labels: ["a", "b"],
  loss: "cross_entropy", hyperparameters: {lr: 0.001, epochs: 2, batch_size: 8}, trainable: ["fc.weight"],
  input: {name: "input", shape: [-1, 4], dtype: "float32", layout: "NC", channels: "", mean: [0], std: [1]},
  files: {"train_step.onnx": "a".repeat(64), "forward.onnx": "b".repeat(64), "state.safetensors": "c".repeat(64)},
  portable: {layout: [{name: "fc.weight", shape: [2, 4], offset: 0, size: 8}], state: ["params"], opset: 17},
};

test("a well-formed manifest parses; what no export writes is refused in one line", () => {
  assert.equal(parseManifest(JSON.stringify(MANIFEST)).labels.length, 2);
  const broken = [
    [{schema_version: 9}, /schema_version 9/],
    [{schema_version: 1}, /schema-1 bundle/],
    [{files: {...MANIFEST.files, "../x": "d".repeat(64)}}, /not a plain name/],
    [{portable: {...MANIFEST.portable, train_step: "other.onnx"}}, /read but not listed/],
    [{input: {...MANIFEST.input, layout: "XYZ"}}, /layout 'XYZ' is unknown/],
    [{labels: ["a", "a"]}, /labels are empty or repeated/],
    [{hyperparameters: {batch_size: 0}}, /batch_size/],
  ];
  for (const [change, message] of broken) {
    assert.throws(() => parseManifest(JSON.stringify({...MANIFEST, ...change})),
      (error) => error instanceof BundleError && message.test(error.message) && !error.message.includes("\n"));
  }
  assert.throws(() => parseManifest("{not json"), BundleError);
});

test("resizing keeps a same-size image and rounds sizes as Python does", () => {
  const image = Uint8Array.from({length: 12}, (_, i) => i * 20);
  assert.deepEqual(resizeBilinear(image, 2, 2, 3, 2, 2), image);
  assert.deepEqual([0.5, 1.5, 2.5, 2.4, 2.6].map(roundHalfEven), [0, 2, 2, 2, 3]);
  const flat = resizeBilinear(new Uint8Array(10 * 10).fill(77), 10, 10, 1, 3, 7);
  assert.ok(flat.every((v) => v === 77), "a flat image stays flat");
});
