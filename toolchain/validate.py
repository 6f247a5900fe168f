"""Stage 3 of export: check the bundle against its source, through the engines the device uses.

- The forward graph (portable engine) against the source model (torch, or the source ONNX file).
- The portable step's loss and every trainable gradient against torch in float64 (the exact math), or, for sources
  without a torch model, its loss against the eval graph's and its gradient against central differences of the
  source graph's loss along random directions.
- A split bundle's prefix + suffix against the whole graph.
- ONNX Runtime training's graphs (the optional plugin's, where written) against the same references: a mismatch
  drops them from the bundle with a manifest note, it does not fail the export.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from edgeadapt.runtime.engines.onnxruntime_engine import OnnxRuntimeEngine
from edgeadapt.runtime.engines.ort_training_engine import OrtTrainingEngine
from edgeadapt.runtime.errors import ExportError, InternalError
from edgeadapt.runtime.losses import mean_loss
from edgeadapt.runtime.ort import onnxruntime_module, session_options
from edgeadapt.runtime.prefix import PrefixRunner
from edgeadapt.runtime.state import named_parameters
from edgeadapt.runtime.training_target import bundle_statistics
from edgeadapt.toolchain.bn import STATISTICS_INPUT, statistics_layout
from edgeadapt.toolchain.channels import expand_reference
from edgeadapt.toolchain.stages import initial_values
from edgeadapt.toolchain.train_step import build_gradient_graph

EVAL_TOLERANCE = 1e-4  # max abs difference of the outputs, fp32
LOSS_TOLERANCE = 1e-4  # relative
# Gradients are compared with torch in float64 (the exact math): ‖g − g_64‖ / ‖g_64‖ per parameter must stay under
# GRAD_TOLERANCE or within NOISE_FACTOR × torch-fp32's own error. Pretrained zoo models agree to ~1e-3. In randomly
# initialised ReLU networks a pre-activation within ~1e-7 of a kink can fall on the other side in ONNX Runtime's fp32
# forward than in torch's, which moves a small bias gradient by up to ~1e-2 (measured: 1.1e-2 on MobileNetV2 at
# 64 px from a single flipped element). The failures this check exists for are far larger: initializers merged by
# the exporter (0.4-4), BN in batch-statistics mode (O(1)), a wrong gradient rule (O(1)).
GRAD_TOLERANCE = 5e-2
NOISE_FACTOR = 4.0


@dataclass(frozen=True)
class ValidationReport:
    eval_max_abs_diff: float
    loss_rel_diff: float
    grad_max_rel_diff: float
    worst_grad: str
    ort_training_grad_max_rel_diff: float = float("nan")
    split_max_abs_diff: float = float("nan")
    ort_training_failure: str = ""  # why ORT training's artifacts did not pass (they are then left out)

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if isinstance(v, float) and np.isfinite(v)}


def example_targets(loss: str, batch: int, outputs: int, rng: np.random.Generator) -> np.ndarray:
    if loss == "cross_entropy":
        return rng.integers(0, outputs, batch).astype(np.int64)
    if loss == "bce_with_logits":
        return rng.integers(0, 2, (batch, outputs)).astype(np.float32)
    return rng.standard_normal((batch, outputs)).astype(np.float32)


def _relative_error(value: np.ndarray, reference: np.ndarray, floor: float = 1e-12) -> float:
    return float(np.linalg.norm(value - reference)) / max(float(np.linalg.norm(reference)), floor)


# Some gradients are structurally zero (attention's key bias: softmax ignores a per-row constant), so fp32 leaves
# only rounding (measured 1.7e-9 against torch's 4e-18): each gradient's error is relative to at least this
# fraction of the largest gradient's norm.
ABSOLUTE_FLOOR = 1e-6


def portable_gradients(source, trainable: list[str], loss: str, x: np.ndarray,
                       y: np.ndarray, threads: int | None = None) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and gradients of the portable step's backward pass, run on onnxruntime."""

    statistics = statistics_layout(source.graph)
    graph, layout = build_gradient_graph(source.graph, trainable, loss, statistics=statistics)
    params = initial_values(source.graph, layout)
    session = _session(graph, threads)
    feed = {"input": x, "labels": y, "params": params}
    if statistics:
        feed[STATISTICS_INPUT] = initial_values(source.graph, statistics)
    value, flat = session.run(["loss", "gradients"], feed)
    return float(value), named_parameters(flat, layout)


def torch_criterion(loss: str):
    """PyTorch's function for a bundle loss name."""
    from torch.nn import functional as F

    return {"cross_entropy": F.cross_entropy, "bce_with_logits": F.binary_cross_entropy_with_logits,
            "mse": F.mse_loss, "l1": F.l1_loss}[loss]


