#!/usr/bin/env node
/**
 * `edgeadapt-js train|evaluate|predict BUNDLE DATA`: the Python CLI's commands, flags and data formats on Node
 * (class folders of images, .npz, CSV; text: .txt class folders, CSV/JSONL tables; speech: .wav class folders), so
 * the same commands train a bundle on both runtimes. User errors print one
 * line and exit 2; SIGINT stops at the next batch, keeping the last checkpoint.
 */

import {parseArgs} from "node:util";
import {EdgeAdaptError} from "../errors.js";
import {evaluate, predict} from "../inference.js";
import {Trainer, type TrainConfig, type TrainSummary} from "../trainer.js";
import {loadDataset, loadInputs, nodeOrt, openBundle} from "./index.js";

const USAGE = `usage: edgeadapt-js train BUNDLE DATA [--epochs N] [--batch-size N] [--accumulate N] [--lr X] [--seed N] [--schedule cosine|linear|constant]
                    [--warmup F] [--val-split F] [--patience N] [--max-minutes X] [--checkpoint-every N] [--resume]
                    [--split auto|on|off] [--threads N] [--trusted-key PEM] [--json] [--quiet]
       edgeadapt-js evaluate BUNDLE DATA [--batch-size N] [--threads N] [--trusted-key PEM] [--json]
       edgeadapt-js predict BUNDLE INPUT... [--top-k N] [--threads N] [--trusted-key PEM] [--json]
DATA: a folder of class subfolders of images (needs sharp), an .npz with x and y, or a .csv of features…, label;
      text bundles: a CSV or JSONL of text,label or class subfolders of .txt files; speech bundles: class subfolders
      of .wav files.`;

const OPTIONS = {
  epochs: {type: "string"}, "batch-size": {type: "string"}, accumulate: {type: "string"}, lr: {type: "string"}, seed: {type: "string"},
  schedule: {type: "string"}, warmup: {type: "string"}, "val-split": {type: "string"}, patience: {type: "string"},
  "max-minutes": {type: "string"}, "checkpoint-every": {type: "string"}, resume: {type: "boolean"},
  split: {type: "string"}, threads: {type: "string"}, "trusted-key": {type: "string"}, json: {type: "boolean"},
  quiet: {type: "boolean"}, "top-k": {type: "string"}, help: {type: "boolean", short: "h"},
} as const;

class UsageError extends EdgeAdaptError {}

function number(values: Record<string, unknown>, key: string, integer = false): number | undefined {
  const text = values[key] as string | undefined;
  if (text === undefined) return undefined;
  const value = Number(text);
  if (text.trim() === "" || !Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new UsageError(`--${key} takes ${integer ? "a whole number" : "a number"}, not '${text}'.`);
  }
  return value;
}

function printSummary(summary: TrainSummary, bundle: string): void {
  const plural = (n: number, word: string) => `${n} ${word}${n === 1 ? "" : "s"}`;
  console.log(`${summary.stopped}: ${plural(summary.epochsCompleted, "epoch")}, ${plural(summary.steps, "step")} in ` +
    `${summary.seconds.toFixed(1)}s on ${summary.trainSamples} samples (${summary.valSamples} held out for ` +
    `validation)${summary.split ? ", split: suffix trained on prefix features" : ""}`);
  const last = summary.records[summary.records.length - 1];
  if (last) {
    const parts = [`train loss ${last.train_loss.toFixed(4)}`];
    if (last.train_accuracy !== null) parts.push(`train acc ${(100 * last.train_accuracy).toFixed(1)}%`);
    if (last.val_loss !== null) parts.push(`val loss ${last.val_loss.toFixed(4)}`);
    if (last.val_accuracy !== null) parts.push(`val acc ${(100 * last.val_accuracy).toFixed(1)}%`);
    console.log(`last epoch: ${parts.join(", ")}`);
  }
  for (const note of summary.notes) console.log(`note: ${note}`);
  if (summary.stopped === "time_limit") {
    console.log(`time limit reached: continue with \`edgeadapt-js train ${bundle} DATA --resume\` and the same options.`);
  }
}

async function main(argv: string[]): Promise<number> {
  const {values, positionals} = parseArgs({args: argv, options: OPTIONS, allowPositionals: true, strict: true});
  const [command, bundlePath, ...rest] = positionals;
  if (values.help || !command) {
    console.log(USAGE);
    return values.help ? 0 : 2;
  }
  if (!["train", "evaluate", "predict"].includes(command)) throw new UsageError(`unknown command '${command}'; choose train, evaluate or predict.`);
  if (!bundlePath || !rest.length) throw new UsageError(`${command} needs BUNDLE and ${command === "predict" ? "INPUT..." : "DATA"}; see --help.`);
  const threads = number(values, "threads", true);
  const engine = threads ? {threads} : {};
  const bundle = await openBundle(bundlePath, {trustedKey: values["trusted-key"]});
  const ort = await nodeOrt();
  if (command === "train") {
    const controller = new AbortController();
    process.once("SIGINT", () => controller.abort());
    const config: TrainConfig = {
      epochs: number(values, "epochs", true), batchSize: number(values, "batch-size", true),
      accumulate: number(values, "accumulate", true), lr: number(values, "lr"),
      seed: number(values, "seed", true), schedule: values.schedule as TrainConfig["schedule"],
      warmup: number(values, "warmup"), valSplit: number(values, "val-split"), patience: number(values, "patience", true),
      maxMinutes: number(values, "max-minutes"), checkpointEvery: number(values, "checkpoint-every", true),
      resume: values.resume ?? false, split: values.split as TrainConfig["split"], engine, signal: controller.signal,
      onBatch: values.quiet || values.json || !process.stderr.isTTY ? undefined
        : (step, total, loss) => process.stderr.write(`\rstep ${step}/${total} loss ${loss.toFixed(4)}`),
    };
    const trainer = new Trainer(ort, bundle, config);
    const summary = await trainer.fit(await loadDataset(rest[0], bundle));
    if (config.onBatch) process.stderr.write("\n");
    if (values.json) console.log(JSON.stringify(summary));
    else printSummary(summary, bundlePath);
    return 0;
  }
  if (command === "evaluate") {
    const metrics = await evaluate(ort, bundle, await loadDataset(rest[0], bundle), engine,
      number(values, "batch-size", true) ?? 64);
    if (values.json) {
      const {predictions: _, ...shown} = metrics;
      console.log(JSON.stringify(shown));
    } else {
      console.log(`n=${metrics.n} loss=${metrics.loss.toFixed(4)}` +
        (metrics.accuracy !== null ? ` accuracy=${(100 * metrics.accuracy).toFixed(2)}%` : ""));
    }
    return 0;
  }
  const predictions = await predict(ort, bundle, await loadInputs(rest, bundle), number(values, "top-k", true) ?? 5, engine);
  if (values.json) console.log(JSON.stringify(predictions));
  else for (const p of predictions) console.log(`${p.input}: ${p.top.map((t) => `${t.label} ${t.score.toFixed(3)}`).join(", ")}`);
  return 0;
}

main(process.argv.slice(2)).then((code) => { process.exitCode = code; }, (error) => {
  if (error instanceof EdgeAdaptError || (error as NodeJS.ErrnoException).code === "ERR_PARSE_ARGS_UNKNOWN_OPTION" ||
      (error as NodeJS.ErrnoException).code === "ERR_PARSE_ARGS_INVALID_OPTION_VALUE") {
    console.error(`error: ${(error as Error).message}`);
    process.exitCode = 2;
    return;
  }
  console.error(`internal error: ${(error as Error).stack ?? error}`);
  process.exitCode = 1;
});
