/**
 * `evaluate` (metrics on labelled data) and `predict` (top-k labels with scores) over a bundle's current trained
 * state, with the whole forward graph: no deploy step, the state file as training left it.
 */

import type {Bundle} from "./bundle.js";
import {batchInputs, size, type Dataset} from "./data.js";
import {PortableEngine, type EngineOptions, type Ort} from "./engine.js";
import type {Metrics} from "./metrics.js";
import type {TrainState} from "./state.js";
import {evaluateArrays} from "./trainer.js";

export interface Prediction {
  input: string;
  top: {label: string; index: number; score: number}[];
}

/** An engine over the whole forward graph holding `state` (default: the bundle's current trained state). */
export async function evaluationEngine(ort: Ort, bundle: Bundle, options: EngineOptions = {},
                                       state?: TrainState): Promise<PortableEngine> {
  const engine = await PortableEngine.create(ort, bundle, bundle.graphs(false), options, false);
  engine.load(state ?? await bundle.loadState());
  return engine;
}

export async function evaluate(ort: Ort, bundle: Bundle, data: Dataset, options: EngineOptions = {},
                               batchSize = 64): Promise<Metrics> {
  const engine = await evaluationEngine(ort, bundle, options);
  try {
    return await evaluateArrays(engine, data, bundle, batchSize);
  } finally {
    await engine.release();
  }
}

function scores(logits: Float32Array, loss: string, width: number): Float64Array {
  const out = new Float64Array(logits.length);
  for (let i = 0; i < logits.length / width; i++) {
    const row = logits.subarray(i * width, (i + 1) * width);
    if (loss === "cross_entropy") {
      const max = row.reduce((a, b) => Math.max(a, b), -Infinity);
      let sum = 0;
      row.forEach((v, j) => { out[i * width + j] = Math.exp(v - max); sum += out[i * width + j]; });
      for (let j = 0; j < width; j++) out[i * width + j] /= sum;
    } else {
      row.forEach((v, j) => { out[i * width + j] = loss === "bce_with_logits" ? 1 / (1 + Math.exp(-v)) : v; });
    }
  }
  return out;
}

export async function predict(ort: Ort, bundle: Bundle, data: Dataset, topK = 5, options: EngineOptions = {},
                              batchSize = 64): Promise<Prediction[]> {
  const engine = await evaluationEngine(ort, bundle, options);
  const m = bundle.manifest, width = m.labels.length, k = Math.min(topK, width);
  const predictions: Prediction[] = [];
  try {
    for (let start = 0; start < size(data); start += batchSize) {
      const index = Array.from({length: Math.min(batchSize, size(data) - start)}, (_, i) => start + i);
      const s = scores(await engine.logits(batchInputs(data, index, m)), m.loss, width);
      index.forEach((sample, row) => {
        const order = Array.from({length: width}, (_, j) => j).sort((a, b) => s[row * width + b] - s[row * width + a]);
        predictions.push({input: data.names[sample],
          top: order.slice(0, k).map((j) => ({label: m.labels[j], index: j, score: s[row * width + j]}))});
      });
    }
  } finally {
    await engine.release();
  }
  return predictions;
}
