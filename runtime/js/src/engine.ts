/**
 * The portable training step on an injected onnxruntime (onnxruntime-web, -node or -react-native: anything with
 * onnxruntime-common's `InferenceSession` and `Tensor`). The same graphs, feeds and state as the Python runtime's
 * onnxruntime engine: `train_step(input, [bn_stats], labels, lr, step, params, adam_m, adam_v)`, AdamW in the graph,
 * the step count fed as `t + 1`, a non-finite loss leaving the state unchanged. Over the accumulating step
 * (`GraphFiles.accumulates`), `accumulate` adds a micro-batch's weighted gradient to a pending sum and the next
 * `trainStep` updates with it, as the Python engines do.
 */

import type {InferenceSession as CommonSession} from "onnxruntime-common";
import {GRAD_SHARE, GRAD_SUM, type Bundle, type GraphFiles} from "./bundle.js";
import {BackendError} from "./errors.js";
import {asFloat32, asInteger, f32Tensor, i64Scalar, type RawTensor} from "./safetensors.js";
import type {TrainState} from "./state.js";

/** A tensor as every onnxruntime JavaScript package gives it (onnxruntime-common's `Tensor`, any release). */
export interface Tensor {
  readonly data: unknown;
  readonly dims: readonly number[];
}

/** A session as every onnxruntime JavaScript package gives it. */
export interface InferenceSession {
  readonly inputNames: readonly string[];
  readonly outputNames: readonly string[];
  run(feeds: any): Promise<Record<string, Tensor>>;
  release(): Promise<void>;
}

export type SessionOptions = CommonSession.SessionOptions;

/** The part of an onnxruntime package the runtime uses (the module object an app imports: onnxruntime-web, -node or
 * -react-native, of any release with onnxruntime-common's API). Structural, so no release's types are imposed. */
export interface Ort {
  InferenceSession: {create(model: Uint8Array, options?: any): Promise<InferenceSession>};
  Tensor: new (type: any, data: any, dims?: readonly number[]) => Tensor;
}

export interface EngineOptions {
  /** e.g. ["wasm"], ["webgpu", "wasm"], ["cpu"], ["cuda", "cpu"] (default: the package's default) */
  executionProviders?: SessionOptions["executionProviders"];
  threads?: number;
  /** the name runs record ("onnxruntime": the same graphs and optimizer state as the Python runtime's engine) */
  name?: string;
}

export interface ModelInput {
  data: Float32Array | BigInt64Array;
  dims: number[];
}

function sessionOptions(options: EngineOptions): SessionOptions {
  // no memory pattern, as the Python runtime's sessions (runtime/ort.py): a run then holds what it needs, not a
  // planned block on top of it
  const out: SessionOptions = {graphOptimizationLevel: "all", enableMemPattern: false};
  if (options.executionProviders) out.executionProviders = options.executionProviders;
  if (options.threads) {
    out.intraOpNumThreads = options.threads;
    out.interOpNumThreads = 1;
  }
  return out;
}

/** A session over verified graph bytes, with the options every edgeadapt session has; a refusal is one line. */
export async function openSession(ort: Ort, model: Uint8Array, options: EngineOptions,
                                  what: string): Promise<InferenceSession> {
  try {
    return await ort.InferenceSession.create(model, sessionOptions(options));
  } catch (error) {
    throw new BackendError(`the engine cannot load ${what} (${String((error as Error).message ?? error).split("\n")[0]}); ` +
      "use an onnxruntime release that runs the bundle's opset, or another execution provider.");
  }
}

export class PortableEngine {
  readonly name: string;
  private values = new Map<string, Tensor>();
  private statistics: Tensor | null = null;
  private t = 0;
  /** the weighted gradient of this update's earlier micro-batches (accumulating step only) */
  private pending: Tensor | null = null;

  private constructor(private readonly ort: Ort, private readonly bundle: Bundle, private readonly inputName: string,
                      private readonly forward: InferenceSession, private readonly step: InferenceSession | null,
                      options: EngineOptions, private readonly accumulates: boolean) {
    this.name = options.name ?? "onnxruntime";
  }

  /** Sessions over the verified bytes of `graphs` (the whole graph's or a split bundle's suffix). */
  static async create(ort: Ort, bundle: Bundle, graphs: GraphFiles, options: EngineOptions = {},
                      training = true): Promise<PortableEngine> {
    const forward = await openSession(ort, await bundle.readGraph(graphs.forward), options, graphs.forward);
    const step = training ? await openSession(ort, await bundle.readGraph(graphs.trainStep), options, graphs.trainStep)
      : null;
    return new PortableEngine(ort, bundle, graphs.inputName, forward, step, options, graphs.accumulates);
  }

  private get stateNames(): string[] {
    return this.bundle.manifest.portable.state;
  }

