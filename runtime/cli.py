"""Device commands: `inspect`, `train`, `evaluate`, `predict`, `deploy`. Thin: parse, call the library, print.
Nothing here imports torch."""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import typer

from edgeadapt.runtime.engines import ENGINES
from edgeadapt.runtime.manifest import DEFAULT_BATCH, DEFAULT_EPOCHS, default_accumulation, default_batch
from edgeadapt.runtime.trainer import TrainConfig

TRAIN = TrainConfig()  # the one owner of `train`'s defaults: the options below read them
ENGINE_HELP = " | ".join(ENGINES) + "."


def console():
    """Rich console; piped output gets a wide fixed width instead of 80 columns."""
    from rich.console import Console

    probe = Console()
    return probe if probe.is_terminal else Console(width=160)


@contextlib.contextmanager
def progress_bar(epochs: int):
    """A rich progress bar fed by the trainer's per-batch callback: the epoch, the step of all, running metrics.
    Until the first step it says what is being prepared (loading data, a split bundle's prefix features)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"),
               TextColumn("{task.fields[metrics]}"), TimeElapsedColumn())
    with Progress(*columns, transient=False) as bar:
        # the clock starts with training
        task = bar.add_task("preparing data (and prefix features)", total=None, count="", metrics="", start=False)

        def on_batch(step: int, total: int, loss: float, accuracy: float | None) -> None:
            if not bar.tasks[0].started:
                bar.start_task(task)
            per_epoch = max(1, total // max(1, epochs))
            metrics = f"loss {loss:.4f}" + (f" acc {accuracy:.1%}" if accuracy is not None else "")
            bar.update(task, completed=step, total=total, count=f"{step}/{total}", metrics=metrics,
                       description=f"epoch {min(epochs, (step - 1) // per_epoch + 1)}/{epochs}")

        yield on_batch


def inspect(bundle: Path = typer.Argument(..., help="Bundle folder."),
            as_json: bool = typer.Option(False, "--json")):
    """Show what a bundle holds: backbone, preset, parameter counts, BN policy, files, versions, memory plan."""
    from edgeadapt.devices.planner import plan_summary
    from edgeadapt.runtime.bundle import Bundle
    from edgeadapt.runtime.inspect import describe

    opened = Bundle.open(bundle)  # hashes every file once
    info = {**describe(opened), **plan_summary(opened)}
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    from rich.table import Table

    table = Table("field", "value", title=f"bundle {bundle}", show_lines=False)
    for key, value in info.items():
        for row in _rows(key, value):
            table.add_row(*row)
    console().print(table)


def _number(value) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, float) and abs(value) < 1e-2:
        return f"{value:.2e}"
    return str(value)


def _rows(key: str, value) -> list[tuple[str, str]]:
    """Nested values (validation, memory plans, files) as one readable line per entry."""
    if not isinstance(value, dict):
        return [(key, str(value))]
    if key == "files":
        return [(key, "")] + [(f"  {name}", f"{size:,} bytes") for name, size in value.items()]
    parts = [f"{k} {_number(v)}" for k, v in value.items()]
    return [(key, ", ".join(parts) or "-")]


def train(
    bundle: Path = typer.Argument(..., help="Bundle folder (updated in place)."),
    data: Path = typer.Argument(..., help="Folder of class subfolders of images (text: .txt, speech: .wav), .npz "
                                          "(x, y) or .csv (text: text,label; or .jsonl)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help=f"Default: the bundle's ({DEFAULT_EPOCHS})."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=f"Default: the bundle's ({DEFAULT_BATCH}, or "
                                             "the one --trainable auto chose)."),
    accumulate: Optional[int] = typer.Option(None, "--accumulate", help="Micro-batches of --batch-size per update "
                                             "(the effective batch, in one micro-batch's memory). Default: the "
                                             "bundle's (1, or what --trainable auto chose)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Default: the bundle's (the head's; groups scale it)."),
    seed: int = typer.Option(TRAIN.seed, "--seed"),
    schedule: str = typer.Option(TRAIN.schedule, "--schedule", help="cosine | linear | constant (after warm-up)."),
    warmup: float = typer.Option(TRAIN.warmup, "--warmup", help="Warm-up as a fraction of all steps."),
    val_split: float = typer.Option(TRAIN.val_split, "--val-split"),
    patience: Optional[int] = typer.Option(None, "--patience", help="Early stopping after N epochs without gain."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Stop cleanly (resumable) after this."),
    augment: bool = typer.Option(TRAIN.augment, "--augment/--no-augment", help="Light image augmentation."),
    engine: str = typer.Option(TRAIN.engine, "--engine", help=ENGINE_HELP),
    device: str = typer.Option(TRAIN.device, "--device", help="cpu, cuda[:N], gpu, npu, dml, coreml, qnn, … "
                                                               "(`edgeadapt devices` lists this machine's)."),
    threads: Optional[int] = typer.Option(None, "--threads"),
    checkpoint_every: int = typer.Option(TRAIN.checkpoint_every, "--checkpoint-every", help="Steps between "
                                         "checkpoints."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run exactly."),
    split: str = typer.Option(TRAIN.split, "--split", help="auto | on | off: train only the suffix of a split "
                              "bundle."),
    prefix_device: str = typer.Option(TRAIN.prefix_device, "--prefix-device",
                                      help="Where the frozen prefix runs: onnxruntime-cpu, openvino-cpu|gpu|npu, …"),
    prefix_int8: bool = typer.Option(False, "--prefix-int8", help="Use the INT8 prefix (edgeadapt quantize-prefix)."),
    cache_mb: int = typer.Option(TRAIN.cache_mb, "--cache-mb", help="Feature cache limit."),
    profile: Optional[str] = typer.Option(None, "--profile", help="Device profile: refuse batches over its budget."),
    auto_batch: bool = typer.Option(False, "--auto-batch", help="With --profile: the largest batch that fits."),
    trusted_key: Optional[Path] = typer.Option(None, "--trusted-key", help="Refuse bundles not signed by this key."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    adabn: bool = typer.Option(False, "--adabn", help="First re-estimate the BN statistics on the data (AdaBN)."),
    adabn_scope: str = typer.Option("all", "--adabn-scope", help="all | prefix: which BN statistics --adabn sets."),
):
    """Train the bundle on local data (no torch needed)."""
    from edgeadapt.runtime.trainer import Trainer

    opened = _bundle(bundle, trusted_key)
    if profile:
        from edgeadapt.devices.fit import batch_for_profile

        wanted = batch_size or default_batch(opened.manifest)
        fit = batch_for_profile(bundle, profile, wanted, auto_batch, threads, split,
                                accumulate or default_accumulation(opened.manifest), engine, device)
        batch_size, accumulate, threads = fit.batch_size, fit.accumulate, fit.threads
        typer.echo(f"profile {profile}: {fit.describe()}")

    config = TrainConfig(epochs=epochs, batch_size=batch_size, accumulate=accumulate, lr=lr, seed=seed,
                         schedule=schedule, warmup=warmup,
                         val_split=val_split, patience=patience, max_minutes=max_minutes, augment=augment,
                         engine=engine, device=device, threads=threads, checkpoint_every=checkpoint_every,
                         resume=resume, split=split, prefix_device=prefix_device, prefix_int8=prefix_int8,
                         cache_mb=cache_mb, adabn=adabn_scope if adabn else "")
    trainer = Trainer(opened, config)
    try:
        with (contextlib.nullcontext(None) if quiet else progress_bar(trainer.config.epochs)) as on_batch:
            trainer.on_batch = on_batch
            summary = trainer.fit(data)
    except KeyboardInterrupt:
        typer.echo(interrupted(bundle, data), err=True)
        raise typer.Exit(130) from None
    _print_summary(summary, bundle)


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def interrupted(bundle: Path, data: Path) -> str:
    """What Ctrl-C kept: the state of the last checkpoint, and how to continue from it."""
    from edgeadapt.runtime.bundle import Bundle

    progress = Bundle.open(bundle).load_state().progress
    if progress is None or progress.finished or progress.step == 0:
        return "interrupted before the first checkpoint: the bundle's state is as it was."
    return (f"interrupted: the bundle keeps its last checkpoint (epoch {progress.epoch + 1}, step {progress.step}); "
            f"continue this run with `edgeadapt train {bundle} {data} --resume` and the same options (a plain "
            "`train` starts a new run from these parameters).")


def _print_summary(summary, bundle: Path) -> None:
    final = summary.final
    typer.echo(f"{summary.stopped}: {plural(summary.epochs_completed, 'epoch')}, {plural(summary.steps, 'step')} in "
               f"{summary.loop_seconds:.1f}s of training ({summary.seconds:.1f}s with data loading) on "
               f"{summary.train_samples} samples ({summary.val_samples} held out for validation), engine "
               f"{summary.engine}")
    if final is not None:
        parts = [f"train loss {final.train_loss:.4f}"]
        parts += [f"train acc {final.train_accuracy:.1%}"] if final.train_accuracy is not None else []
        parts += [f"val loss {final.val_loss:.4f}"] if final.val_loss is not None else []
        parts += [f"val acc {final.val_accuracy:.1%}"] if final.val_accuracy is not None else []
        typer.echo("last epoch: " + ", ".join(parts))
    if summary.skipped_files:
        typer.echo(f"skipped {len(summary.skipped_files)} unreadable file(s), e.g. {summary.skipped_files[0][0]}: "
                   f"{summary.skipped_files[0][1]}")
    for note in summary.notes:
        typer.echo(f"note: {note}")
    if summary.stopped == "time_limit":
        typer.echo(f"time limit reached: continue with `edgeadapt train {bundle} DATA --resume` and the same options.")


def adapt_bn(bundle: Path = typer.Argument(..., help="Bundle folder (its BN statistics are updated in place)."),
             data: Path = typer.Argument(..., help="Local samples, labels unused: images (any folders), .npz or .csv."),
             scope: str = typer.Option("all", "--scope", help="all: every BN; prefix: the frozen prefix's only."),
             batch_size: int = typer.Option(DEFAULT_BATCH, "--batch-size"),
             threads: Optional[int] = typer.Option(None, "--threads"), as_json: bool = typer.Option(False, "--json"),
             trusted_key: Optional[Path] = typer.Option(None, "--trusted-key",
                                                        help="Refuse bundles not signed by this key.")):
    """AdaBN: re-estimate the frozen BatchNorm statistics on the device's data, forward only (no labels)."""
    from edgeadapt.runtime.adabn import adapt_bn as run

    result = run(_bundle(bundle, trusted_key), data, scope, batch_size, threads)
    if as_json:
        typer.echo(json.dumps(asdict(result)))
        return
    typer.echo(f"AdaBN ({result.scope}): {result.statistics} BN statistics re-estimated from {result.samples} samples "
               f"in {result.batches} batches ({result.seconds:.1f}s); relative change {result.relative_change:.3f}")


