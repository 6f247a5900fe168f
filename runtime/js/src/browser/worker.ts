/**
 * Training in a Web Worker, so the page stays responsive: the page posts requests, the worker answers with
 * progress and results. The app names the onnxruntime-web module to load (`ortUrl`), its execution providers and
 * threads; images travel as RGBA pixels (transferred, not copied). A split bundle's prefix features persist in
 * IndexedDB, so training again after a reload does not rerun the prefix over photos it has seen.
 *
 *   → {id, type: "open", url, name, ortUrl, executionProviders?, threads?, trustedKey?}
 *   → {id, type: "train", images: [{pixels, label}], config}     ← {type: "batch" | "epoch", …}
 *   → {id, type: "evaluate", images}  → {id, type: "predict", images, topK}  → {type: "cancel"}
 *   ← {id, type: "result", value} | {id, type: "error", message, user}
 */

import type {Bundle} from "../bundle.js";
import {imageDataset, size} from "../data.js";
import type {EngineOptions, Ort} from "../engine.js";
import {EdgeAdaptError} from "../errors.js";
import type {Pixels} from "../image.js";
import {evaluate, predict} from "../inference.js";
import {Trainer, type TrainConfig} from "../trainer.js";
import {IndexedDbFeatureStore, installBundle} from "./index.js";

interface Request {
  id: number;
  type: string;
  [key: string]: any;
}

let bundle: Bundle | null = null;
let ort: Ort | null = null;
let engine: EngineOptions = {};
let controller: AbortController | null = null;
let features: IndexedDbFeatureStore | null = null;

const post = (message: unknown) => (self as unknown as Worker).postMessage(message);

async function handle(request: Request): Promise<unknown> {
  if (request.type === "open") {
    const module = await import(request.ortUrl);
    ort = module.default ?? module;
    const env = (ort as any).env;
    if (env?.wasm) {
      env.wasm.wasmPaths = new URL(".", request.ortUrl).href;
      env.wasm.numThreads = request.threads ?? (self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency) : 1);
    }
    engine = {executionProviders: request.executionProviders ?? ["wasm"], name: "onnxruntime"};
    bundle = await installBundle(request.url, request.name, {trustedKey: request.trustedKey});
    features = new IndexedDbFeatureStore(request.name);
    const state = await bundle.loadState();
    return {labels: bundle.manifest.labels, input: bundle.manifest.input, preset: bundle.manifest.preset,
      backbone: bundle.manifest.backbone, progress: state.progress && {step: state.progress.step,
        epoch: state.progress.epoch, finished: state.progress.finished, records: state.progress.records}};
  }
  if (!bundle || !ort) throw new EdgeAdaptError("open a bundle first.");
  const images = (request.images ?? []) as {pixels: Pixels; label?: string; name?: string}[];
  const data = imageDataset(images.map((image, i) => ({pixels: image.pixels, label: image.label ?? bundle!.manifest.labels[0],
    name: image.name ?? `image ${i}`})), bundle.manifest);
  if (request.type === "train") {
    controller = new AbortController();
    const config: TrainConfig = {...request.config, engine, device: "browser", signal: controller.signal,
      featureStore: features ?? undefined,
      onBatch: (step, total, loss, accuracy) => post({id: request.id, type: "batch", step, total, loss, accuracy}),
      onEpoch: (record) => post({id: request.id, type: "epoch", record})};
    try {
      return await new Trainer(ort, bundle, config).fit(data);
    } finally {
      controller = null;
    }
  }
  if (request.type === "evaluate") {
    const {predictions: _, ...metrics} = await evaluate(ort, bundle, data, engine);
    return {...metrics, n: size(data)};
  }
  if (request.type === "predict") return predict(ort, bundle, data, request.topK ?? 3, engine);
  throw new EdgeAdaptError(`unknown request '${request.type}'.`);
}

self.onmessage = async (event: MessageEvent<Request>) => {
  const request = event.data;
  if (request.type === "cancel") {
    controller?.abort();
    return;
  }
  try {
    post({id: request.id, type: "result", value: await handle(request)});
  } catch (error) {
    post({id: request.id, type: "error", message: (error as Error).message, user: error instanceof EdgeAdaptError});
  }
};
