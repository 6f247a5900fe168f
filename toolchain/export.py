"""`edgeadapt export` as a chain of small typed steps: build → ONNX → training artifacts → validate → bundle."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import onnx

from edgeadapt import __version__
from edgeadapt.models.registry import BackboneSpec
from edgeadapt.runtime.atomic import check_output_dir, staged_dir
from edgeadapt.runtime.errors import ConfigError, UnknownNameError
from edgeadapt.runtime.manifest import (
    LOSSES,
    MANIFEST_NAME,
    OPTIMIZERS,
    SCHEMA_VERSION,
    InputSpec,
    Manifest,
    sha256_file,
)
from edgeadapt.toolchain.bn import BN_POLICIES
from edgeadapt.toolchain.build import BuiltModel, HeadRequest, build_user_model, build_zoo_model
from edgeadapt.toolchain.validate import ValidationReport

DEFAULT_LR = {"adamw": {"head": 1e-3, "bias": 1e-3, "scratch": 1e-3, "full": 1e-4, "other": 3e-4},
              "sgd": {"head": 1e-2, "bias": 1e-2, "scratch": 1e-2, "full": 1e-3, "other": 3e-3}}


@dataclass(frozen=True)
class ExportOptions:
    out: Path
    backbone: str | None = None  # a zoo name
    model: str | None = None  # package.module:factory
    head: HeadRequest = field(default_factory=HeadRequest)
    trainable: str = "head"
    weights: str | None = None
    input_size: tuple[int, ...] | None = None
    loss: str = "cross_entropy"
    optimizer: str = "adamw"
    lr: float | None = None
    weight_decay: float = 0.01
    bn: str = "fold"
    ort_format: bool = False
    validate: bool = True
    force: bool = False
    seed: int = 0
    user_spec: BackboneSpec | None = None  # input size, mean/std and head name of a --model or --onnx
    onnx: Path | None = None  # an existing ONNX model
    head_params: tuple[str, ...] = ()  # with --onnx: the head's initializers
    feature_output: str | None = None  # with --onnx: the tensor to put a new head on
    sign: Path | None = None  # ed25519 private key: write manifest.sig
    split: bool = True  # also emit prefix.onnx + suffix_* artifacts when the frozen part is a prefix
    profile: str | None = None  # with trainable="auto": the device profile (name or TOML file) to fit
    auto_notes: tuple[str, ...] = ()  # why `auto` chose the preset (recorded in the manifest)
    auto_batch: int | None = None


@dataclass(frozen=True)
class ExportResult:
    out: Path
    manifest: Manifest
    seconds: float
    validation: ValidationReport | None


def check_options(opts: ExportOptions) -> None:
    if sum(x is not None for x in (opts.backbone, opts.model, opts.onnx)) != 1:
        raise ConfigError("name exactly one model: a zoo BACKBONE, --model package.module:factory or --onnx FILE.")
    for value, known, what in ((opts.loss, LOSSES, "loss"), (opts.optimizer, OPTIMIZERS, "optimizer"),
                               (opts.bn, BN_POLICIES, "--bn policy")):
        if value not in known:
            raise UnknownNameError(f"unknown {what} '{value}'; choose one of {', '.join(known)}.")
    if opts.lr is not None and not opts.lr > 0:
        raise ConfigError(f"--lr must be positive, got {opts.lr}.")


def build(opts: ExportOptions) -> BuiltModel:
    import torch

    from edgeadapt.models.layers import calibrate_batchnorm, init_weights

    torch.manual_seed(opts.seed)
    if opts.model:
        built = build_user_model(opts.model, opts.head, opts.user_spec)
    else:
        built = build_zoo_model(opts.backbone, opts.head, None if opts.trainable == "scratch" else opts.weights)
    if opts.input_size:
        built.spec = replace(built.spec, input_size=_full_input_size(opts.input_size, built.spec.input_size))
    if opts.trainable == "scratch":
        init_weights(built.module)
        built.weights = "random"
    if built.weights == "random":
        # Frozen BN statistics of 0/1 normalise nothing: activations of a fresh network vanish layer by layer.
        calibrate_batchnorm(built.module, built.spec.input_size, seed=opts.seed)
        built.notes.append("random init; BN statistics calibrated on standard-normal inputs at export, then frozen")
    return built


def _full_input_size(given: tuple[int, ...], default: tuple[int, ...]) -> tuple[int, ...]:
    if len(default) == 3 and len(given) in (1, 2):
        height, width = (given[0], given[0]) if len(given) == 1 else given
        if min(height, width) < 16:
            raise ConfigError(f"--input-size {height}x{width} is too small for a CNN; use 32 or more.")
        return (default[0], height, width)
    if len(given) != len(default):
        raise ConfigError(f"--input-size needs {len(default)} numbers for this model, got {len(given)}.")
    return tuple(given)


def resolve_lists(built: BuiltModel, opts: ExportOptions, graph: onnx.ModelProto) -> tuple[list, list, list]:
    """(trainable, frozen parameters, frozen buffers/constants): every initializer lands in exactly one list."""
    from edgeadapt.toolchain.presets import resolve_trainable

    params = [name for name, _ in built.module.named_parameters()]
    wanted = resolve_trainable(opts.trainable, params, built.spec.head, built.spec.blocks)
    initializers = [init.name for init in graph.graph.initializer]
    in_graph = set(initializers)
    trainable = [n for n in wanted if n in in_graph]
    unused = [n for n in params if n not in in_graph]
    if unused:
        built.notes.append(f"parameters unused by the forward pass, left out: {', '.join(unused[:5])}")
    if not trainable:
        raise ConfigError(f"--trainable {opts.trainable} selects no parameter used by the model; pick another preset.")
    head = [n for n in params if n == built.spec.head or n.startswith(built.spec.head + ".")]
    if built.head_is_new and not set(head) <= set(trainable):
        raise ConfigError("the new head is randomly initialised but not trainable; include it in --trainable.")
    chosen, param_set = set(trainable), set(params)
    frozen = [n for n in initializers if n not in chosen and n in param_set]
    buffers = [n for n in initializers if n not in chosen and n not in param_set]
    return trainable, frozen, buffers


def list_parameters(opts: ExportOptions) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of the model `opts` describes (for writing --trainable patterns)."""
    check_options(opts)
    return [(name, tuple(p.shape)) for name, p in build(opts).module.named_parameters()]


