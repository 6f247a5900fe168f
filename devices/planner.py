"""Predicts peak training memory of a bundle at a batch size from numbers the export measured and wrote into the
manifest (no graph parsing on the device): weights, the state the engine keeps (parameters, AdamW's moments, the
step's fresh outputs and the flat gradient), the forward activations the backward pass reads, the largest
transient tensor, and the runtime's own footprint.

`manifest.memory` holds per-sample bytes for each training graph: `kept_bytes_per_sample` (forward tensors read by
the backward pass) and `largest_bytes_per_sample` (the largest forward tensor), with a `suffix_` prefix for a split
bundle's suffix and `prefix_largest_bytes_per_sample` for its prefix; since 0.4 also `constant_bytes` (what the
step's and forward graph's sessions hold whatever the batch), `prefix_constant_bytes` and
`masked_bytes_per_sample` (the part of the kept bytes that only gradient masks read, priced lower).

Calibrations by model family and engine. Image and feature-row models (convolutions; activations dominate): the
linear plan, with one set of factors for onnxruntime and one for OpenVINO's CPU plugin. Token and audio models
(transformers: weights and constants dominate, activations are small): the peak is the larger of loading the
sessions (onnxruntime holds a model's bytes, its initializers and their prepacked copies at once) and training (the
resident constants, the state, the kept activations and the largest transient); calibrated on onnxruntime only, and
priced so for every engine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from edgeadapt.devices.profiles import load_profiles
from edgeadapt.runtime.manifest import SUFFIX_PREFIX, Manifest, default_batch
from edgeadapt.runtime.training_target import PREFIX_BATCH

MB = 1024 * 1024
# Calibrated on the reference host for the portable step on onnxruntime (CPU, 2 threads, no memory pattern: see
# runtime/ort.py; parameters and moments in the engine's own buffers, outside the arena), MobileNetV2 head, last:2,
# bias and full × 128, 224 px × batch 8, 32, whole graph, on 1.19.2 and 1.32 (peak RSS after five steps): the
# runtime's own footprint, the arena's overhead on the kept activations (their gradients live at the same time), and
# the transient working set of the largest forward tensor (a layer's input, output and gradient). Fitted for the
# smallest worst error: within ±9.6% of all 32 cells; split runs (head, last:2) are −21% … +35% off
# (benchmarks/README.md, "Memory planner vs measured peak RSS").
RUNTIME_BASE_MB = 116.7
KEPT_FACTOR = 1.63
TRANSIENT_FACTOR = 1.56
# Kept tensors that only gradient masks (and Shape) read — a frozen layer's activations on the way down to trainable
# biases — cost about their own bytes: no weight gradient's working set grows with them (fitted with the above).
MASKED_FACTOR = 0.86
# Transformers (benchmarks/README.md, "planner calibration"): fitted on all-MiniLM-L6-v2 (32 tokens) and Whisper-tiny's
# encoder (2 s) × head, last:1, lora:8, full × batch 8, 32 × whole and split (head, lora:8) on the same host, both
# releases: within ±13% of the measured peak RSS in all 48 cells, ±10% in 37.
# OpenVINO's CPU plugin (2026.4, f32, static shapes: runtime/ov.py) keeps about twice onnxruntime's memory for a
# full step, in its compiled model. Fitted for the smallest worst error on the same host (peak RSS after five steps,
# whole graph): MobileNetV2 head, last:2, bias, full × 128, 224 px × batch 8, 32, ResNet-18 and EfficientNet-Lite0
# head and full at 128 px × batch 8, 32, refitted after the freed heap went back (runtime/heap.py): within ±11.9%
# of all 24 cells, ±10% in 20 (benchmarks/README.md, "OpenVINO's planner"; onnxruntime's image factors, fitted on
# MobileNetV2, had under-priced the weight-heavy ResNet-18 by up to 54%).
OPENVINO_IMAGE = {"runtime_mb": 172.5, "weights": 3.23, "state": 3.57, "kept": 3.38, "masked": 1.44, "transient": 1.17}
ONNXRUNTIME_IMAGE = {"runtime_mb": RUNTIME_BASE_MB, "weights": 1.0, "state": 1.0, "kept": KEPT_FACTOR,
                     "masked": MASKED_FACTOR, "transient": TRANSIENT_FACTOR}
SEQUENCE = {"runtime_mb": 65.5, "load_constants": 0.93, "load_prefix_constants": 3.07, "constants": 2.33,
            "prefix_constants": 2.82, "state": 1.30, "kept": 0.76, "transient": 5.06}
SEQUENCE_KINDS = ("tokens", "audio")


@dataclass(frozen=True)
class MemoryPlan:
    batch_size: int
    weights_mb: float
    gradients_mb: float
    optimizer_mb: float
    activations_mb: float
    transient_mb: float
    runtime_mb: float
    total_mb: float
    load_mb: float = 0.0  # transformers: the peak while the sessions load (the total is the larger of the two)

    def as_dict(self) -> dict:
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(self).items()}


def price(trainable_params: int, total_params: int, moments: int, memory: dict[str, float], batch: int,
          split: bool, kind: str = "image", accumulating: bool = False, engine: str = "onnxruntime") -> MemoryPlan:
    """The one pricing function: the planned peak of training `trainable_params` of a model of `total_params` with
    `moments` optimizer moments and the memory record `memory` (per-sample bytes, as the manifest keeps them), as a
    whole graph or as a split run (the suffix trains while the prefix's inference session holds the frozen weights
    too). `inspect`, `train --profile/--auto-batch`, `--trainable auto` and `--trainable sparse` all price here.
    `kind`: the input kind (manifest.input.kind), which picks the calibration. `accumulating`: micro-batches of
    `batch` accumulated (`--accumulate`): the step also holds the gradient sum it is fed and the one it gives.
    `engine`: the one that trains (openvino has image factors of its own; any other is priced as onnxruntime)."""
    state_factor = 1.0
    if kind in SEQUENCE_KINDS and f"{SUFFIX_PREFIX if split else ''}constant_bytes" in memory:
        plan = _sequence_plan(trainable_params, moments, memory, batch, SUFFIX_PREFIX if split else "")
    else:
        frozen = total_params - trainable_params
        weights_mb = (2 * frozen + trainable_params if split else total_params) * 4 / MB
        factors = OPENVINO_IMAGE if engine == "openvino" else ONNXRUNTIME_IMAGE
        state_factor = factors["state"]
        plan = _plan_numbers(trainable_params, moments, memory, batch, weights_mb, SUFFIX_PREFIX if split else "",
                             factors)
    if not accumulating:
        return plan
    sums = state_factor * 2 * trainable_params * 4 / MB
    return replace(plan, gradients_mb=plan.gradients_mb + sums, total_mb=plan.total_mb + sums)


def _plan(manifest: Manifest, batch: int, split: bool, accumulating: bool = False,
          engine: str = "onnxruntime") -> MemoryPlan:
    return price(manifest.trainable_params, manifest.trainable_params + manifest.frozen_params,
                 len(manifest.portable.state) - 1, manifest.memory, batch, split, manifest.input.kind, accumulating,
                 engine)


def _sequence_plan(trainable_params: int, moments: int, memory: dict[str, float], batch: int,
                   graph: str) -> MemoryPlan:
    c = SEQUENCE
    constants = memory[f"{graph}constant_bytes"] / MB
    prefix = memory.get("prefix_constant_bytes", 0.0) / MB if graph else 0.0
    state = c["state"] * trainable_params * 4 * (3 + 2 * moments) / MB  # params, gradient, new params, moments ×2
    activations = c["kept"] * memory.get(f"{graph}kept_bytes_per_sample", 0.0) * batch / MB
    largest = memory.get(f"{graph}largest_bytes_per_sample", 0.0) * batch
    if graph:
        largest = max(largest, memory.get("prefix_largest_bytes_per_sample", 0.0) * min(PREFIX_BATCH, batch))
    transient = c["transient"] * largest / MB
    weights = c["constants"] * constants + c["prefix_constants"] * prefix
    running = c["runtime_mb"] + weights + state + activations + transient
    loading = c["runtime_mb"] + c["load_constants"] * constants + c["load_prefix_constants"] * prefix
    share = state / (3 + 2 * moments)
    return MemoryPlan(batch, weights, 2 * share, 2 * moments * share, activations, transient, c["runtime_mb"],
                      max(running, loading), loading)


def _plan_numbers(trainable_params: int, moments: int, memory: dict[str, float], batch: int, weights_mb: float,
                  graph: str = "", factors: dict = ONNXRUNTIME_IMAGE) -> MemoryPlan:
    trainable = factors["state"] * trainable_params * 4 / MB
    optimizer = 2 * moments * trainable  # the moments and the step's fresh copies of them
    gradients = 2 * trainable  # the flat gradient and the step's fresh parameters
    kept = memory.get(f"{graph}kept_bytes_per_sample", 0.0)
    masked = memory.get(f"{graph}masked_bytes_per_sample", 0.0)  # 0 in bundles before 0.4: priced as kept
    activations = (factors["kept"] * (kept - masked) + factors["masked"] * masked) * batch / MB
    largest = memory.get(f"{graph}largest_bytes_per_sample", 0.0) * batch
    if graph:
        largest = max(largest, memory.get("prefix_largest_bytes_per_sample", 0.0) * min(PREFIX_BATCH, batch))
    transient = factors["transient"] * largest / MB
    weights_mb *= factors["weights"]
    runtime = factors["runtime_mb"]
    total = weights_mb + gradients + optimizer + activations + transient + runtime
    return MemoryPlan(batch, weights_mb, gradients, optimizer, activations, transient, runtime, total)


def plan_memory(manifest: Manifest, batch_size: int) -> MemoryPlan:
    """Whole-graph training."""
    return _plan(manifest, batch_size, split=False)


def plan_split_memory(manifest: Manifest, batch_size: int) -> MemoryPlan:
    """A split run: the suffix trains while the prefix's inference session stays loaded (both hold the weights)."""
    return _plan(manifest, batch_size, split=True)