def evaluate(bundle: Path = typer.Argument(...), data: Path = typer.Argument(...),
             batch_size: int = typer.Option(64, "--batch-size"), as_json: bool = typer.Option(False, "--json"),
             engine: str = typer.Option("auto", "--engine", help=ENGINE_HELP),
             device: str = typer.Option("cpu", "--device"),
             trusted_key: Optional[Path] = typer.Option(None, "--trusted-key",
                                                        help="Refuse bundles not signed by this key.")):
    """Accuracy, per-class accuracy and confusion matrix of the bundle's current model on labelled data."""
    from edgeadapt.runtime.inference import evaluate as run

    bundle_obj = _bundle(bundle, trusted_key)
    metrics = run(bundle_obj, data, batch_size, engine=engine, device=device)
    result = metrics.as_dict(bundle_obj.manifest.labels)
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"n={metrics.n} loss={metrics.loss:.4f}" + (f" accuracy={metrics.accuracy:.2%}"
                                                            if metrics.accuracy is not None else ""))
    if metrics.skipped:
        typer.echo(f"skipped {len(metrics.skipped)} unreadable file(s), not counted in n: " +
                   "; ".join(f"{file}: {reason}" for file, reason in metrics.skipped[:5]))
    for label, accuracy in metrics.per_class.items():
        typer.echo(f"  {label:>20}: {accuracy:.1%}")
    if metrics.confusion:
        typer.echo(confusion_table(metrics.confusion, bundle_obj.manifest.labels))


