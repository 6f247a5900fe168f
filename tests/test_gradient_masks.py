"""The portable step differentiates ReLU and clipping (ReLU6) from a 1-byte mask of the activation's output, never
from the float pre-activation: the masked gradient must equal the float one (torch autograd on the pre-activation)
bit for bit, on both portable engines, boundaries (0 and 6 exactly) and saturated values included."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import run_graph
from edgeadapt.toolchain.gradients import backward
from edgeadapt.toolchain.graph_builder import GraphBuilder

SHAPE = [4, 8, 6, 6]
# name: (ONNX op and bound inputs, the float gradient torch computes). A value exactly on a bound gets no gradient,
# as torch's ReLU6 and hardtanh (what a Clip is exported from) give it; torch.clamp's backward would pass it.
ACTIVATIONS = {
    "relu": (("Relu", []), torch.relu),
    "relu6": (("Clip", [0.0, 6.0]), torch.nn.functional.relu6),
    "clip_below": (("Clip", [-1.0, None]), lambda x: torch.nn.functional.hardtanh(x, -1.0, float("inf"))),
    "clip_above": (("Clip", [None, 2.5]), lambda x: torch.nn.functional.hardtanh(x, float("-inf"), 2.5)),
}


def _gradient_graph(op: str, bounds: list) -> onnx.ModelProto:
    """x → activation → y, and dx from dy by the step's own rule."""
    inits, inputs = [], ["x"]
    for name, value in zip(("low", "high"), bounds):
        if value is None:
            inputs.append("")
        else:
            inits.append(numpy_helper.from_array(np.array(value, np.float32), name))
            inputs.append(name)
    while inputs and inputs[-1] == "":
        inputs.pop()
    forward = helper.make_graph([helper.make_node(op, inputs, ["y"])], "f",
                                [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)], inits)
    b = GraphBuilder({"x", "y", "dy", "low", "high"}, {"x": SHAPE, "y": SHAPE, "dy": SHAPE})
    dx = backward(b, forward, ["x"], "y", "dy")["x"]
    graph = helper.make_graph(list(forward.node) + b.nodes, "g",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, SHAPE) for n in ("x", "dy")],
                              [helper.make_tensor_value_info(dx, TensorProto.FLOAT, SHAPE)], inits + b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _values() -> np.ndarray:
    """Random values around the bounds, with exact 0, 6, -1, 2.5, tiny and saturated ones mixed in."""
    rng = np.random.default_rng(7)
    x = rng.uniform(-3.0, 8.0, SHAPE).astype(np.float32)
    flat = x.reshape(-1)
    special = np.array([0.0, -0.0, 6.0, -1.0, 2.5, 1e-30, -1e-30, 5.9999995, 6.0000005, 100.0, -100.0], np.float32)
    flat[rng.choice(flat.size, 11 * 20, replace=False)] = np.repeat(special, 20)
    return x


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_masked_activation_gradient_equals_the_float_one_exactly(engine, activation):
    (op, bounds), reference = ACTIVATIONS[activation]
    x = _values()
    dy = np.random.default_rng(8).standard_normal(SHAPE).astype(np.float32)
    source = torch.from_numpy(x.copy()).requires_grad_()
    reference(source).backward(torch.from_numpy(dy))
    expected = source.grad.numpy()
    model = _gradient_graph(op, bounds)
    got = run_graph(engine, model, {"x": x, "dy": dy}, model.graph.output[0].name)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.array_equal(got, expected), (activation, engine, int((got != expected).sum()))
    assert 0 < np.count_nonzero(expected) < expected.size  # both sides of the mask are exercised