def default_lr(opts: ExportOptions) -> float:
    if opts.lr is not None:
        return opts.lr
    table = DEFAULT_LR[opts.optimizer]
    return table.get(opts.trainable, table["other"])


def export_bundle(opts: ExportOptions) -> ExportResult:
    """Run the whole chain; the bundle appears at `opts.out` complete, or not at all."""
    from edgeadapt.toolchain.artifacts import generate
    from edgeadapt.toolchain.onnx_graph import OUTPUT_NAME, export_eval_onnx
    from edgeadapt.toolchain.split import build_split as make_split
    from edgeadapt.toolchain.validate import validate, validate_split

    started = time.perf_counter()
    check_options(opts)
    out = Path(opts.out)
    check_output_dir(out, opts.force)
    if opts.onnx:
        from edgeadapt.toolchain.onnx_export import export_onnx_source

        return export_onnx_source(opts, started)
    if opts.trainable == "auto":
        return _export_auto(opts, started)
    built = build(opts)
    with staged_dir(out) as staging:
        graph = export_eval_onnx(built.module, built.spec.input_size, opts.bn, staging / "inference_base.onnx")
        (staging / "inference_base.onnx").unlink()
        trainable, frozen, buffers = resolve_lists(built, opts, graph)
        def make_artifacts(model, train_names, frozen_names, prefix=""):
            generate(model, train_names, frozen_names, opts.loss, opts.optimizer, opts.weight_decay, staging,
                     opts.ort_format, OUTPUT_NAME, prefix)

        make_artifacts(graph, trainable, frozen + buffers)
        split = make_split(graph, trainable, frozen + buffers, staging, make_artifacts) if opts.split else None
        report = validate(built.module, staging, built.spec.input_size, opts.loss, trainable,
                          check_gradients=opts.bn != "ort") if opts.validate else None
        if split and opts.validate:
            validate_split(staging, split, built.spec.input_size, opts.loss, len(built.labels))
        manifest = make_manifest(built, opts, graph, (trainable, frozen, buffers), staging, report, split)
        write_manifest(staging, manifest, opts.sign)
    return ExportResult(out, manifest, time.perf_counter() - started, report)


def _export_auto(opts: ExportOptions, started: float) -> ExportResult:
    from edgeadapt.devices.profiles import get_profile
    from edgeadapt.toolchain.auto import choose

    if not opts.profile:
        raise ConfigError("--trainable auto needs --profile (a device profile name or TOML file) to fit.")
    preset, batch, reasons = choose(opts, get_profile(opts.profile))
    result = export_bundle(replace(opts, trainable=preset, auto_notes=tuple(reasons), auto_batch=batch))
    return replace(result, seconds=time.perf_counter() - started)


def write_manifest(staging: Path, manifest: Manifest, sign_key: Path | None) -> None:
    (staging / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    if sign_key is not None:
        from edgeadapt.runtime.signing import sign_bundle

        sign_bundle(staging, sign_key)


def _input_spec(spec: BackboneSpec) -> InputSpec:
    is_image = len(spec.input_size) == 3
    channels = ("L" if spec.input_size[0] == 1 else spec.channels or "RGB") if is_image else ""
    return InputSpec(name="input", shape=[-1, *spec.input_size], dtype="float32", layout="NCHW" if is_image else "NC",
                     channels=channels, mean=list(spec.mean), std=list(spec.std),
                     resize=list(spec.input_size[1:]) if is_image else [])


def make_manifest(built: BuiltModel, opts: ExportOptions, graph: onnx.ModelProto, lists: tuple, staging: Path,
                  report: ValidationReport | None, split=None) -> Manifest:
    import onnxruntime

    trainable, frozen, buffers = lists
    sizes = {name: p.numel() for name, p in built.module.named_parameters()}
    notes = list(built.notes) + [f"trainable auto for {opts.profile}: " + "; ".join(opts.auto_notes)] \
        if opts.auto_notes else list(built.notes)
    notes += ["training graph uses batch statistics for BN (ORT default): train and eval differ"] \
        if opts.bn == "ort" else []
    return Manifest(
        schema_version=SCHEMA_VERSION, edgeadapt_version=__version__,
        backbone=opts.backbone or opts.model, weights=built.weights, preset=opts.trainable, bn_policy=opts.bn,
        input=_input_spec(built.spec), output_name="logits", labels=built.labels, loss=opts.loss,
        optimizer=opts.optimizer,
        hyperparameters={"lr": default_lr(opts), "batch_size": float(opts.auto_batch or 32), "epochs": 5.0,
                         "weight_decay": opts.weight_decay if opts.optimizer == "adamw" else 0.0},
        trainable=trainable, frozen=frozen, buffers=buffers,
        trainable_params=sum(sizes[n] for n in trainable), frozen_params=sum(sizes[n] for n in frozen),
        opset=next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), ir_version=graph.ir_version,
        onnxruntime_version=onnxruntime.__version__,
        files={f.name: sha256_file(f) for f in sorted(staging.iterdir()) if f.is_file()},
        validation=report.as_dict() if report else {},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), notes=notes, split=split)
