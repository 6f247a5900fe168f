"""What `edgeadapt inspect` shows: a bundle's manifest essentials, file sizes and compatibility versions."""

from __future__ import annotations

import json
from pathlib import Path

from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.engines import available
from edgeadapt.runtime.state import digest


def describe(bundle: Bundle | str | Path) -> dict:
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    m = bundle.manifest
    progress = bundle.load_state().progress
    return {
        "backbone": m.backbone, "weights": m.weights, "preset": m.preset, "bn_policy": m.bn_policy,
        "input": f"{m.input.name} {m.input.shape} {m.input.dtype} {m.input.layout} {m.input.channels}".strip(),
        "outputs": len(m.labels), "labels": ", ".join(m.labels[:6]) + (" …" if len(m.labels) > 6 else ""),
        "loss": m.loss, "optimizer": m.optimizer, "default_lr": m.hyperparameters.get("lr"),
        "trainable_params": m.trainable_params, "frozen_params": m.frozen_params,
        "trainable_tensors": len(m.trainable), "frozen_tensors": len(m.frozen), "buffers": len(m.buffers),
        "validation": m.validation, "schema_version": m.schema_version, "edgeadapt_version": m.edgeadapt_version,
        "portable step": f"{m.portable.train_step} (state: {', '.join(m.portable.state)}; "
                         f"{len(m.portable.layout)} tensors), {m.portable.forward}; opset {m.portable.opset}, "
                         f"IR {m.portable.ir_version}",
        "engines here": _engines_here(bundle),
        "bn statistics": _statistics(bundle),
        "hyperparameters": m.hyperparameters,
        "opset": m.opset, "ir_version": m.ir_version, "exported with onnxruntime": m.onnxruntime_version,
        "trained": "no (exported state)" if progress is None else
        f"{progress.epoch} epochs, {progress.step} steps, engine {_engine_of(progress)}" +
        ("" if progress.finished else " (unfinished: --resume)"),
        "notes": "; ".join(m.notes) or "-",
        **_sparse(m),
        "files": {f.name: f.stat().st_size for f in sorted(bundle.path.iterdir()) if f.is_file()},
    }



def _statistics(bundle: Bundle) -> str:
    """How many BN running statistics the bundle holds as state, and whether adapt-bn re-estimated them."""
    portable = bundle.manifest.portable
    if not portable.statistics:
        return "folded into the weights (schema 2, before edgeadapt 0.3)" if bundle.manifest.schema_version < 3 \
            else "none (no BatchNorm, or --bn ort)"
    values = bundle.load_state().statistics
    adapted = digest(values) != portable.statistics_sha256
    return f"{len(portable.statistics) // 2} BN layers; {'re-estimated (adapt-bn)' if adapted else 'as exported'}"


def _sparse(m) -> dict:
    """What `--trainable sparse` chose and why: the budget, the cut, and per layer its channels, contribution score
    (sum of |mean gradient| on the calibration samples), score per parameter and planned memory."""
    s = m.sparse
    if s is None:
        return {}
    rows = {"sparse": f"planned {s.planned_mb} MB of a {s.budget_mb} MB budget at batch {s.batch_size}; "
                      f"cut at {s.cut or 'none (the head alone)'}; scored on {s.calibration_samples} samples; "
                      "always trained: head + biases after the cut "
                      f"({s.always} tensors, {s.always_params:,} params, score {s.always_score:.3g})"}
    for layer in s.layers:
        channels = f"{len(layer.channels)}/{layer.total_channels} channels" if layer.channels and \
            len(layer.channels) < layer.total_channels else "all channels"
        rows[f"  {layer.name}"] = (f"{channels}, {layer.params:,} params, score {layer.score:.3g} "
                                   f"({layer.score / max(layer.params, 1):.2e}/param), {layer.mb:.2f} MB")
    return rows


def _engine_of(progress) -> str:
    return json.loads(progress.run_config).get("engine", "?")


def _engines_here(bundle: Bundle) -> str:
    """The engines this machine can train the bundle with, and their devices."""
    engines = available()
    if not (bundle.path / "training_model.onnx").is_file():
        engines.pop("ort-training", None)  # the bundle has no ORT training artifacts
    return "; ".join(f"{name} ({', '.join(devices)})" for name, devices in engines.items()) or "none"