def _torch_gradients(module, x, y, loss: str, dtype) -> tuple[float, dict[str, np.ndarray]]:
    import torch

    model = copy.deepcopy(module).to(dtype).eval()
    target = torch.from_numpy(y) if loss == "cross_entropy" else torch.from_numpy(y).to(dtype)
    inputs = torch.from_numpy(x)
    value = torch_criterion(loss)(model(inputs.to(dtype) if inputs.is_floating_point() else inputs), target)
    value.backward()
    grads = {n: p.grad.double().numpy() for n, p in model.named_parameters() if p.grad is not None}
    return float(value.detach()), grads


def _check_gradients(grads: dict, reference: dict, noise: dict | None, trainable: list[str], what: str) -> tuple:
    worst, worst_name = 0.0, ""
    floor = ABSOLUTE_FLOOR * max(float(np.linalg.norm(reference[n])) for n in trainable)
    for name in trainable:
        error = _relative_error(grads[name], reference[name], floor)
        allowed = max(GRAD_TOLERANCE, NOISE_FACTOR * _relative_error(noise[name], reference[name], floor)) \
            if noise else GRAD_TOLERANCE
        if error > allowed:
            raise ExportError(f"one training step of the {what} differs from its reference: gradient of {name} is off "
                              f"by {error:.2e} (allowed {allowed:.1e}); try --bn affine, or report a bug.")
        worst, worst_name = max((worst, worst_name), (error, name))
    return worst, worst_name


def validate(source, plan, bundle, threads: int | None = None) -> ValidationReport:
    """Check a written bundle (its manifest in place) against its source; an ExportError names what is off."""
    lists, loss_name = plan.lists, plan.training.loss
    rng = np.random.default_rng(0)
    x = source.examples(4)
    reference = source.reference(x)
    y = example_targets(loss_name, 4, reference.shape[-1], rng)
    eval_diff = _check_forward(bundle, x, reference, threads)
    loss, grads = portable_gradients(source, lists.trainable, loss_name, x, y, threads)
    if source.torch_module is not None:
        loss_ref, ref = _torch_gradients(source.torch_module, x, y, loss_name, torch_dtype("float64"))
        noise = _torch_gradients(source.torch_module, x, y, loss_name, torch_dtype("float32"))[1]
        ref, noise = expand_reference(ref, source.parts), expand_reference(noise, source.parts)
    else:  # no torch model: the loss must be the eval graph's, the gradient the source graph's finite differences
        loss_ref, ref, noise = _eval_loss(loss_name, reference, y), None, None
    loss_diff = abs(loss - loss_ref) / max(abs(loss_ref), 1e-6)
    if loss_diff > LOSS_TOLERANCE:
        raise ExportError(f"the portable training step's loss differs from its reference by {loss_diff:.2e}; a layer "
                          "behaves differently in training (BatchNorm? Dropout?): export it in eval mode or freeze it.")
    if ref is not None:
        worst, worst_name = _check_gradients(grads, ref, noise, lists.trainable, "portable step")
    else:
        worst = _check_directional(source, lists.trainable, loss_name, x, y, grads, rng, threads)
        worst_name = "directional"
    split_diff = _check_split(bundle, x, threads) if bundle.manifest.split else float("nan")
    ort_worst, ort_failure = float("nan"), ""
    if (bundle.path / "training_model.onnx").is_file() and plan.bn_policy != "ort":
        try:
            ort = _ort_training(bundle, x, y, threads)
            reference_grads = grads if ref is None else ref
            ort_worst = _check_gradients(ort[1], reference_grads, noise, lists.trainable, "ort-training graph")[0]
        except (ExportError, InternalError) as exc:
            ort_failure = str(exc)
    return ValidationReport(eval_diff, loss_diff, worst, worst_name, ort_worst, split_diff, ort_failure)


# Central differences in fp32 through a real network: a large step crosses ReLU kinks, a small one drowns in
# rounding; each direction is taken at two steps and the closer one counts. A wrong gradient rule is off by far more.
DIRECTIONS, DIRECTION_STEPS, DIRECTION_TOLERANCE = 3, (1e-3, 2.5e-4), 5e-2


