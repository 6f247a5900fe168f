/**
 * `train(bundle, data, config)`: the Python runtime's `Trainer.fit`, step for step, so a run moves between the
 * runtimes: the same seeded batch order and validation split, LR schedule, checkpoint every N steps, validation,
 * early stopping with the best parameters kept in the state, a time budget, NaN recovery (back to the last good
 * state at a tenth of the rate, a second time stops), an epoch committed in one atomic state write, the training
 * log brought up to date from the state, and `resume` continuing an interrupted run exactly. Split bundles train
 * the suffix on prefix features computed once per sample. `signal` cancels at the next batch, keeping the last
 * committed state; `onBatch`/`onEpoch` report progress.
 */

import {TRAIN_LOG, type Bundle} from "./bundle.js";
import {batchInputs, size, split, type Dataset} from "./data.js";
import {openSession, PortableEngine, type EngineOptions, type Ort} from "./engine.js";
import {featureSpace, sampleKeys, SealedFeatures, type FeatureStore} from "./feature_cache.js";
import {CancelledError, ConfigError, DataError, TrainingError} from "./errors.js";
import {defaultAccumulation, defaultBatch, DEFAULT_EPOCHS, MAX_ACCUMULATION} from "./manifest.js";
import {classificationMetrics, learningRate, meanLoss, RunningStats, SCHEDULES, type Metrics,
  type Schedule} from "./metrics.js";
import {pyDumps, pyLoads, type Json} from "./pyjson.js";
import {permutation} from "./rng.js";
import {carried, newProgress, resumable, type EpochLine, type EpochRecord, type Progress,
  type TrainState} from "./state.js";

export const PREFIX_BATCH = 16;

export interface TrainConfig {
  epochs?: number;
  batchSize?: number;
  /** micro-batches of batchSize per update: an effective batch of accumulate × batchSize in one micro-batch's
   * memory (default: the bundle's, else 1) */
  accumulate?: number;
  lr?: number;
  seed?: number;
  schedule?: Schedule;
  warmup?: number;
  valSplit?: number;
  patience?: number;
  maxMinutes?: number;
  checkpointEvery?: number;
  resume?: boolean;
  split?: "auto" | "on" | "off";
  /** what runs record as the device (the Python runtime's --device) */
  device?: string;
  engine?: EngineOptions;
  /** where a split bundle's prefix features persist between runs (the browser: `indexedDbFeatureStore`) */
  featureStore?: FeatureStore;
  signal?: AbortSignal;
  onBatch?: (step: number, total: number, loss: number, accuracy: number | null) => void;
  onEpoch?: (record: EpochRecord) => void;
}

export type {EpochRecord};

export interface TrainSummary {
  stopped: "completed" | "early_stopping" | "time_limit";
  epochsCompleted: number;
  steps: number;
  trainSamples: number;
  valSamples: number;
  bestEpoch: number;
  records: EpochRecord[];
  seconds: number;
  notes: string[];
  split: boolean;
}

interface Resolved {
  epochs: number;
  batchSize: number;
  accumulate: number;
  lr: number | null;
  seed: number;
  schedule: Schedule;
  warmup: number;
  valSplit: number;
  patience: number | null;
  checkpointEvery: number;
  split: "auto" | "on" | "off";
}