def planned_peak(manifest: Manifest, batch_size: int, split: bool = False, accumulating: bool = False,
                 engine: str = "onnxruntime") -> float:
    """Predicted peak MB of whole-graph training on `engine`, or of a split run when `split` (and the bundle is
    split), with micro-batches of `batch_size` accumulated when `accumulating`."""
    return _plan(manifest, batch_size, split and manifest.split is not None, accumulating, engine).total_mb


def largest_fitting_batch(manifest: Manifest, budget_mb: float, limit: int = 512, split: bool = False,
                          accumulating: bool = False, engine: str = "onnxruntime") -> tuple[int, float]:
    """(largest power-of-two batch size whose predicted peak fits `budget_mb`, its peak); (0, 0.0) if none."""
    best, peak, batch = 0, 0.0, 1
    while batch <= limit:
        needed = planned_peak(manifest, batch, split, accumulating, engine)
        if needed > budget_mb:
            break
        best, peak, batch = batch, needed, batch * 2
    return best, peak


def plan_summary(bundle) -> dict:
    """For `inspect`: predicted peak training memory at the bundle's default batch size (and for a split run), and
    which device profiles it fits."""
    manifest = bundle.manifest
    batch = default_batch(manifest)
    plan = plan_memory(manifest, batch)
    info = {f"memory plan, batch {batch}": plan.as_dict()}
    if manifest.split is not None:
        split = manifest.split
        plan = plan_split_memory(manifest, batch)
        info["split"] = f"prefix {split.prefix_model} -> {split.boundary} {split.boundary_shape} -> suffix (trains)"
        info[f"memory plan, split run, batch {batch}"] = plan.as_dict()
    fits = [p.name for p in load_profiles().values() if plan.total_mb <= p.memory_budget_mb]
    return {**info, "fits profiles": ", ".join(fits) or "none"}
