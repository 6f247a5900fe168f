"""The export chain for `--onnx model.onnx`: prepare the graph → resolve lists → artifacts → validate → bundle."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime

from edgeadapt import __version__
from edgeadapt.runtime.atomic import staged_dir
from edgeadapt.runtime.engine import Engine
from edgeadapt.runtime.errors import ConfigError
from edgeadapt.runtime.manifest import SCHEMA_VERSION, InputSpec, Manifest, sha256_file
from edgeadapt.toolchain.build import resolve_labels
from edgeadapt.toolchain.onnx_source import OUTPUT_NAME, OnnxSource, prepare, reference_logits
from edgeadapt.toolchain.presets import resolve_trainable


def _trainable(preset: str, source: OnnxSource) -> list[str]:
    if preset == "head":
        return list(source.head)
    if preset.startswith("last:") or preset == "scratch":
        raise ConfigError(f"--trainable {preset} needs a torch model (block boundaries, initialisers); with --onnx use "
                          "head, bias, full or patterns over initializer names.")
    chosen = set(resolve_trainable(preset, source.params, "\0", ())) | set(source.head)
    return [n for n in source.params if n in chosen]


def _input_spec(opts, shape: tuple[int, ...]) -> InputSpec:
    spec = opts.user_spec
    is_image = len(shape) == 3
    mean = list(spec.mean) if spec else ([0.485, 0.456, 0.406] if is_image and shape[0] == 3 else [0.0])
    std = list(spec.std) if spec else ([0.229, 0.224, 0.225] if is_image and shape[0] == 3 else [1.0])
    channels = ("RGB" if shape[0] == 3 else "L") if is_image else ""
    return InputSpec("input", [-1, *shape], "float32", "NCHW" if is_image else "NC", channels, mean, std,
                     list(shape[1:]) if is_image else [])


def export_onnx_source(opts, started: float):
    from edgeadapt.toolchain.artifacts import generate
    from edgeadapt.toolchain.export import ExportResult, default_lr, write_manifest
    from edgeadapt.toolchain.validate import validate_against

    labels = None if opts.head.keep_head else resolve_labels(opts.head, 0)[0]
    source = prepare(Path(opts.onnx), list(opts.head_params), opts.feature_output,
                     len(labels) if labels and opts.feature_output else None, opts.seed)
    labels = labels or [f"class_{i}" for i in range(source.num_outputs)]
    if len(labels) != source.num_outputs:
        raise ConfigError(f"the model has {source.num_outputs} outputs but {len(labels)} labels were given; with "
                          "--head-params use --keep-head (or --labels with one name per output).")
    trainable = _trainable(opts.trainable, source)
    frozen = [n for n in source.params if n not in set(trainable)]
    with staged_dir(Path(opts.out)) as staging:
        generate(source.model, trainable, frozen + source.buffers, opts.loss, opts.optimizer, opts.weight_decay,
                 staging, opts.ort_format, OUTPUT_NAME)
        head = {n: Engine(staging, staging / "checkpoint", with_optimizer=False).parameter(n) for n in source.head}
        report = validate_against(lambda x: reference_logits(Path(opts.onnx), x, opts.feature_output, head),
                                  staging, source.input_shape, opts.loss, len(labels)) if opts.validate else None
        sizes = {i.name: int(np.prod(i.dims)) for i in source.model.graph.initializer}
        manifest = Manifest(
            schema_version=SCHEMA_VERSION, edgeadapt_version=__version__, backbone=f"onnx:{Path(opts.onnx).name}",
            weights="onnx", preset=opts.trainable, bn_policy="fold", input=_input_spec(opts, source.input_shape),
            output_name=OUTPUT_NAME, labels=labels, loss=opts.loss, optimizer=opts.optimizer,
            hyperparameters={"lr": default_lr(opts), "batch_size": 32.0, "epochs": 5.0,
                             "weight_decay": opts.weight_decay if opts.optimizer == "adamw" else 0.0},
            trainable=trainable, frozen=frozen, buffers=source.buffers,
            trainable_params=sum(sizes[n] for n in trainable), frozen_params=sum(sizes[n] for n in frozen),
            opset=next(o.version for o in source.model.opset_import if o.domain in ("", "ai.onnx")),
            ir_version=source.model.ir_version, onnxruntime_version=onnxruntime.__version__,
            files={f.name: sha256_file(f) for f in sorted(staging.iterdir()) if f.is_file()},
            validation=report.as_dict() if report else {}, notes=[f"source: {Path(opts.onnx).name}"])
        write_manifest(staging, manifest, opts.sign)
    return ExportResult(Path(opts.out), manifest, time.perf_counter() - started, report)
