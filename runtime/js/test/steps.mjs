// Fixed training steps for the parity tests and the benchmark, the same in Node and in a browser: the batches
// 0..B-1, B..2B-1, … of a dataset (wrapping around), at a constant learning rate, on the whole graph.
import {batchInputs, PortableEngine} from "../dist/index.js";

export async function runSteps(ort, bundle, data, {steps = 20, batch = 8, lr = 1e-3, engine = {}, timed = false} = {}) {
  const opened = await PortableEngine.create(ort, bundle, bundle.graphs(false), engine);
  opened.load(await bundle.loadState());
  const n = data.names.length, per = data.targets.length / n, losses = [], times = [];
  for (let s = 0; s < steps; s++) {
    const index = Array.from({length: batch}, (_, i) => (s * batch + i) % n);
    const targets = new data.targets.constructor(batch * per);
    index.forEach((i, k) => targets.set(data.targets.subarray(i * per, (i + 1) * per), k * per));
    const x = batchInputs(data, index, bundle.manifest);
    const started = performance.now();
    const {loss} = await opened.trainStep(x, targets, lr);
    times.push(performance.now() - started);
    losses.push(loss);
  }
  const params = opened.state().params;
  await opened.release();
  return {losses, params, times};
}
