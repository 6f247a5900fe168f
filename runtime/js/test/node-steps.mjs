// node test/node-steps.mjs BUNDLE DATA.npz STEPS BATCH → JSON {losses, times}: fixed steps on onnxruntime-node
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
console.log(JSON.stringify({losses: result.losses, times: result.times, rss_mb: process.memoryUsage().rss / 2 ** 20}));