def confusion_table(confusion: list[list[int]], labels: list[str]) -> str:
    """The confusion matrix with its labels: rows the true class, columns the predicted one (by their numbers)."""
    width = max(5, *(len(str(v)) + 1 for row in confusion for v in row))
    name = max(len(label) for label in labels)
    lines = ["confusion (rows: true label, columns: predicted, numbered as the rows):",
             " " * (name + 8) + "".join(f"{i:>{width}}" for i in range(len(labels)))]
    lines += [f"  {i:>3} {label:>{name}} " + "".join(f"{v:>{width}}" for v in row)
              for i, (label, row) in enumerate(zip(labels, confusion))]
    return "\n".join(lines)


def _bundle(path: Path, trusted_key: Path | None = None):
    from edgeadapt.runtime.bundle import Bundle

    return Bundle.open(path, trusted_key=trusted_key)


def predict(bundle: Path = typer.Argument(...),
            inputs: List[Path] = typer.Argument(..., help="Images, .npz, .csv; text bundles: .txt, .csv, .jsonl; "
                                                "speech: .wav (files or folders)."),
            top_k: int = typer.Option(5, "--top-k"),
            engine: str = typer.Option("auto", "--engine", help=ENGINE_HELP),
            device: str = typer.Option("cpu", "--device", help="cpu, cuda, gpu, npu, …"),
            as_json: bool = typer.Option(False, "--json"),
            trusted_key: Optional[Path] = typer.Option(None, "--trusted-key",
                                                       help="Refuse bundles not signed by this key.")):
    """Top-k labels for each input."""
    from edgeadapt.runtime.inference import predict as run

    predictions = run(_bundle(bundle, trusted_key), inputs, top_k, engine, device)
    if as_json:
        typer.echo(json.dumps([asdict(p) for p in predictions]))
        return
    for p in predictions:
        typer.echo(f"{p.input}: " + (", ".join(f"{t['label']} {t['score']:.3f}" for t in p.top) or
                                     f"skipped, {p.error}"))