function resolve(bundle: Bundle, config: TrainConfig): Resolved {
  const given = bundle.manifest.hyperparameters;
  const resolved: Resolved = {
    epochs: config.epochs ?? given.epochs ?? DEFAULT_EPOCHS, batchSize: config.batchSize ?? defaultBatch(bundle.manifest),
    accumulate: config.accumulate ?? defaultAccumulation(bundle.manifest),
    lr: config.lr ?? null, seed: config.seed ?? 0, schedule: config.schedule ?? "cosine", warmup: config.warmup ?? 0.05,
    valSplit: config.valSplit ?? 0.1, patience: config.patience ?? null, checkpointEvery: config.checkpointEvery ?? 20,
    split: config.split ?? "auto",
  };
  const whole = (v: number) => Number.isInteger(v) && v >= 1;
  if (!whole(resolved.epochs) || !whole(resolved.batchSize)) throw new ConfigError("--epochs and --batch-size must be at least 1.");
  if (!whole(resolved.accumulate) || resolved.accumulate > MAX_ACCUMULATION) {
    throw new ConfigError(`--accumulate must be between 1 and ${MAX_ACCUMULATION} micro-batches per update.`);
  }
  if (!SCHEDULES.includes(resolved.schedule)) throw new ConfigError(`unknown --schedule '${resolved.schedule}'; choose one of ${SCHEDULES.join(", ")}.`);
  if (!["auto", "on", "off"].includes(resolved.split)) throw new ConfigError(`unknown --split '${resolved.split}'; choose auto, on or off.`);
  if (!(resolved.valSplit >= 0 && resolved.valSplit < 1)) throw new ConfigError("--val-split must be in [0, 1).");
  if (resolved.lr !== null && !(resolved.lr > 0)) throw new ConfigError("--lr must be positive.");
  if (!whole(resolved.checkpointEvery)) throw new ConfigError("--checkpoint-every must be at least 1.");
  if (resolved.split === "on" && !bundle.manifest.split) throw new ConfigError("--split on needs a split bundle: export with a `head` or `last:K` preset.");
  return resolved;
}

/** What a resumed run must share with the interrupted one (the Python runtime's `run_settings`, key for key). */
function runSettings(cfg: Resolved, trainSize: number): Record<string, Json> {
  return {epochs: cfg.epochs, batch_size: cfg.batchSize, lr: cfg.lr, seed: cfg.seed, schedule: cfg.schedule,
    warmup: cfg.warmup, val_split: cfg.valSplit, augment: false, split: cfg.split, prefix_device: "onnxruntime-cpu",
    prefix_int8: false, engine: "onnxruntime", accumulate: cfg.accumulate, train_size: trainSize};
}

class Diverged extends Error {}

/** Prefix outputs of `data` in batches of min(16, batch size): what the suffix trains on; with `cache`, only the
 * samples it does not hold run through the prefix, and their features are stored. */
export async function prefixFeatures(ort: Ort, bundle: Bundle, data: Dataset, options: EngineOptions,
                                     statistics: Float32Array | null, batch = PREFIX_BATCH,
                                     cache: SealedFeatures | null = null): Promise<Dataset> {
  const m = bundle.manifest, split = m.split!, n = size(data);
  const width = split.boundary_shape.slice(1).reduce((a, b) => a * b, 1);
  const samples = new Float32Array(n * width);
  const keys = cache ? await sampleKeys(bundle, data) : [];
  const cached = cache ? await cache.get(keys, width) : new Array<Float32Array | null>(n).fill(null);
  cached.forEach((features, i) => features && samples.set(features, i * width));
  const missing = cached.flatMap((features, i) => (features ? [] : [i]));
  if (missing.length) {
    const session = await openSession(ort, await bundle.readGraph(split.prefix_model), options, split.prefix_model);
    for (let start = 0; start < missing.length; start += batch) {
      const index = missing.slice(start, start + batch);
      const x = batchInputs(data, index, m);
      const feeds: Record<string, any> = {[session.inputNames[0]]: x.data instanceof BigInt64Array
        ? new ort.Tensor("int64", x.data, x.dims) : new ort.Tensor("float32", x.data, x.dims)};
      if (statistics && session.inputNames.includes("bn_stats")) feeds.bn_stats = new ort.Tensor("float32", statistics, [statistics.length]);
      const out = (await session.run(feeds))[session.outputNames[0]].data as Float32Array;
      index.forEach((i, k) => samples.set(out.subarray(k * width, (k + 1) * width), i * width));
    }
    await session.release();
    await cache?.put(missing.map((i) => [keys[i], samples.slice(i * width, (i + 1) * width)]));
  }
  return {...data, samples, sampleShape: split.boundary_shape.slice(1), isImage: false, features: true};
}

