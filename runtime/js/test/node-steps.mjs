// node test/node-steps.mjs BUNDLE DATA.npz STEPS BATCH → JSON {losses, times, peak_mb}: fixed steps on
// onnxruntime-node (peak_mb: the process's peak RSS; Linux)
import * as ort from "onnxruntime-node";
import {promises as fs} from "node:fs";
import {inflateRawSync} from "node:zlib";
import {npzDataset, readNpz} from "../dist/index.js";
import {openBundle} from "../dist/node/index.js";
import {runSteps} from "./steps.mjs";

const [bundlePath, dataPath, steps, batch] = process.argv.slice(2);
const bundle = await openBundle(bundlePath);
const data = npzDataset(await readNpz(new Uint8Array(await fs.readFile(dataPath)), async (b) => inflateRawSync(b), dataPath),
  bundle.manifest, dataPath);
const result = await runSteps(ort, bundle, data, {steps: Number(steps), batch: Number(batch)});
// the address space's high-water mark (getrusage's maxRSS carries the parent's over exec on Linux)
const peak = Number(/VmHWM:\s+(\d+)/.exec(await fs.readFile("/proc/self/status", "utf8"))?.[1] ?? NaN) / 1024;
console.log(JSON.stringify({losses: result.losses, times: result.times, peak_mb: peak}));