  private vector(values: Float32Array): Tensor {
    return new this.ort.Tensor("float32", values, [values.length]);
  }

  load(state: TrainState): void {
    const zeros = () => new Float32Array(state.params.length);
    this.values = new Map([["params", this.vector(state.params.slice())]]);
    for (const name of this.stateNames.slice(1)) {
      const stored = state.optimizer.get(name);
      this.values.set(name, this.vector(stored ? asFloat32(stored) : zeros()));
    }
    const step = state.optimizer.get("step");
    this.t = step ? asInteger(step) : 0;
    this.statistics = state.statistics ? this.vector(state.statistics.slice()) : null;
    this.pending = null;
  }

  state(): TrainState {
    const optimizer = new Map<string, RawTensor>();
    for (const name of this.stateNames.slice(1)) {
      const moment = (this.values.get(name)!.data as Float32Array).slice();
      optimizer.set(name, f32Tensor(moment, [moment.length]));
    }
    optimizer.set("step", i64Scalar(this.t));
    return {params: (this.values.get("params")!.data as Float32Array).slice(), optimizer, progress: null,
      statistics: this.statistics ? (this.statistics.data as Float32Array).slice() : null, best: null};
  }

  private input(x: ModelInput): Tensor {
    return x.data instanceof BigInt64Array ? new this.ort.Tensor("int64", x.data, x.dims)
      : new this.ort.Tensor("float32", x.data, x.dims);
  }

  private labels(y: Int32Array | Float32Array, batch: number): Tensor {
    if (y instanceof Int32Array) return new this.ort.Tensor("int64", BigInt64Array.from(y, BigInt), [batch]);
    return new this.ort.Tensor("float32", y, [batch, y.length / batch]);
  }

  private withStatistics(feeds: Record<string, Tensor>, s: InferenceSession): Record<string, Tensor> {
    if (this.statistics && s.inputNames.includes("bn_stats")) feeds.bn_stats = this.statistics;
    return feeds;
  }

  /** Forward, backward and AdamW; a non-finite loss leaves the state unchanged. On the accumulating step the update
   * uses the pending micro-batches' sum plus `share` × this batch's gradient. */
  async trainStep(x: ModelInput, y: Int32Array | Float32Array, lr: number,
                  share = 1): Promise<{loss: number; logits: Float32Array}> {
    const {loss, logits, out} = await this.run(x, y, lr, share, true);
    if (Number.isFinite(loss)) {
      for (const name of this.stateNames) this.values.set(name, out[`${name}.new`]);
      this.t += 1;
      this.pending = null;
    }
    return {loss, logits};
  }

  /** Accumulating step only: add `share` × this micro-batch's gradient to the sum the next `trainStep` updates with;
   * the parameters stay. */
  async accumulate(x: ModelInput, y: Int32Array | Float32Array, share: number): Promise<{loss: number; logits: Float32Array}> {
    const {loss, logits, out} = await this.run(x, y, 0, share, false);
    if (Number.isFinite(loss)) this.pending = out[`${GRAD_SUM}.new`];
    return {loss, logits};
  }

  private async run(x: ModelInput, y: Int32Array | Float32Array, lr: number, share: number, update: boolean) {
    if (!this.accumulates && (share !== 1 || !update)) {
      throw new Error("internal: micro-batches need an engine opened over the accumulating step");
    }
    const step = this.step!;
    const feeds: Record<string, Tensor> = {
      [this.inputName]: this.input(x), labels: this.labels(y, x.dims[0]),
      lr: new this.ort.Tensor("float32", Float32Array.of(lr), []),
      step: new this.ort.Tensor("int64", BigInt64Array.of(BigInt(this.t + 1)), []),
    };
    for (const name of this.stateNames) feeds[name] = this.values.get(name)!;
    if (this.accumulates) {
      feeds[GRAD_SUM] = this.pending ?? this.vector(new Float32Array(1));  // [1] zero: broadcast, no zero vector
      feeds[GRAD_SHARE] = new this.ort.Tensor("float32", Float32Array.of(share), []);
    }
    // every output: onnxruntime-node 1.19 pairs a list of fetches with the graph's first outputs, not by name
    const out = await step.run(this.withStatistics(feeds, step));
    const loss = (out.loss.data as Float32Array)[0];
    const logits = out[this.bundle.manifest.output_name].data as Float32Array;
    return {loss, logits, out};
  }

  async logits(x: ModelInput): Promise<Float32Array> {
    const feeds: Record<string, Tensor> = {[this.inputName]: this.input(x), params: this.values.get("params")!};
    const out = await this.forward.run(this.withStatistics(feeds, this.forward));
    return out[this.bundle.manifest.output_name].data as Float32Array;
  }

  async release(): Promise<void> {
    await this.forward.release();
    await this.step?.release();
  }
}
