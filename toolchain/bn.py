"""BatchNorm policies for export — one implementation, on the ONNX graph, for every source.

ONNX Runtime's artifact generator turns every BatchNormalization node of the training graph into a batch-statistics
BN (even for an eval-mode export) while the eval graph keeps the stored statistics, so train and eval would compute
different functions. Policy `fold` (default) keeps BN nodes out of all graphs: each conv→BN pair whose conv output
feeds nothing else is computed as conv(x, W·γ/√(σ²+ε), β − μ·γ/√(σ²+ε)) with the running statistics frozen and
W, γ, β separate parameters (names and counts unchanged) — exactly PyTorch's eval-mode BN, differentiable in every
parameter. Any other BN becomes the per-channel affine x·γ/√(σ²+ε) + (β − μ·γ/√(σ²+ε)). Policy `affine` makes
every BN the affine; `ort` keeps BN nodes (ORT's default behaviour, batch statistics in its training graph).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

BN_POLICIES = ("fold", "affine", "ort")


def apply_policy(model: onnx.ModelProto, policy: str) -> onnx.ModelProto:
    """`model` (an eval-mode export with BN nodes) under `policy`; modified in place and returned."""
    if policy != "ort":
        fold_batchnorm(model, into_conv=policy == "fold")
    return model


def fold_batchnorm(model: onnx.ModelProto, into_conv: bool = True) -> list[str]:
    """Rewrite each BatchNormalization node as frozen-statistics arithmetic; return the statistics' names. With
    `into_conv`, a BN whose input is a Conv's output read by nothing else is folded into that Conv's weight and
    bias; any other BN (or every BN without `into_conv`) becomes a per-channel affine."""
    ranks = _ranks(model)
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    producers = {out: node for node in model.graph.node for out in node.output}
    outputs = {o.name for o in model.graph.output}
    new_nodes, statistics = [], []
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            new_nodes.append(node)
            continue
        x, scale, bias, mean, var = node.input[:5]
        statistics += [mean, var]
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        prefix = f"bnfold/{node.name or node.output[0]}"
        scale_of, shift_of = f"{prefix}/scale", f"{prefix}/shift"
        model.graph.initializer.append(numpy_helper.from_array(np.array(eps, np.float32), f"{prefix}/eps"))
        math_nodes = [helper.make_node("Add", [var, f"{prefix}/eps"], [f"{prefix}/var_eps"]),
                      helper.make_node("Sqrt", [f"{prefix}/var_eps"], [f"{prefix}/std"]),
                      helper.make_node("Div", [scale, f"{prefix}/std"], [scale_of]),
                      helper.make_node("Mul", [mean, scale_of], [f"{prefix}/mean_scaled"]),
                      helper.make_node("Sub", [bias, f"{prefix}/mean_scaled"], [shift_of])]
        conv = producers.get(x)
        if into_conv and conv is not None and conv.op_type == "Conv" and consumers.get(x) == 1 and x not in outputs:
            _fold_into_conv(model, conv, node, new_nodes, math_nodes, prefix)
        else:
            new_nodes += math_nodes + _affine_nodes(model, x, node.output[0], prefix, ranks.get(x, 4))
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return statistics


def _fold_into_conv(model, conv, bn, new_nodes, math_nodes, prefix) -> None:
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), f"{prefix}/w_shape"))
    math_nodes += [helper.make_node("Reshape", [f"{prefix}/scale", f"{prefix}/w_shape"], [f"{prefix}/scale4"]),
                   helper.make_node("Mul", [conv.input[1], f"{prefix}/scale4"], [f"{prefix}/weight"])]
    bias = f"{prefix}/shift"
    if len(conv.input) > 2 and conv.input[2]:
        math_nodes += [helper.make_node("Mul", [conv.input[2], f"{prefix}/scale"], [f"{prefix}/bias_scaled"]),
                       helper.make_node("Add", [f"{prefix}/bias_scaled", f"{prefix}/shift"], [f"{prefix}/bias"])]
        bias = f"{prefix}/bias"
    position = next(i for i, n in enumerate(new_nodes) if n is conv)
    new_nodes[position:position] = math_nodes
    conv.input[:] = [conv.input[0], f"{prefix}/weight", bias]
    conv.output[:] = [bn.output[0]]


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    inferred = shape_inference.infer_shapes(model)
    values = [*inferred.graph.input, *inferred.graph.value_info]
    return {v.name: len(v.type.tensor_type.shape.dim) for v in values if v.type.tensor_type.HasField("shape")}


def _affine_nodes(model, x: str, y: str, prefix: str, rank: int) -> list:
    shape = np.array([1, -1] + [1] * (rank - 2), np.int64)
    model.graph.initializer.append(numpy_helper.from_array(shape, f"{prefix}/c_shape"))
    return [helper.make_node("Reshape", [f"{prefix}/scale", f"{prefix}/c_shape"], [f"{prefix}/scale_c"]),
            helper.make_node("Reshape", [f"{prefix}/shift", f"{prefix}/c_shape"], [f"{prefix}/shift_c"]),
            helper.make_node("Mul", [x, f"{prefix}/scale_c"], [f"{prefix}/scaled"]),
            helper.make_node("Add", [f"{prefix}/scaled", f"{prefix}/shift_c"], [y])]