export async function evaluateArrays(engine: PortableEngine, data: Dataset, bundle: Bundle,
                                     batchSize = 64): Promise<Metrics> {
  const m = bundle.manifest, n = size(data), width = m.labels.length;
  const logits = new Float32Array(n * width);
  let lossSum = 0;
  const per = data.targets.length / n;
  for (let start = 0; start < n; start += batchSize) {
    const index = Array.from({length: Math.min(batchSize, n - start)}, (_, i) => start + i);
    const out = await engine.logits(batchInputs(data, index, m));
    logits.set(out, start * width);
    lossSum += meanLoss(m.loss, out, data.targets.subarray(start * per, (start + index.length) * per), index.length) * index.length;
  }
  const loss = lossSum / n;
  if (m.loss === "cross_entropy") return classificationMetrics(logits, data.targets as Int32Array, m.labels, loss);
  return {n, loss, accuracy: null, per_class: {}, labels: m.labels, confusion: [], predictions: []};
}

export class Trainer {
  private readonly cfg: Resolved;
  private best: Float32Array | null = null;
  private notes: string[] = [];
  private engine!: PortableEngine;
  private readonly deviceName: string;

  constructor(private readonly ort: Ort, readonly bundle: Bundle, private readonly config: TrainConfig = {}) {
    this.cfg = resolve(bundle, config);
    this.deviceName = config.device ?? "cpu";
  }

  private async featureCache(statistics: Float32Array | null): Promise<SealedFeatures | null> {
    const store = this.config.featureStore;
    if (!store) return null;
    const providers = (this.config.engine?.executionProviders ?? ["cpu"]).map((p) => (typeof p === "string" ? p : p.name));
    const space = await featureSpace(this.bundle, statistics, providers);
    return new SealedFeatures(store, space, this.bundle.bundleId, await this.bundle.deviceMac());
  }

  async fit(data: Dataset): Promise<TrainSummary> {
    const started = performance.now();
    const m = this.bundle.manifest;
    if (m.loss === "cross_entropy" && new Set(data.targets).size < 2) {
      throw new DataError("the data holds a single class; a classifier needs examples of at least 2 classes.");
    }
    let [train, val] = split(data, this.cfg.valSplit, this.cfg.seed);
    const release = await this.bundle.storage.lock();
    try {
      await this.bundle.storage.sweep?.();
      const useSplit = this.cfg.split !== "off" && m.split !== null;
      if (useSplit) {
        const statistics = (await this.bundle.loadState()).statistics;
        const cache = await this.featureCache(statistics);
        train = await prefixFeatures(this.ort, this.bundle, train, this.config.engine ?? {}, statistics,
          Math.min(PREFIX_BATCH, this.cfg.batchSize), cache);
        if (val) val = await prefixFeatures(this.ort, this.bundle, val, this.config.engine ?? {}, statistics,
          Math.min(PREFIX_BATCH, this.cfg.batchSize), cache);
        if (cache) this.notes.push(...cache.notes);
      }
      this.engine = await PortableEngine.create(this.ort, this.bundle,
        this.bundle.graphs(useSplit, this.cfg.accumulate > 1), this.config.engine ?? {});
      try {
        const summary = await this.run(train, val, useSplit);
        summary.seconds = (performance.now() - started) / 1000;
        return summary;
      } finally {
        await this.engine.release();
      }
    } finally {
      await release();
    }
  }

  private async save(progress: Progress, withOptimizer = true): Promise<void> {
    const state = this.engine.state();
    state.progress = progress;
    state.best = withOptimizer ? this.best : null;
    if (!withOptimizer) state.optimizer = new Map();
    await this.bundle.saveState(state);
  }