def deploy(bundle: Path = typer.Argument(...),
           fmt: str = typer.Option("onnx", "--format", help="onnx | openvino."),
           out: Path = typer.Option(..., "--out", help="File (model.onnx / model.xml) or folder."),
           trusted_key: Optional[Path] = typer.Option(None, "--trusted-key",
                                                      help="Refuse bundles not signed by this key.")):
    """Write the adapted model for inference, checked against the eval graph."""
    from edgeadapt.runtime.deploy import deploy as run

    result = run(_bundle(bundle, trusted_key), fmt, out)
    typer.echo(f"wrote {result.path} ({result.format}); max |Δ| vs the forward graph {result.max_abs_diff:.1e}, "
               f"same top-1: {result.same_predictions}")


def keygen(key: Path = typer.Argument(..., help="Private key file to create; the public key goes to KEY.pub.")):
    """Create an ed25519 key pair for signing bundles (`export --sign KEY`, `--trusted-key KEY.pub`)."""
    from edgeadapt.runtime.signing import generate_keypair

    public = generate_keypair(key)
    typer.echo(f"private key {key} (keep it on the host), public key {public} (ship it with the app)")


def pack(bundle: Path = typer.Argument(...), archive: Path = typer.Argument(..., help="Archive to write (.tar.gz)."),
         target: str = typer.Option("device", "--for", help="device: every exported file; app: without ONNX "
                                    "Runtime training's artifacts (what the JavaScript runtime and the portable "
                                    "engines read).")):
    """Pack a bundle into one file for transfer to a device or an app."""
    from edgeadapt.runtime.archive import pack as run
    from edgeadapt.runtime.errors import UnknownNameError

    if target not in ("device", "app"):
        raise UnknownNameError(f"--for {target} is not a pack target; use --for device or --for app.")
    written = run(bundle, archive, for_app=target == "app")
    typer.echo(f"wrote {written} ({written.stat().st_size / 1e6:.1f} MB)")


def unpack(archive: Path = typer.Argument(...), out: Path = typer.Argument(..., help="Bundle folder to create."),
           force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT (not while it trains)."),
           trusted_key: Optional[Path] = typer.Option(None, "--trusted-key",
                                                      help="Refuse archives not signed by this key.")):
    """Unpack a bundle archive safely (exactly its manifest's files, bounded, verified)."""
    from edgeadapt.runtime.archive import unpack as run

    bundle = run(archive, out, force, trusted_key)
    typer.echo(f"unpacked {bundle.manifest.backbone} ({bundle.manifest.preset}) to {bundle.path}")


def quantize_prefix(bundle: Path = typer.Argument(...),
                    data: Path = typer.Argument(..., help="Local samples to calibrate on (as for train)."),
                    samples: int = typer.Option(128, "--samples", help="How many samples to calibrate on.")):
    """Quantize a split bundle's frozen prefix to INT8 (static, calibrated on local data): prefix_int8.onnx."""
    from edgeadapt.runtime.quantize import quantize_prefix as run

    result = run(_bundle(bundle), data, samples)
    typer.echo(f"wrote {result.path}: {result.float_mb:.1f} MB -> {result.int8_mb:.1f} MB, calibrated on "
               f"{result.samples} samples; features differ by {result.feature_rel_diff:.1%} (relative)")


DATA_FORMATS = ("DATA is one of: a folder of class subfolders of images (photos/cat/1.jpg, photos/dog/7.png: the "
                "subfolder names are the labels; PNG, JPEG, BMP, GIF, WebP, TIFF); an .npz with x (uint8 images "
                "N×H×W[×C], or float rows N×features) and y (N label names or numbers); or a UTF-8 .csv with one "
                "sample a row: the features, then the label (regression: the targets), an optional header. Images "
                "are resized and normalised as the bundle's manifest says. Text bundles: a CSV with text and label "
                "columns (a header names them), JSONL lines {\"text\": ..., \"label\": ...}, or class subfolders "
                "of .txt files (one sample each), tokenized with the bundle's vocabulary. Speech bundles: class "
                "subfolders of .wav files (PCM, any rate: resampled, padded or cut to the clip length).")


def register(app: typer.Typer) -> None:
    app.command("quantize-prefix")(quantize_prefix)
    app.command("adapt-bn")(adapt_bn)
    app.command(help=f"{train.__doc__}\n\n{DATA_FORMATS}")(train)
    for command in (inspect, evaluate, predict, deploy, keygen, pack, unpack):
        app.command()(command)