def _check_directional(source, trainable: list[str], loss: str, x: np.ndarray, y: np.ndarray,
                       grads: dict[str, np.ndarray], rng: np.random.Generator, threads: int | None = None) -> float:
    """The step's gradient along random directions d (each tensor scaled by its own size) against the central
    difference (L(θ + h·d) − L(θ − h·d)) / 2h of the source graph's loss, run on onnxruntime."""
    loss_at, values = _loss_of_parameters(source.graph, trainable, x, y, loss, threads)
    worst = 0.0
    for _ in range(DIRECTIONS):
        direction = {n: rng.standard_normal(v.shape).astype(np.float32) * max(float(np.sqrt(np.mean(v * v))), 1e-2)
                     for n, v in values.items()}
        analytic = sum(float(np.vdot(grads[n].astype(np.float64), direction[n])) for n in trainable)
        scale = sum(float(np.abs(grads[n]).ravel() @ np.abs(direction[n]).ravel()) for n in trainable)
        error = min(abs(_central_difference(loss_at, values, direction, h) - analytic) for h in DIRECTION_STEPS) / \
            max(abs(analytic), 1e-3 * scale, 1e-6)
        if error > DIRECTION_TOLERANCE:
            raise ExportError(f"the portable step's gradient differs from the source graph's finite differences by "
                              f"{error:.2e} (allowed {DIRECTION_TOLERANCE}); try --bn affine, or report a bug.")
        worst = max(worst, error)
    return worst


def _central_difference(loss_at, values: dict, direction: dict, h: float) -> float:
    shifted = {sign: {n: values[n] + sign * h * direction[n] for n in values} for sign in (1, -1)}
    return (loss_at(shifted[1]) - loss_at(shifted[-1])) / (2 * h)


def _loss_of_parameters(graph, trainable: list[str], x: np.ndarray, y: np.ndarray, loss: str,
                        threads: int | None = None):
    """(values -> mean loss of the source graph with those trainable tensors, the exported values)."""
    model = copy.deepcopy(graph)
    values = {i.name: numpy_helper.to_array(i).astype(np.float32) for i in model.graph.initializer
              if i.name in set(trainable)}
    inputs = {i.name for i in model.graph.input}
    model.graph.input.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, list(values[n].shape))
                             for n in trainable if n not in inputs)
    session = _session(model, threads)
    output = session.get_outputs()[0].name
    return (lambda params: mean_loss(loss, session.run([output], {"input": x, **params})[0], y)), values


def _session(model, threads: int | None):
    return onnxruntime_module().InferenceSession(model.SerializeToString(), session_options(threads),
                                                 providers=["CPUExecutionProvider"])


def torch_dtype(name: str):
    import torch  # heavy: only when the source is a torch model

    return getattr(torch, name)


def _eval_loss(loss: str, logits: np.ndarray, y: np.ndarray) -> float:
    return mean_loss(loss, logits, y)


def _logits(bundle, x: np.ndarray, split: bool = False, threads: int | None = None) -> np.ndarray:

    engine = OnnxRuntimeEngine(bundle, bundle.graphs(split), threads=threads, training=False)
    engine.load(bundle.load_state())
    return engine.logits(x)


def _check_forward(bundle, x: np.ndarray, reference: np.ndarray, threads: int | None = None) -> float:
    diff = float(np.abs(_logits(bundle, x, threads=threads) - reference).max())
    if diff > EVAL_TOLERANCE:
        raise ExportError(f"the exported forward graph differs from the source model by {diff:.2e} (> "
                          f"{EVAL_TOLERANCE}); the export is wrong: try --bn affine, or report a bug with this model.")
    return diff


def _ort_training(bundle, x: np.ndarray, y: np.ndarray,
                  threads: int | None = None) -> tuple[float, dict[str, np.ndarray]]:
    """ONNX Runtime training's eval graph must match the forward graph; its gradients are returned."""

    engine = OrtTrainingEngine(bundle, bundle.graphs(False), threads=threads)
    engine.load(bundle.load_state())
    diff = float(np.abs(engine.eval_step(x, y)[1] - _logits(bundle, x, threads=threads)).max())
    if diff > EVAL_TOLERANCE:
        raise InternalError(f"ONNX Runtime training's eval graph differs from the forward graph by {diff:.2e}")
    return engine.gradients(x, y)


def _check_split(bundle, x: np.ndarray, threads: int | None = None) -> float:
    """prefix.onnx followed by the suffix's forward graph must give the whole forward graph's outputs."""

    prefix = bundle.read_graph(bundle.manifest.split.prefix_model)
    features = PrefixRunner(prefix, threads=threads, statistics=bundle_statistics(bundle))(x)
    diff = float(np.abs(_logits(bundle, features, True, threads) - _logits(bundle, x, threads=threads)).max())
    if diff > EVAL_TOLERANCE:
        raise InternalError(f"prefix + suffix differ from the whole graph by {diff:.2e}")
    return diff
