"""Host commands: `export`, `zoo`, `demo`. Thin: parse, call the library, print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from edgeadapt.runtime.errors import ConfigError, EdgeAdaptError
from edgeadapt.runtime.manifest import LOSSES, OPTIMIZERS
from edgeadapt.toolchain.options import ExportOptions, HeadRequest
from edgeadapt.toolchain.presets import help_text

EXPORT = ExportOptions(out=Path())  # the one owner of `export`'s defaults: the options below read them
PRESET_HELP = "What trains (the rest is frozen): " + help_text()


def _need_host():
    try:
        import onnx  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        raise EdgeAdaptError(f"this command runs on the host and needs {exc.name}: pip install 'edgeadapt[host]'.") \
            from None


def _numbers(text: str | None, kind=int, what: str = "value") -> tuple | None:
    if not text:
        return None
    try:
        return tuple(kind(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{what} must be numbers separated by commas, got '{text}'.") from None


def _labels(path: Path | None) -> tuple[str, ...]:
    if path is None:
        return ()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise ConfigError(f"--labels file {path} cannot be read; give a UTF-8 text file with one label per line.") \
            from None
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def export(
    backbone: Optional[str] = typer.Argument(None, help="Zoo backbone (see `edgeadapt zoo`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle folder to write."),
    classes: Optional[int] = typer.Option(None, "--classes", help="New head with N classes."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="New head with the labels in FILE (one a line)."),
    keep_head: bool = typer.Option(False, "--keep-head", help="Keep the pretrained classifier (e.g. ImageNet)."),
    trainable: str = typer.Option(EXPORT.trainable, "--trainable", "-t", help=PRESET_HELP),
    profile: Optional[str] = typer.Option(None, "--profile",
                                          help="With --trainable auto or sparse: device profile to fit."),
    budget_mb: Optional[float] = typer.Option(None, "--budget-mb",
                                              help="With --trainable sparse: planned peak training MB to fit."),
    calibration: Optional[Path] = typer.Option(None, "--calibration",
                                               help="With --trainable sparse (or auto): labelled samples to score "
                                                    "layers and channels on (yours, or a proxy set)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="imagenet or pretrained (the zoo model's "
                                          "default where it has them), random, or a path to a weight file."),
    model: Optional[str] = typer.Option(None, "--model", help="Your model: package.module:factory."),
    head: str = typer.Option("classifier", "--head", help="With --model: the classifier's module name."),
    onnx_model: Optional[Path] = typer.Option(None, "--onnx", help="An existing ONNX model instead of a backbone."),
    head_params: Optional[str] = typer.Option(None, "--head-params", help="With --onnx: the head's initializers."),
    feature_output: Optional[str] = typer.Option(None, "--feature-output",
                                                 help="With --onnx: tensor to put a new linear head on."),
    vocab: Optional[Path] = typer.Option(None, "--vocab", help="With --onnx of a text model (int64 token ids): its "
                                         "WordPiece vocabulary, one token per line (shipped in the bundle)."),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="H,W (or one number) for images."),
    mean: Optional[str] = typer.Option(None, "--mean", help="With --model: per-channel mean."),
    std: Optional[str] = typer.Option(None, "--std", help="With --model: per-channel std."),
    loss: str = typer.Option(EXPORT.loss, "--loss", help=" | ".join(LOSSES) + "."),
    optimizer: str = typer.Option(EXPORT.optimizer, "--optimizer", help=" | ".join(OPTIMIZERS) + "."),
    lr: Optional[float] = typer.Option(None, "--lr", help="The head's default learning rate (adamw 1e-3, sgd 1e-2)."),
    backbone_lr_ratio: Optional[float] = typer.Option(
        None, "--backbone-lr-ratio", help="Backbone tensors learn at this times --lr (default 0.1 for pretrained "
        "weights, 1 for random ones)."),
    weight_decay: float = typer.Option(EXPORT.weight_decay, "--weight-decay",
                                       help="AdamW weight decay (biases and norm parameters: none)."),
    decay_norms: bool = typer.Option(EXPORT.decay_norms, "--decay-norms",
                                     help="Decay biases and norm parameters too (as ONNX Runtime training does)."),
    bn: str = typer.Option(EXPORT.bn, "--bn", help="BatchNorm policy: fold | affine | ort."),
    ort_format: bool = typer.Option(EXPORT.ort_format, "--ort-format",
                                    help="Also write .ort models for minimal builds (with the plugin)."),
    validate: bool = typer.Option(EXPORT.validate, "--validate/--no-validate", help="Check against torch."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out."),
    sign: Optional[Path] = typer.Option(None, "--sign", help="Sign the bundle with this ed25519 private key."),
    split: bool = typer.Option(EXPORT.split, "--split/--no-split",
                               help="head/last:K: also write prefix.onnx + suffix_* (adds the prefix's weights)."),
    seed: int = typer.Option(EXPORT.seed, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads",
                                          help="Threads for torch and validation (default: half the cores, <= 4)."),
    list_params: bool = typer.Option(False, "--list-params", help="Print parameter names and shapes, then stop."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest summary as JSON."),
):
    """Export a backbone + head as a bundle: portable training step, forward graph, state, manifest."""
    _need_host()
    from edgeadapt.models.registry import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec
    from edgeadapt.toolchain.export import export_bundle, list_parameters

    size = _numbers(input_size, what="--input-size")
    user_spec = None
    if onnx_model and (mean or std):
        user_spec = BackboneSpec(name="onnx", input_size=(), mean=_numbers(mean, float, "--mean") or (0.0,),
                                 std=_numbers(std, float, "--std") or (1.0,), feature_dim=0, head="", blocks=())
    if model:
        height, width = (size * 2 if len(size) == 1 else size) if size else (224, 224)
        user_spec = BackboneSpec(name=model, input_size=(3, height, width),
                                 mean=_numbers(mean, float, "--mean") or IMAGENET_MEAN,
                                 std=_numbers(std, float, "--std") or IMAGENET_STD,
                                 feature_dim=0, head=head, blocks=())
    options = ExportOptions(out=out, backbone=backbone, model=model,
                            head=HeadRequest(classes, _labels(labels), keep_head), trainable=trainable,
                            weights=weights, input_size=None if model else size, loss=loss, optimizer=optimizer,
                            lr=lr, backbone_lr_ratio=backbone_lr_ratio, weight_decay=weight_decay,
                            decay_norms=decay_norms, bn=bn, ort_format=ort_format, validate=validate,
                            force=force, seed=seed, user_spec=user_spec, onnx=onnx_model,
                            head_params=tuple(p.strip() for p in (head_params or "").split(",") if p.strip()),
                            feature_output=feature_output, vocab=vocab, sign=sign, split=split, profile=profile,
                            budget_mb=budget_mb, calibration=calibration, threads=threads)
    if list_params:
        for name, shape in list_parameters(options):
            typer.echo(f"{name}\t{list(shape)}")
        return
    result = export_bundle(options, on_stage=None if as_json else _stage_printer())
    m = result.manifest
    if as_json:
        typer.echo(json.dumps({"out": str(result.out), "seconds": result.seconds, "validation": m.validation,
                               "trainable_params": m.trainable_params, "frozen_params": m.frozen_params}))
        return
    typer.echo(f"exported {m.backbone} ({m.preset}, {len(m.labels)} outputs) to {result.out} in {result.seconds:.1f}s: "
               f"{m.trainable_params:,} trainable / {m.frozen_params:,} frozen parameters")
    for note in m.notes:
        if note.startswith(("trainable auto", "trainable sparse")):
            typer.echo(note)
        if note.startswith("random weights"):
            typer.echo(f"warning: {note}", err=True)
    if m.validation:
        v = m.validation
        against = "the source ONNX model (train and eval graphs agree)" if opts_onnx(m) else "torch"
        text = f"validated against {against}: eval max |Δ| {v['eval_max_abs_diff']:.1e}, loss rel Δ " \
               f"{v['loss_rel_diff']:.1e}"
        if "grad_max_rel_diff" in v:
            text += f", worst gradient rel Δ {v['grad_max_rel_diff']:.1e}"
        typer.echo(text)


def _stage_printer():
    """Each export stage as it starts, with the time so far (an export can take a minute)."""
    import time

    started = time.perf_counter()
    return lambda stage: typer.echo(f"[{time.perf_counter() - started:5.1f}s] {stage} ...")


def opts_onnx(manifest) -> bool:
    return manifest.backbone.startswith("onnx:")


def zoo():
    """List the registered backbones."""
    _need_host()
    from rich.table import Table

    from edgeadapt.models.registry import backbone_names, get_entry
    from edgeadapt.runtime.cli import console

    table = Table("backbone", "input", "features", "head", "weights", "description")
    for name in backbone_names():
        spec = get_entry(name).spec
        weights = ", ".join(f"{w} (default)" if i == 0 else w for i, w in enumerate(spec.weights)) or "random only"
        table.add_row(name, "x".join(map(str, spec.input_size)), str(spec.feature_dim), spec.head, weights,
                      spec.description)
    console().print(table)


def demo(
    workdir: Path = typer.Option(Path("edgeadapt-demo"), "--workdir", help="Where the bundle and data go."),
    epochs: int = typer.Option(3, "--epochs"),
):
    """Export the real MobileNetV2 (ImageNet), adapt it on real texture photos, and report what happened."""
    _need_host()
    from edgeadapt.toolchain.demo import run_demo

    typer.echo("exporting mobilenet_v2 (ImageNet weights) with a new 4-class head, preset head ...")
    from edgeadapt.runtime.cli import progress_bar

    with progress_bar(epochs) as on_batch:
        report = run_demo(workdir, epochs, on_batch)
    summary = report.train_summary
    typer.echo(f"bundle: {report.bundle} (export {report.export_seconds:.1f}s)")
    typer.echo(f"held-out accuracy on {report.test_samples} texture patches: {report.accuracy_before:.1%} before "
               f"training, {report.accuracy_after:.1%} after {summary.epochs_completed} epochs "
               f"({summary.steps} steps, {summary.loop_seconds:.1f}s of training; chance is 25%)")
    for d in report.deployed:
        typer.echo(f"deployed {d.format}: {d.path} (max |Δ| vs the bundle's forward graph {d.max_abs_diff:.1e})")
    top = report.prediction.top[0]
    typer.echo(f"predict {report.prediction.input}: {top['label']} ({top['score']:.2f})")


def register(app: typer.Typer) -> None:
    app.command()(export)
    app.command()(zoo)
    app.command()(demo)
