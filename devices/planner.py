"""Predicts peak training memory of a bundle at a batch size, from its graphs: weights, gradients, optimizer state,
the forward activations the backward pass keeps, the largest transient tensors, and the runtime's own footprint.

Activations come from the training graph itself: ONNX Runtime's graph is forward nodes up to the loss, then the
gradient nodes; every forward tensor a gradient node reads stays alive until the backward pass reaches it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from edgeadapt.runtime.manifest import TRAINING_MODEL, Manifest
from edgeadapt.runtime.split_training import PREFIX_BATCH

MB = 1024 * 1024
# Calibrated on the reference host (ONNX Runtime 1.19.2 CPU with edgeadapt's same-as-requested arena; MobileNetV2
# 224 px, presets head/last:2/bias/full x batch 8/32): largest error 3.8%, and 2.4% on held-out cells (batch 16,
# 128 px). The runtime's own footprint (interpreter, numpy, ORT, sessions), the arena's overhead on the kept
# activations, and the transient working set of the largest forward tensor (a layer's input, output and gradient).
RUNTIME_BASE_MB = 77.6
KEPT_FACTOR = 1.118
TRANSIENT_FACTOR = 1.513
_BYTES = {1: 4, 2: 1, 3: 1, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 16: 2}


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

    def as_dict(self) -> dict:
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _tensor_bytes(value_info) -> int:
    tensor = value_info.type.tensor_type
    count = 1
    for dim in tensor.shape.dim:
        if dim.dim_value <= 0:
            return 0
        count *= dim.dim_value
    return count * _BYTES.get(tensor.elem_type, 4)


def _with_batch(model, batch: int):
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            dims[0].dim_value = batch
    return model


def activation_bytes(training_graph: Path, batch: int) -> tuple[int, int]:
    """(bytes of forward tensors kept for the backward pass, bytes of the largest forward tensor)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(_with_batch(onnx.load(str(training_graph)), batch))
    sizes = {v.name: _tensor_bytes(v) for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    params = {i.name for i in model.graph.input if i.name not in ("input", "labels")}
    loss_at = next((i for i, n in enumerate(model.graph.node) if "Loss" in n.op_type and "Grad" not in n.op_type),
                   len(model.graph.node) - 1)  # an inference graph (a split bundle's prefix) has no loss
    forward = {out for node in model.graph.node[:loss_at + 1] for out in node.output} | {"input"}
    kept = {name for node in model.graph.node[loss_at + 1:] for name in node.input
            if name in forward and name not in params}
    largest = max((sizes.get(name, 0) for name in forward), default=0)
    return sum(sizes.get(name, 0) for name in kept), largest


def plan_memory(bundle_dir: Path, manifest: Manifest, batch_size: int) -> MemoryPlan:
    trainable = manifest.trainable_params * 4 / MB
    weights = (manifest.trainable_params + manifest.frozen_params) * 4 / MB
    kept, largest = activation_bytes(Path(bundle_dir) / TRAINING_MODEL, batch_size)
    activations = KEPT_FACTOR * kept / MB
    transient = TRANSIENT_FACTOR * largest / MB
    optimizer = 2 * trainable if manifest.optimizer == "adamw" else 0.0
    gradients = trainable  # accumulation buffers
    total = weights + gradients + optimizer + activations + transient + RUNTIME_BASE_MB
    return MemoryPlan(batch_size, weights, gradients, optimizer, activations, transient, RUNTIME_BASE_MB, total)


def plan_split_memory(bundle_dir: Path, manifest: Manifest, batch_size: int) -> MemoryPlan:
    """A split run: the suffix trains (its own graph) while the prefix's inference session stays loaded."""
    split = manifest.split
    suffix = Path(bundle_dir) / f"{split.suffix_prefix}{TRAINING_MODEL}"
    kept, largest = activation_bytes(suffix, batch_size)
    _, prefix_largest = activation_bytes(Path(bundle_dir) / split.prefix_model, min(PREFIX_BATCH, batch_size))
    trainable = manifest.trainable_params * 4 / MB
    weights = (Path(bundle_dir) / split.prefix_model).stat().st_size / MB + trainable
    transient = TRANSIENT_FACTOR * max(largest, prefix_largest) / MB
    optimizer = 2 * trainable if manifest.optimizer == "adamw" else 0.0
    activations = KEPT_FACTOR * kept / MB
    total = weights + trainable + optimizer + activations + transient + RUNTIME_BASE_MB
    return MemoryPlan(batch_size, weights, trainable, optimizer, activations, transient, RUNTIME_BASE_MB, total)


def planned_peak(bundle_dir: Path, manifest: Manifest, batch_size: int, split: bool = False) -> float:
    """Predicted peak MB of whole-graph training, or of a split run when `split` (and the bundle is split)."""
    plan = plan_split_memory if split and manifest.split is not None else plan_memory
    return plan(bundle_dir, manifest, batch_size).total_mb


def largest_fitting_batch(bundle_dir: Path, manifest: Manifest, budget_mb: float, limit: int = 512,
                          split: bool = False) -> tuple[int, float]:
    """(largest power-of-two batch size whose predicted peak fits `budget_mb`, its peak); (0, 0.0) if none."""
    best, peak, batch = 0, 0.0, 1
    while batch <= limit:
        needed = planned_peak(bundle_dir, manifest, batch, split)
        if needed > budget_mb:
            break
        best, peak, batch = batch, needed, batch * 2
    return best, peak


def plan_summary(bundle) -> dict:
    """For `inspect`: predicted peak training memory at the bundle's default batch size (and for a split run), and
    which device profiles it fits."""
    from edgeadapt.devices.profiles import load_profiles

    batch = int(bundle.manifest.hyperparameters.get("batch_size", 32))
    plan = plan_memory(bundle.path, bundle.manifest, batch)
    info = {f"memory_plan_batch_{batch}": plan.as_dict()}
    if bundle.manifest.split is not None:
        split = bundle.manifest.split
        plan = plan_split_memory(bundle.path, bundle.manifest, batch)
        info["split"] = f"prefix {split.prefix_model} -> {split.boundary} {split.boundary_shape} -> suffix_* (trains)"
        info[f"memory_plan_split_batch_{batch}"] = plan.as_dict()
    fits = [p.name for p in load_profiles().values() if plan.total_mb <= p.memory_budget_mb]
    return {**info, "fits_profiles": ", ".join(fits) or "none"}
