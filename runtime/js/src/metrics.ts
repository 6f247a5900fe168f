/**
 * Losses (mean reduction, PyTorch's definitions, in float64 from the float32 logits), the learning-rate schedules,
 * and classification metrics: the Python runtime's `losses.py`, `schedule.py` and `metrics.py`.
 */

export const SCHEDULES = ["cosine", "linear", "constant"] as const;
export type Schedule = typeof SCHEDULES[number];

/** Linear warm-up, then constant, linear decay or cosine decay to zero. */
export function learningRate(base: number, step: number, total: number, warmup: number, schedule: Schedule): number {
  if (warmup && step < warmup) return base * (step + 1) / warmup;
  if (schedule === "constant" || total <= warmup) return base;
  const progress = Math.min(1.0, (step - warmup) / Math.max(1, total - warmup));
  if (schedule === "linear") return base * (1.0 - progress);
  return base * 0.5 * (1.0 + Math.cos(Math.PI * progress));
}

export function meanLoss(loss: string, logits: Float32Array, targets: Int32Array | Float32Array, count: number): number {
  const width = logits.length / count;
  let total = 0;
  for (let i = 0; i < count; i++) {
    if (loss === "cross_entropy") {
      const row = logits.subarray(i * width, (i + 1) * width);
      const max = row.reduce((a, b) => Math.max(a, b), -Infinity);
      let sum = 0;
      for (const v of row) sum += Math.exp(v - max);
      total += -((row[targets[i]] - max) - Math.log(sum));
      continue;
    }
    for (let j = 0; j < width; j++) {
      const z = logits[i * width + j], t = targets[i * width + j];
      total += loss === "bce_with_logits" ? Math.max(z, 0) - z * t + Math.log1p(Math.exp(-Math.abs(z)))
        : loss === "mse" ? (z - t) ** 2 : Math.abs(z - t);
    }
  }
  return total / (loss === "cross_entropy" ? count : count * width);
}

export function argmax(logits: Float32Array, i: number, width: number): number {
  let best = 0;
  for (let j = 1; j < width; j++) if (logits[i * width + j] > logits[i * width + best]) best = j;
  return best;
}

/** Sample-weighted mean loss and accuracy over the batches of one epoch. */
export class RunningStats {
  count = 0;
  private lossSum = 0;
  private correct = 0;
  constructor(private readonly classify: boolean) {}

  add(loss: number, logits: Float32Array, targets: Int32Array | Float32Array, count: number): void {
    this.count += count;
    this.lossSum += loss * count;
    if (!this.classify) return;
    const width = logits.length / count;
    for (let i = 0; i < count; i++) if (argmax(logits, i, width) === targets[i]) this.correct++;
  }

  get loss(): number {
    return this.lossSum / Math.max(this.count, 1);
  }

  get accuracy(): number | null {
    return this.classify ? this.correct / Math.max(this.count, 1) : null;
  }
}

export interface Metrics {
  n: number;
  loss: number;
  accuracy: number | null;
  per_class: Record<string, number>;
  labels: string[];
  confusion: number[][];
  predictions: number[];
}

export function classificationMetrics(logits: Float32Array, targets: Int32Array, labels: string[],
                                      loss: number): Metrics {
  const n = targets.length, width = labels.length;
  const confusion = labels.map(() => new Array<number>(width).fill(0));
  const predictions = Array.from({length: n}, (_, i) => argmax(logits, i, width));
  predictions.forEach((p, i) => confusion[targets[i]][p]++);
  const perClass: Record<string, number> = {};
  confusion.forEach((row, i) => {
    const total = row.reduce((a, b) => a + b, 0);
    if (total) perClass[labels[i]] = row[i] / total;
  });
  const correct = predictions.filter((p, i) => p === targets[i]).length;
  return {n, loss, accuracy: correct / n, per_class: perClass, labels, confusion, predictions};
}