  private async start(settings: Record<string, Json>): Promise<Progress> {
    let state: TrainState = await this.bundle.loadState();
    if (state.statistics) {
      const bytes = state.statistics.buffer.slice(state.statistics.byteOffset, state.statistics.byteOffset + state.statistics.byteLength);
      settings = {...settings, statistics: (await this.bundle.crypto.sha256(new Uint8Array(bytes))).slice(0, 16)};
    }
    let progress: Progress;
    if (this.config.resume) {
      progress = resumable(state.progress, settings);
      this.best = state.best;
      await this.writeLog(progress);
    } else {
      const previous = state.progress;
      if (previous && !previous.finished && previous.step) {
        this.notes.push(`the previous run stopped unfinished at epoch ${previous.epoch + 1}, step ${previous.step}; ` +
          "this new run starts from its parameters with a fresh optimizer (`--resume` would have continued it)");
      }
      const runId = Array.from(this.bundle.crypto.randomBytes(8), (b) => b.toString(16).padStart(2, "0")).join("");
      progress = newProgress(this.bundle.bundleId, pyDumps(settings, {sortKeys: true,
        floatKeys: new Set(["lr", "warmup", "val_split"])}), runId);
      state = carried(state);
    }
    this.engine.load(state);
    await this.save(progress);
    return progress;
  }

  private async run(train: Dataset, val: Dataset | null, useSplit: boolean): Promise<TrainSummary> {
    const started = performance.now();
    let progress = await this.start(runSettings(this.cfg, size(train)));
    const summary: TrainSummary = {stopped: "completed", epochsCompleted: 0, steps: 0, trainSamples: size(train),
      valSamples: val ? size(val) : 0, bestEpoch: -1, records: [], seconds: 0, notes: this.notes, split: useSplit};
    const deadline = this.config.maxMinutes ? started + this.config.maxMinutes * 60_000 : null;
    for (;;) {
      try {
        summary.stopped = await this.epochs(progress, train, val, summary, deadline, useSplit);
        break;
      } catch (error) {
        if (!(error instanceof Diverged)) throw error;
        progress = await this.recover();
      }
    }
    summary.epochsCompleted = progress.epoch;
    summary.steps = progress.step;
    summary.bestEpoch = progress.best_epoch;
    if (summary.stopped !== "time_limit") await this.finish(progress);
    return summary;
  }

  /** The run's result (the best epoch's parameters with early stopping) becomes the bundle's state, finished. */
  private async finish(progress: Progress): Promise<void> {
    progress.finished = 1;
    if (this.cfg.patience !== null && this.best) this.engine.load(carried(this.engine.state(), this.best));
    await this.save(progress, false);
  }

  private async recover(): Promise<Progress> {
    const state = await this.bundle.loadState();
    const progress = state.progress!;
    if (progress.nan_events >= 1) {
      throw new TrainingError("the loss became NaN or infinite again after lowering the LR; the last good state is " +
        "kept in the bundle: lower --lr further or check the data for outliers.");
    }
    progress.nan_events += 1;
    progress.lr_scale *= 0.1;
    this.engine.load(state);
    await this.save(progress);
    return progress;
  }

  private async epochs(progress: Progress, train: Dataset, val: Dataset | null, summary: TrainSummary,
                       deadline: number | null, useSplit: boolean): Promise<TrainSummary["stopped"]> {
    const cfg = this.cfg, m = this.bundle.manifest;
    const effective = cfg.batchSize * cfg.accumulate;  // samples per update
    const perEpoch = Math.ceil(size(train) / effective), total = cfg.epochs * perEpoch;
    const baseLr = cfg.lr ?? m.hyperparameters.lr;
    const currentLr = () => learningRate(baseLr * progress.lr_scale, progress.step, total, Math.trunc(cfg.warmup * total),
      cfg.schedule);
    while (progress.epoch < cfg.epochs) {
      if (cfg.patience !== null && progress.bad_epochs >= cfg.patience) return "early_stopping";
      const epochStarted = performance.now(), stats = new RunningStats(m.loss === "cross_entropy");
      const order = permutation([cfg.seed, progress.epoch], size(train));
      let lr = currentLr();
      for (let batch = progress.batch; batch < perEpoch; batch++) {
        if (this.config.signal?.aborted) {
          throw new CancelledError("training was cancelled; the last committed state is kept: continue with --resume.");
        }
        lr = currentLr();
        await this.update(train, order.slice(batch * effective, (batch + 1) * effective), lr, stats);
        progress.step += 1;
        progress.batch = batch + 1;
        this.config.onBatch?.(progress.step, total, stats.loss, stats.accuracy);
        if (progress.step % cfg.checkpointEvery === 0) await this.save(progress);
        if (deadline !== null && performance.now() > deadline) {
          await this.save(progress);
          return "time_limit";
        }
      }
      summary.records.push(await this.endEpoch(progress, val, stats, lr, (performance.now() - epochStarted) / 1000,
        useSplit));
    }
    if (cfg.patience !== null && progress.bad_epochs >= cfg.patience) return "early_stopping";
    return "completed";
  }

