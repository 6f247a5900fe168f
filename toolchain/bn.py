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

import copy
import json
from dataclasses import asdict, dataclass, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeadapt.runtime.manifest import StateLayout
from edgeadapt.runtime.state import STATISTICS_INPUT
from edgeadapt.toolchain.graph_builder import GraphBuilder, with_inferred_types

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
    new_nodes, statistics, records = [], [], []
    before = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            new_nodes.append(node)
            continue
        x, scale, bias, mean, var = node.input[:5]
        statistics += [mean, var]
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        prefix = f"bnfold/{node.name or node.output[0]}"
        record = FoldedBN(prefix, mean, var, scale, bias, float(np.float32(eps)), node.output[0])
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
            record = replace(record, weight=f"{prefix}/weight")
        else:
            new_nodes += math_nodes + _affine_nodes(model, x, node.output[0], prefix, ranks.get(x, 4))
        records.append(record)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    added = [i.name for i in model.graph.initializer if i.name not in before]
    _write_record(model, {"batchnorms": [asdict(r) for r in records], "constants": added})
    return statistics


# The fold's record of what it did, kept in the graph's metadata: later stages (AdaBN's graph, the gradient rules,
# an ONNX source's parameter list) read it instead of recognising the fold's tensors by their names.
FOLD_RECORD = "edgeadapt.folded_batchnorms"


def _write_record(model: onnx.ModelProto, record: dict) -> None:
    kept = [p for p in model.metadata_props if p.key != FOLD_RECORD]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=FOLD_RECORD, value=json.dumps(record))


def _read_record(model: onnx.ModelProto) -> dict:
    value = next((p.value for p in model.metadata_props if p.key == FOLD_RECORD), None)
    return json.loads(value) if value else {"batchnorms": [], "constants": []}


def copy_fold_record(source: onnx.ModelProto, target: onnx.ModelProto) -> onnx.ModelProto:
    """`target` (a part of `source`, e.g. a split's suffix) keeps the record of the BNs it still holds."""
    record = _read_record(source)
    tensors = {o for n in target.graph.node for o in n.output}
    record["batchnorms"] = [r for r in record["batchnorms"] if r["output"] in tensors]
    _write_record(target, record)
    return target


def fold_constants_of(model: onnx.ModelProto) -> set[str]:
    """The initializers the fold itself added (epsilons, reshape shapes): never parameters."""
    return set(_read_record(model)["constants"])


def folded_weights(model: onnx.ModelProto) -> set[str]:
    """Conv weights computed as W·γ/√(σ²+ε) by the fold."""
    return {bn.weight for bn in folded_batchnorms(model) if bn.weight}


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
    inferred = with_inferred_types(model)
    values = [*inferred.graph.input, *inferred.graph.value_info]
    return {v.name: len(v.type.tensor_type.shape.dim) for v in values if v.type.tensor_type.HasField("shape")}


def _affine_nodes(model, x: str, y: str, prefix: str, rank: int) -> list:
    shape = np.array([1, -1] + [1] * (rank - 2), np.int64)
    model.graph.initializer.append(numpy_helper.from_array(shape, f"{prefix}/c_shape"))
    return [helper.make_node("Reshape", [f"{prefix}/scale", f"{prefix}/c_shape"], [f"{prefix}/scale_c"]),
            helper.make_node("Reshape", [f"{prefix}/shift", f"{prefix}/c_shape"], [f"{prefix}/shift_c"]),
            helper.make_node("Mul", [x, f"{prefix}/scale_c"], [f"{prefix}/scaled"]),
            helper.make_node("Add", [f"{prefix}/scaled", f"{prefix}/shift_c"], [y])]


# ---- BN statistics as bundle state (AdaBN) --------------------------------------------------------------------

@dataclass(frozen=True)
class FoldedBN:
    """One BN of a `fold`/`affine` graph, as `fold_batchnorm` recorded it (the graph's FOLD_RECORD metadata)."""

    prefix: str  # the names of its arithmetic start with this
    mean: str
    var: str
    gamma: str
    beta: str
    eps: float
    output: str  # the BN's output tensor
    weight: str = ""  # folded into a conv: the conv's weight W·γ/√(σ²+ε) ("" for a per-channel affine)


