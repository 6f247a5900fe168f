/**
 * The page's side of the training worker (worker.ts): promises for requests, callbacks for progress.
 *
 *   const trainer = new WorkerTrainer(new URL("@edgeadapt/runtime/browser/worker", import.meta.url));
 *   await trainer.open({url: "/bundle/", name: "photos", ortUrl: "/ort/ort.all.min.mjs"});
 *   await trainer.train(images, {epochs: 5}, {onBatch: (step, total, loss) => …});
 */

import type {Pixels} from "../image.js";
import type {EpochRecord, TrainSummary} from "../trainer.js";

export interface LabelledPixels {
  pixels: Pixels;
  label?: string;
  name?: string;
}

export class WorkerTrainer {
  private readonly worker: Worker;
  private next = 0;
  private readonly pending = new Map<number, {resolve: (v: any) => void; reject: (e: Error) => void;
    onBatch?: (step: number, total: number, loss: number, accuracy: number | null) => void;
    onEpoch?: (record: EpochRecord) => void}>();

  constructor(workerUrl: URL | string) {
    this.worker = new Worker(workerUrl, {type: "module"});
    this.worker.onmessage = (event) => {
      const message = event.data, waiting = this.pending.get(message.id);
      if (!waiting) return;
      if (message.type === "batch") waiting.onBatch?.(message.step, message.total, message.loss, message.accuracy);
      else if (message.type === "epoch") waiting.onEpoch?.(message.record);
      else {
        this.pending.delete(message.id);
        if (message.type === "result") waiting.resolve(message.value);
        else waiting.reject(Object.assign(new Error(message.message), {user: message.user}));
      }
    };
  }

  private request(body: Record<string, unknown>, transfer: Transferable[] = [],
                  callbacks: {onBatch?: any; onEpoch?: any} = {}): Promise<any> {
    const id = this.next++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, {resolve, reject, ...callbacks});
      this.worker.postMessage({id, ...body}, transfer);
    });
  }

  open(options: {url: string; name: string; ortUrl: string; executionProviders?: string[]; threads?: number;
                 trustedKey?: string}): Promise<{labels: string[]; preset: string; backbone: string; progress: any}> {
    return this.request({type: "open", ...options});
  }

  train(images: LabelledPixels[], config: Record<string, unknown> = {},
        callbacks: {onBatch?: (step: number, total: number, loss: number, accuracy: number | null) => void;
                    onEpoch?: (record: EpochRecord) => void} = {}): Promise<TrainSummary> {
    return this.request({type: "train", images, config}, [], callbacks);
  }

  evaluate(images: LabelledPixels[]): Promise<any> {
    return this.request({type: "evaluate", images});
  }

  predict(images: LabelledPixels[], topK = 3): Promise<{input: string; top: {label: string; score: number}[]}[]> {
    return this.request({type: "predict", images, topK});
  }

  cancel(): void {
    this.worker.postMessage({type: "cancel"});
  }

  terminate(): void {
    this.worker.terminate();
  }
}
