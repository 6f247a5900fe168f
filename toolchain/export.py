"""`edgeadapt export` as one chain of typed stages for every source (zoo backbone, `--model` factory, `--onnx`
file): Source → TrainingPlan (toolchain/plan.py: what trains and how) → Artifacts → ValidationReport → Manifest
(see stages.py). Only planning reads the export's options; the later stages take the source and the plan."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgeadapt import __version__
from edgeadapt.devices.profiles import get_profile
from edgeadapt.models.layers import calibrate_batchnorm, init_weights
from edgeadapt.runtime.atomic import check_output_dir, staged_dir
from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.errors import ConfigError, ExportError, UnknownNameError
from edgeadapt.runtime.manifest import (
    LOSSES,
    MANIFEST_NAME,
    OPTIMIZERS,
    SCHEMA_VERSION,
    Manifest,
    sha256_file,
)
from edgeadapt.toolchain.artifacts import write_artifacts
from edgeadapt.toolchain.auto import HEADROOM, choose
from edgeadapt.toolchain.bn import BN_POLICIES
from edgeadapt.toolchain.build import BuiltModel, build_user_model, build_zoo_model
from edgeadapt.toolchain.inputs import examples, input_spec
from edgeadapt.toolchain.onnx_source import onnx_source
from edgeadapt.toolchain.options import ExportOptions, HeadRequest  # noqa: F401 (the export API's names)
from edgeadapt.toolchain.plan import DEFAULT_BATCH, TrainingPlan, make_plan
from edgeadapt.toolchain.presets import preset_of, resolve_lists
from edgeadapt.toolchain.stages import Artifacts, Source
from edgeadapt.toolchain.torch_export import export_eval_onnx
from edgeadapt.toolchain.validate import ValidationReport, validate


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
    if opts.backbone_lr_ratio is not None and not opts.backbone_lr_ratio >= 0:
        raise ConfigError(f"--backbone-lr-ratio must be 0 or more, got {opts.backbone_lr_ratio}.")
    if not opts.weight_decay >= 0:
        raise ConfigError(f"--weight-decay must be 0 or more, got {opts.weight_decay}.")


def build(opts: ExportOptions) -> BuiltModel:
    """The torch model of a zoo backbone or a `--model` factory, head attached, weights loaded."""
    torch.manual_seed(opts.seed)
    if opts.model:
        built = build_user_model(opts.model, opts.head, opts.user_spec)
    else:
        built = build_zoo_model(opts.backbone, opts.head, zoo_weights(opts))
    if opts.input_size:
        built.spec = replace(built.spec, input_size=_full_input_size(opts.input_size, built.spec.input_size))
    if preset_of(opts.trainable).random_init:
        init_weights(built.module)
        built.weights = "random"
    if built.weights == "random" and not preset_of(opts.trainable).random_init and opts.weights is None and \
            not opts.model:
        built.notes.append(RANDOM_WARNING.format(name=opts.backbone) +
                           " (pass --weights PATH; features of a random backbone transfer little)")
    if preset_of(opts.trainable).adapters:
        built.lora = _add_lora(built, opts.trainable)
    if built.weights == "random":
        # Frozen BN statistics of 0/1 normalise nothing: activations of a fresh network vanish layer by layer.
        calibrate_batchnorm(built.module, built.spec.input_size, seed=opts.seed)
        built.notes.append("random init" + ("; BN statistics calibrated on standard-normal inputs at export, then "
                                            "frozen" if _has_batchnorm(built.module) else ""))
    return built


def _add_lora(built: BuiltModel, preset: str):
    """Adapters on the layers `preset` names (seeded with the export's seed, after the weights are loaded)."""
    from edgeadapt.toolchain import lora

    request = lora.parse(preset)
    names = lora.target_modules(built.module, request, built.spec.lora_targets, built.spec.head)
    return lora.add_adapters(built.module, request, names)


def _has_batchnorm(module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


RANDOM_WARNING = "random weights: {name} has no pretrained weights in the zoo"


def zoo_weights(opts: ExportOptions) -> str | None:
    """What a zoo backbone loads: nothing for `scratch`, else the named weights, else its first (pretrained) ones."""
    if preset_of(opts.trainable).random_init:
        return None
    if opts.weights is not None:
        return opts.weights
    from edgeadapt.models.registry import get_entry

    return next(iter(get_entry(opts.backbone).spec.weights), None)


def _full_input_size(given: tuple[int, ...], default: tuple[int, ...]) -> tuple[int, ...]:
    if len(default) == 3 and len(given) in (1, 2):
        height, width = (given[0], given[0]) if len(given) == 1 else given
        if min(height, width) < 16:
            raise ConfigError(f"--input-size {height}x{width} is too small for a CNN; use 32 or more.")
        return (default[0], height, width)
    if len(given) != len(default):
        raise ConfigError(f"--input-size needs {len(default)} numbers for this model, got {len(given)}.")
    return tuple(given)


def torch_source(opts: ExportOptions) -> Source:
    """Stage 1 for torch models: the eval graph exported with the BN policy applied."""
    built = build(opts)
    sparse = preset_of(opts.trainable).scored
    spec, assets = input_spec(built.spec)
    example = examples(spec, assets, 2, opts.seed)
    with tempfile.TemporaryDirectory() as tmp:
        graph = export_eval_onnx(built.module, example, None if sparse else opts.bn,
                                 Path(tmp) / "eval.onnx")
    in_graph = {init.name for init in graph.graph.initializer}
    params = [name for name, _ in built.module.named_parameters() if name in in_graph]
    unused = [name for name, _ in built.module.named_parameters() if name not in in_graph]
    if unused:
        built.notes.append(f"parameters unused by the forward pass, left out: {', '.join(unused[:5])}")
    head = [n for n in params if n == built.spec.head or n.startswith(built.spec.head + ".")]
    choice = _choose_sparse(opts, built, graph, params, head) if sparse else None
    if choice is not None:
        graph, params = choice.graph.graph, choice.graph.params
        in_graph = {init.name for init in graph.graph.initializer}

    merged = _merged_graph(built, example, opts.bn) if built.lora else None

    def reference(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return built.module.eval()(torch.from_numpy(x)).numpy()
    return Source(graph, params, [n for n in in_graph if n not in set(params)], built.labels, spec,
                  opts.backbone or opts.model, built.weights, head, built.head_is_new, reference, built.module,
                  built.spec.blocks, built.spec.head, list(built.notes),
                  parts=choice.graph.parts if choice else {}, sparse=choice, assets=assets, lora=built.lora,
                  merged_graph=merged)


def _merged_graph(built: BuiltModel, example: np.ndarray, bn: str):
    """The eval graph of the model with its adapters merged (the graph `deploy` bakes plain weights into)."""
    from edgeadapt.toolchain.lora import merged_module

    with tempfile.TemporaryDirectory() as tmp:
        return export_eval_onnx(merged_module(built.module), example, bn, Path(tmp) / "merged.onnx")


def _choose_sparse(opts: ExportOptions, built: BuiltModel, raw, params: list[str], head: list[str]):
    """`--trainable sparse`: score on the calibration data, pick what fits the budget, split the chosen convs."""
    from edgeadapt.toolchain.sparse import calibration_arrays, choose_sparse

    if built.spec.layout not in ("NCHW", "NC"):
        raise ConfigError("--trainable sparse scores the convolution and linear channels of image and feature-row "
                          "models; for text and speech use lora:R (or last:K, bias, head).")
    budget = sparse_budget(opts)
    spec, assets = input_spec(built.spec)
    x, y = calibration_arrays(opts.calibration, spec, built.labels, opts.loss, opts.seed, assets)
    return choose_sparse(raw, built.module, params, head, built.head_is_new, built.spec.blocks, x, y, opts, budget,
                         opts.auto_batch or DEFAULT_BATCH)


def sparse_budget(opts: ExportOptions) -> float:
    if opts.budget_mb is not None:
        if not opts.budget_mb > 0:
            raise ConfigError(f"--budget-mb must be positive, got {opts.budget_mb}.")
        return float(opts.budget_mb)
    if opts.profile:
        return HEADROOM * get_profile(opts.profile).memory_budget_mb
    raise ConfigError("--trainable sparse needs a memory budget: --budget-mb MB or --profile DEVICE.")


def list_parameters(opts: ExportOptions) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of the model `opts` describes (for writing --trainable patterns)."""
    check_options(opts)
    return [(name, tuple(p.shape)) for name, p in build(opts).module.named_parameters()]


def make_source(opts: ExportOptions) -> Source:
    return onnx_source(opts) if opts.onnx else torch_source(opts)


def export_threads(requested: int | None) -> int:
    """Threads for torch and the validation sessions: half the usable cores, at most 4, so that an export shares a
    busy machine instead of spinning against it (MobileNetV2 on 2 cores beside a 2-thread job: 6-7 s with 1 thread,
    14-24 s with 2)."""
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores // 2))


def export_bundle(opts: ExportOptions, on_stage: Callable[[str], None] | None = None) -> ExportResult:
    """Run the whole chain; the bundle appears at `opts.out` complete, or not at all. `on_stage` hears each stage
    as it starts (the CLI prints them)."""
    started = time.perf_counter()
    check_options(opts)
    out = Path(opts.out)
    check_output_dir(out, opts.force)
    stage = on_stage or (lambda _: None)
    previous_threads = torch.get_num_threads()
    threads = export_threads(opts.threads)
    torch.set_num_threads(threads)
    try:
        return _export(opts, out, stage, started, threads)
    finally:
        torch.set_num_threads(previous_threads)


def _export(opts: ExportOptions, out: Path, stage: Callable[[str], None], started: float,
            threads: int) -> ExportResult:
    stage(f"building {opts.backbone or opts.model or Path(opts.onnx).name} and its eval graph"
          + (" (scoring the calibration samples)" if preset_of(opts.trainable).scored else ""))
    source = make_source(opts)
    if preset_of(opts.trainable).searched:
        stage(f"choosing what trains for {opts.profile}")
        opts, source = _auto_source(opts, source)
    plan = make_plan(opts, source, resolve_lists(source, opts.trainable))  # the later stages see only the plan
    with staged_dir(out) as staging:
        stage("writing the training step, forward graph and state")
        for name, content in source.assets.items():
            (staging / name).write_bytes(content)
        artifacts = write_artifacts(source, plan, staging)
        manifest = make_manifest(source, plan, artifacts, staging)
        write_manifest(staging, manifest, None)
        if opts.validate:
            stage("validating against " + ("torch (float64)" if source.torch_module is not None else "the source"))
        report = validate(source, plan, Bundle(staging, manifest), threads) if opts.validate else None
        if report is not None and report.ort_training_failure:
            artifacts = _without_ort_training(artifacts, staging, report.ort_training_failure)
            manifest = make_manifest(source, plan, artifacts, staging)
        manifest = replace(manifest, validation=report.as_dict() if report else {})
        write_manifest(staging, manifest, opts.sign)
    return ExportResult(out, manifest, time.perf_counter() - started, report)


def _without_ort_training(artifacts: Artifacts, staging: Path, failure: str) -> Artifacts:
    """The optional plugin's graphs failed validation: the bundle goes without them."""
    from edgeadapt.toolchain import ort_training

    ort_training.remove_all(staging)
    return replace(artifacts, ort_training_missing=f"its graphs failed validation ({failure})")


def _adapted_sources(opts: ExportOptions):
    """preset -> the source built with that preset's new tensors (LoRA), built once each."""
    built: dict[str, Source] = {}

    def adapted(preset: str) -> Source:
        if preset not in built:
            built[preset] = make_source(replace(opts, trainable=preset))
        return built[preset]
    return adapted


def _choose_auto(opts: ExportOptions, source: Source, adapted) -> ExportOptions:
    if not opts.profile:
        raise ConfigError("--trainable auto needs --profile (a device profile name or TOML file) to fit.")
    preset, batch, accumulate, reasons = choose(source, opts, get_profile(opts.profile), adapted=adapted)
    return replace(opts, trainable=preset, auto_notes=tuple(reasons), auto_batch=batch, auto_accumulate=accumulate)


def _auto_source(opts: ExportOptions, source: Source) -> tuple[ExportOptions, Source]:
    """`--trainable auto`: the chosen preset, and the source it needs (sparse rewrites the graph; if no selection
    fits after all, the next strategy in the ranking)."""
    adapted = _adapted_sources(opts)
    chosen = _choose_auto(opts, source, adapted)
    if preset_of(chosen.trainable).adapters:
        return chosen, adapted(chosen.trainable)
    if not preset_of(chosen.trainable).scored:
        return chosen, source
    try:
        return chosen, make_source(chosen)
    except ConfigError as exc:
        preset, batch, accumulate, reasons = choose(source, opts, get_profile(opts.profile),
                                                    skip=(chosen.trainable,), adapted=adapted)
        notes = (f"sparse: {exc}", *reasons)
        return replace(opts, trainable=preset, auto_notes=notes, auto_batch=batch, auto_accumulate=accumulate), source


def write_manifest(staging: Path, manifest: Manifest, sign_key: Path | None) -> None:
    (staging / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    if sign_key is not None:
        from edgeadapt.runtime.signing import sign_bundle  # optional: cryptography only when signing

        sign_bundle(staging, sign_key)


def _notes(source: Source, plan: TrainingPlan, artifacts: Artifacts) -> list[str]:
    notes = list(source.notes)
    if plan.reasons:
        notes.append(f"trainable auto for {plan.profile}: " + "; ".join(plan.reasons))
    if source.sparse is not None:
        spec = source.sparse.spec
        partial = sum(1 for layer in spec.layers if 0 < len(layer.channels) < layer.total_channels)
        what = (f"{len(spec.layers)} weight tensors ({partial} by channels) from {spec.cut} on, the head and the "
                "biases after the cut") if spec.cut else "the head alone (the budget affords nothing more)"
        notes.append(f"trainable sparse: {what}; planned {spec.planned_mb} MB of {spec.budget_mb} MB at batch "
                     f"{spec.batch_size} (`edgeadapt inspect` shows the scores)")
    if plan.bn_policy == "ort":
        notes.append("training graph uses batch statistics for BN (ORT default): train and eval differ")
    if artifacts.ort_training_missing:
        notes.append(f"no ort-training artifacts: {artifacts.ort_training_missing}")
    return notes


def make_manifest(source: Source, plan: TrainingPlan, artifacts: Artifacts, staging: Path) -> Manifest:
    sizes = {init.name: int(np.prod(init.dims)) for init in source.graph.graph.initializer}
    lists, spec = plan.lists, plan.training
    sealed = _sealed_files(staging)  # reads every graph: once per manifest
    return Manifest(
        schema_version=SCHEMA_VERSION, edgeadapt_version=__version__, backbone=source.backbone,
        weights=source.weights, preset=plan.preset, bn_policy=plan.bn_policy, input=source.input,
        output_name="logits", labels=source.labels, loss=spec.loss, optimizer=spec.optimizer,
        hyperparameters=spec.hyperparameters(), param_groups=spec.groups,
        trainable=lists.trainable, frozen=lists.frozen, buffers=lists.buffers,
        trainable_params=sum(sizes[n] for n in lists.trainable), frozen_params=sum(sizes[n] for n in lists.frozen),
        opset=artifacts.portable.opset, ir_version=artifacts.portable.ir_version,
        onnxruntime_version=_onnxruntime_version(),
        files={f.name: sha256_file(f) for f in sealed},
        sizes={f.name: f.stat().st_size for f in sealed},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), notes=_notes(source, plan, artifacts),
        portable=artifacts.portable, split=artifacts.split, memory=artifacts.memory,
        sparse=source.sparse.spec if source.sparse else None, lora=artifacts.lora)


def _sealed_files(staging: Path) -> list[Path]:
    """The files a bundle lists and hashes; its graphs hold all their data (the device reads nothing outside)."""
    from edgeadapt.runtime.onnx_wire import graph_interface

    files = [f for f in sorted(staging.iterdir()) if f.is_file() and f.name != MANIFEST_NAME]
    for f in files:
        if f.suffix == ".onnx" and graph_interface(f.read_bytes()).external_data:
            raise ExportError(f"{f.name} would keep tensor data in external files, which a bundle may not reference; "
                              "export a model under 2 GB, or load the source's external data first.")
    return files


def _onnxruntime_version() -> str:
    from edgeadapt.runtime.ort import onnxruntime_module

    return onnxruntime_module().__version__