def folded_batchnorms(model: onnx.ModelProto) -> list[FoldedBN]:
    """The graph's BNs in graph order, from the fold's record (none under policy `ort`, whose BN nodes stay)."""
    return [FoldedBN(**r) for r in _read_record(model)["batchnorms"]]


def statistics_names(model: onnx.ModelProto) -> list[str]:
    """Running means and variances, in the order of the bundle's statistics layout."""
    return [name for bn in folded_batchnorms(model) for name in (bn.mean, bn.var)]


STATISTICS_OUTPUT = "bn_batch"


def statistics_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """The network with every BN normalising by its batch statistics (train mode), outputting those statistics as
    one flat vector in the statistics layout: per BN the batch mean and the unbiased batch variance — what
    PyTorch's train-mode BN accumulates into its running statistics. AdaBN on the device runs it forward only."""
    result = copy.deepcopy(model)
    bns = {bn.prefix: bn for bn in folded_batchnorms(model)}
    ranks = _ranks(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    nodes, pieces = [], []
    for node in result.graph.node:
        folded = _folded_prefix(node, bns)
        if folded is not None and node.op_type == "Conv":  # conv(x, W·s, b·s + shift): recompute z = conv(x, W, b)
            bn = bns[folded]
            inputs = [node.input[0], producers[f"{folded}/weight"].input[0]]
            if node.input[2] == f"{folded}/bias":
                inputs.append(producers[f"{folded}/bias_scaled"].input[0])
            z = f"{folded}/z"
            nodes.append(helper.make_node("Conv", inputs, [z], name=f"{folded}/conv", **_attributes(node)))
            nodes += _batch_norm(result, bn, z, ranks.get(bn.output, 4), pieces)
        elif folded is not None:  # the affine's Add: y = z·scale + shift, with z the Mul's input
            bn = bns[folded]
            z = producers[f"{folded}/scaled"].input[0]
            nodes += _batch_norm(result, bn, z, ranks.get(z, 4), pieces)
        else:
            nodes.append(node)
    joined = GraphBuilder({o for n in nodes for o in n.output}, {}, "bnstats")
    joined.concat(pieces, output=STATISTICS_OUTPUT)  # a tree: within WebGPU's per-node limit
    nodes += joined.nodes
    del result.graph.node[:]
    result.graph.node.extend(nodes)
    del result.graph.output[:]
    result.graph.output.append(helper.make_tensor_value_info(STATISTICS_OUTPUT, onnx.TensorProto.FLOAT, [None]))
    return result


def _folded_prefix(node, bns: dict) -> str | None:
    """The recorded BN whose arithmetic `node` finishes: a conv over its folded weight, or the Add writing an
    affine BN's output."""
    for bn in bns.values():
        if bn.weight and node.op_type == "Conv" and len(node.input) > 1 and node.input[1] == bn.weight:
            return bn.prefix
        if not bn.weight and node.op_type == "Add" and node.output[0] == bn.output:
            return bn.prefix
    return None


def _attributes(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _batch_norm(model, bn: FoldedBN, z: str, rank: int, pieces: list[str]) -> list:
    """y = (z − mean_b)·γ/√(var_b + ε) + β over the batch and spatial axes; appends the statistics' names."""
    p = f"{bn.prefix}/batch"
    axes = [0, *range(2, rank)]
    shape = numpy_helper.from_array(np.array([1, -1] + [1] * (rank - 2), np.int64), f"{p}/c_shape")
    flat = numpy_helper.from_array(np.array([-1], np.int64), f"{p}/flat")
    one = numpy_helper.from_array(np.array(1.0, np.float32), f"{p}/one")
    model.graph.initializer.extend([shape, flat, one])
    pieces += [f"{p}/mean_flat", f"{p}/var_unbiased"]
    return [helper.make_node("ReduceMean", [z], [f"{p}/mean"], axes=axes, keepdims=1),
            helper.make_node("Sub", [z, f"{p}/mean"], [f"{p}/centered"]),
            helper.make_node("Mul", [f"{p}/centered", f"{p}/centered"], [f"{p}/squared"]),
            helper.make_node("ReduceMean", [f"{p}/squared"], [f"{p}/var"], axes=axes, keepdims=1),
            helper.make_node("Add", [f"{p}/var", f"{bn.prefix}/eps"], [f"{p}/var_eps"]),
            helper.make_node("Sqrt", [f"{p}/var_eps"], [f"{p}/std"]),
            helper.make_node("Div", [f"{p}/centered", f"{p}/std"], [f"{p}/normed"]),
            helper.make_node("Reshape", [bn.gamma, f"{p}/c_shape"], [f"{p}/gamma"]),
            helper.make_node("Reshape", [bn.beta, f"{p}/c_shape"], [f"{p}/beta"]),
            helper.make_node("Mul", [f"{p}/normed", f"{p}/gamma"], [f"{p}/scaled_b"]),
            helper.make_node("Add", [f"{p}/scaled_b", f"{p}/beta"], [bn.output]),
            helper.make_node("Reshape", [f"{p}/mean", f"{p}/flat"], [f"{p}/mean_flat"]),
            helper.make_node("Reshape", [f"{p}/var", f"{p}/flat"], [f"{p}/var_flat"]),
            # n/(n−1) with n = elements per channel = Size(z) / channels
            helper.make_node("Size", [z], [f"{p}/size"]),
            helper.make_node("Size", [f"{p}/mean"], [f"{p}/channels"]),
            helper.make_node("Div", [f"{p}/size", f"{p}/channels"], [f"{p}/count_i"]),
            helper.make_node("Cast", [f"{p}/count_i"], [f"{p}/count"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Sub", [f"{p}/count", f"{p}/one"], [f"{p}/count_1"]),
            helper.make_node("Div", [f"{p}/count", f"{p}/count_1"], [f"{p}/bessel"]),
            helper.make_node("Mul", [f"{p}/var_flat", f"{p}/bessel"], [f"{p}/var_unbiased"])]




def statistics_layout(model: onnx.ModelProto) -> list[StateLayout]:
    """Where each running statistic lives in the flat `bn_stats` vector (the bundle's statistics state)."""
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    layout, offset = [], 0
    for name in statistics_names(model):
        size = int(np.prod(dims[name]))
        layout.append(StateLayout(name, dims[name], offset, size))
        offset += size
    return layout


def statistics_as_input(model: onnx.ModelProto, layout: list[StateLayout]) -> onnx.ModelProto:
    """`model` reading the BN statistics of `layout` that it has from one flat graph input, `bn_stats` (the whole
    vector, in every graph), instead of from initializers: the engines then cannot fold them into the weights,
    and a device feeds re-estimated statistics (AdaBN) without touching the graph."""
    present = {i.name for i in model.graph.initializer} & {p.name for p in layout}
    if not present:
        return model
    result = copy.deepcopy(model)
    kept = [i for i in result.graph.initializer if i.name not in present]
    del result.graph.initializer[:]
    result.graph.initializer.extend(kept)
    sliced = GraphBuilder({o for n in model.graph.node for o in n.output}, {}, "bnstats")
    for p in layout:  # one Slice per statistic the graph reads
        if p.name in present:
            piece = sliced.slice(STATISTICS_INPUT, p.offset, p.offset + p.size)
            sliced.nodes.append(helper.make_node("Reshape", [piece, sliced.const(p.shape, np.int64)], [p.name],
                                                 name=f"bnstats/{p.name}/unpack"))
    nodes = sliced.nodes
    result.graph.initializer.extend(sliced.initializers)
    old = list(result.graph.node)
    del result.graph.node[:]
    result.graph.node.extend(nodes + old)
    total = sum(p.size for p in layout)
    result.graph.input.append(helper.make_tensor_value_info(STATISTICS_INPUT, onnx.TensorProto.FLOAT, [total]))
    return result