  /** One update from the effective batch `index`: micro-batches of batchSize accumulated, each weighted by its share
   * of the samples (the Python trainer's `_step`). */
  private async update(train: Dataset, index: number[], lr: number, stats: RunningStats): Promise<void> {
    const m = this.bundle.manifest, per = train.targets.length / size(train), micro = this.cfg.batchSize;
    for (let start = 0; start < index.length; start += micro) {
      const part = index.slice(start, start + micro), share = part.length / index.length;
      const targets = new (train.targets.constructor as any)(part.length * per) as Int32Array | Float32Array;
      part.forEach((i, k) => targets.set(train.targets.subarray(i * per, (i + 1) * per), k * per));
      const x = batchInputs(train, part, m);
      const last = start + micro >= index.length;
      const {loss, logits} = !last ? await this.engine.accumulate(x, targets, share)
        : index.length > micro ? await this.engine.trainStep(x, targets, lr, share)
          : await this.engine.trainStep(x, targets, lr);
      if (!Number.isFinite(loss)) throw new Diverged();
      stats.add(loss, logits, targets, part.length);
    }
  }

  private async endEpoch(progress: Progress, val: Dataset | null, stats: RunningStats, lr: number, seconds: number,
                         useSplit: boolean): Promise<EpochRecord> {
    const metrics = val ? await evaluateArrays(this.engine, val, this.bundle, this.cfg.batchSize) : null;
    progress.epoch += 1;
    progress.batch = 0;
    const record: EpochRecord = {epoch: progress.epoch, step: progress.step, lr, train_loss: stats.loss,
      train_accuracy: stats.accuracy, val_loss: metrics?.loss ?? null, val_accuracy: metrics?.accuracy ?? null, seconds};
    if (metrics) {
      const score = metrics.accuracy ?? -metrics.loss;
      if (score > progress.best_metric) {
        progress.best_metric = score;
        progress.best_epoch = progress.epoch;
        progress.bad_epochs = 0;
        this.best = this.engine.state().params;
      } else {
        progress.bad_epochs += 1;
      }
    }
    const line: EpochLine = {time: Date.now() / 1000, ...record, engine: this.engine.name, device: this.deviceName,
      split: useSplit, run: progress.run_id};
    progress.records.push(line);
    await this.save(progress); // the epoch's one commit: weights, best, progress and its log line
    await this.writeLog(progress);
    this.config.onEpoch?.(record);
    return record;
  }

  /** Append the run's committed epoch lines that the training log lacks (after a crash or a failed write). */
  private async writeLog(progress: Progress): Promise<void> {
    const existing = await this.bundle.storage.read(TRAIN_LOG, 1 << 30);
    const text = existing ? new TextDecoder().decode(existing) : "";
    const present = new Set<number>();
    for (const line of text.split("\n")) {
      try {
        const entry = pyLoads(line) as Record<string, Json>;
        if (entry && entry.run === progress.run_id) present.add(entry.epoch as number);
      } catch { /* a torn line is not an entry */ }
    }
    const missing = progress.records.filter((entry) => !present.has(entry.epoch));
    if (!missing.length) return;
    const torn = text.length > 0 && !text.endsWith("\n");
    const floats = new Set(["time", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds"]);
    await this.bundle.storage.append(TRAIN_LOG, (torn ? "\n" : "") +
      missing.map((entry) => pyDumps(entry as unknown as Json, {floatKeys: floats}) + "\n").join(""));
  }
}
