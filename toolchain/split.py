"""Split bundles: when the frozen part of the network is a prefix (presets `head`, `last:K`), emit it as a plain
inference model (`prefix.onnx`, for an NPU, a GPU or a feature cache) and the trainable rest as training graphs
(`suffix_*`) that take the boundary tensor as input. The suffix trains exactly the whole graph's trainable
parameters, so both share one state file.

Where data crosses the cut in several tensors (a transformer's hidden states and its attention mask), the prefix
packs them, flattened per sample, into one float tensor and the suffix unpacks it: every runtime still sees one
boundary of shape [batch, features]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeadapt.runtime.errors import InternalError
from edgeadapt.runtime.manifest import SUFFIX_PREFIX, SplitSpec
from edgeadapt.toolchain.bn import copy_fold_record, statistics_as_input
from edgeadapt.toolchain.graph_builder import inferred_shapes, with_inferred_types
from edgeadapt.toolchain.stages import INPUT_NAME as INPUT
from edgeadapt.toolchain.stages import OUTPUT_NAME as OUTPUT

SUFFIX = SUFFIX_PREFIX


def _from_input(model: onnx.ModelProto) -> set[str]:
    """Tensors computed from the graph input (as opposed to constants and weights)."""
    reached = {INPUT}
    for node in model.graph.node:
        if any(name in reached for name in node.input):
            reached.update(node.output)
    return reached


WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


PACKED = "boundary_packed"


def find_boundary(model: onnx.ModelProto, trainable: list[str]) -> list[str] | None:
    """The tensors where data enters the trainable part, if the frozen part is a prefix with weights of its own
    (a prefix of padding or reshapes alone is not worth a model); else None."""
    dependent, consumers = set(trainable), []
    for node in model.graph.node:
        if any(name in dependent for name in node.input):
            dependent.update(node.output)
            consumers.append(node)
    data = _from_input(model)
    frontier = {name for node in consumers for name in node.input if name in data and name not in dependent}
    frozen_layers = [n for n in model.graph.node if n.op_type in WEIGHTED and not set(n.output) & dependent]
    if not frontier or INPUT in frontier or not frozen_layers:
        return None
    return sorted(frontier)


def _measured_shape(name: str, shapes: dict) -> list[int]:
    """`name`'s shape with -1 for the batch, from graph_builder.inferred_shapes (measured by running the graph:
    static inference loses sizes behind shape arithmetic such as EfficientNet's SAME padding)."""
    return [-1 if d == "batch" else int(d) for d in shapes[name]]


def _reachable_nodes(graph: onnx.GraphProto, inputs: list[str], outputs: list[str]) -> list[onnx.NodeProto]:
    """The nodes `outputs` need, walking back from them and stopping at `inputs`, in the graph's order (one pass
    over the graph: onnx.utils' Extractor scans every node per tensor, quadratic in a backbone's thousands)."""
    producer = {name: index for index, node in enumerate(graph.node) for name in node.output}
    stop, seen, reached = set(inputs), set(), set()
    pending = list(outputs)
    while pending:
        name = pending.pop()
        if name in stop or name in seen:
            continue
        seen.add(name)
        index = producer.get(name)
        if index is not None and index not in reached:
            reached.add(index)
            pending.extend(graph.node[index].input)
    return [graph.node[index] for index in sorted(reached)]


def _extract(model: onnx.ModelProto, inputs: list[str], outputs: list[str],
             input_shapes: list[list[int]] | None = None) -> onnx.ModelProto:
    """The subgraph of the shape-inferred `model` from `inputs` to `outputs`, with the weights it reads. ValueError
    where it would read a tensor that is none of these, or an input or output has no inferred type."""
    graph = model.graph
    typed = {v.name: v for v in [*graph.value_info, *graph.input, *graph.output]}
    nodes = _reachable_nodes(graph, inputs, outputs)
    read = {name for node in nodes for name in node.input}
    weights = [t for t in graph.initializer if t.name in read]
    known = {*inputs, *(t.name for t in weights), *(name for node in nodes for name in node.output), ""}
    missing = (read - known) | ({*inputs, *outputs} - typed.keys())
    if missing:
        raise ValueError(f"the part from {inputs} to {outputs} also needs {sorted(missing)}")
    part = helper.make_model(
        helper.make_graph(nodes, f"{graph.name} extracted", [typed[n] for n in inputs], [typed[n] for n in outputs],
                          initializer=weights),
        ir_version=model.ir_version, opset_imports=model.opset_import, functions=model.functions)
    for value, shape in zip(part.graph.input, input_shapes or [[] for _ in inputs]):
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(dims, shape):
            if size > 0:
                dim.dim_value = size
        dims[0].dim_param = "batch"
    for value in part.graph.output:
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    del part.graph.value_info[:]
    return part


def _element_types(model: onnx.ModelProto, names: list[str]) -> list[int]:
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    return [types.get(n, TensorProto.FLOAT) for n in names]


def _pack(prefix: onnx.ModelProto, names: list[str], types: list[int]) -> onnx.ModelProto:
    """The prefix's outputs `names` as one float tensor [batch, Σ features]."""
    flat = []
    for name, kind in zip(names, types):
        value = name if kind == TensorProto.FLOAT else f"{name}/as_float"
        if kind != TensorProto.FLOAT:
            prefix.graph.node.append(helper.make_node("Cast", [name], [value], to=TensorProto.FLOAT))
        prefix.graph.node.append(helper.make_node("Flatten", [value], [f"{name}/flat"], axis=1))
        flat.append(f"{name}/flat")
    prefix.graph.node.append(helper.make_node("Concat", flat, [PACKED], axis=1))
    del prefix.graph.output[:]
    prefix.graph.output.append(helper.make_tensor_value_info(PACKED, TensorProto.FLOAT, ["batch", None]))
    return prefix


def _unpack(suffix: onnx.ModelProto, names: list[str], shapes: list[list[int]], types: list[int]) -> onnx.ModelProto:
    """The suffix reads the packed boundary and restores each tensor's shape and type before its own nodes."""
    sizes = [int(np.prod(s[1:])) for s in shapes]
    parts = [f"{n}/flat" for n in names]
    nodes = [helper.make_node("Split", [PACKED, f"{PACKED}/sizes"], parts, axis=1)]
    for name, part, shape, kind in zip(names, parts, shapes, types):
        target = name if kind == TensorProto.FLOAT else f"{name}/as_float"
        nodes.append(helper.make_node("Reshape", [part, f"{name}/shape"], [target]))
        suffix.graph.initializer.append(numpy_helper.from_array(np.array([-1, *shape[1:]], np.int64), f"{name}/shape"))
        if kind != TensorProto.FLOAT:
            nodes.append(helper.make_node("Cast", [target], [name], to=kind))
    suffix.graph.initializer.append(numpy_helper.from_array(np.array(sizes, np.int64), f"{PACKED}/sizes"))
    existing = list(suffix.graph.node)
    del suffix.graph.node[:]
    suffix.graph.node.extend(nodes + existing)
    del suffix.graph.input[:]
    suffix.graph.input.append(helper.make_tensor_value_info(PACKED, TensorProto.FLOAT, ["batch", sum(sizes)]))
    return suffix


def split_suffix(model: onnx.ModelProto, trainable: list[str], shapes: dict | None = None,
                 inferred: onnx.ModelProto | None = None):
    """(shape-inferred model, boundary, its shape, suffix graph) when the frozen part is a prefix holding none of
    `trainable`, else None. `shapes` and `inferred`, when given, are the model's measured and inferred shapes."""
    inferred = inferred or with_inferred_types(model)
    crossing = find_boundary(inferred, trainable)
    if crossing is None:
        return None
    shapes = shapes or inferred_shapes(model, typed=inferred)  # once: a run of the whole graph
    measured = {name: _measured_shape(name, shapes) for name in crossing}
    # shape arithmetic (no batch axis: a Reshape's target) is recomputed in the suffix from the tensors that cross
    crossing = [name for name in crossing if measured[name] and measured[name][0] == -1]
    if not crossing:
        return None
    measured = [measured[name] for name in crossing]
    try:
        suffix = copy_fold_record(model, _extract(inferred, crossing, [OUTPUT], measured))
    except ValueError:  # the suffix needs more than the tensors that cross, or one has no inferred type
        return None
    if {i.name for i in suffix.graph.input} != set(crossing) or \
            not set(trainable) <= {init.name for init in suffix.graph.initializer}:
        return None
    if len(crossing) == 1:
        return inferred, crossing[0], measured[0], suffix
    suffix = _unpack(suffix, crossing, measured, _element_types(inferred, crossing))
    return inferred, crossing, [-1, sum(int(np.prod(s[1:])) for s in measured)], suffix


def build_split(model: onnx.ModelProto, lists, out_dir: Path, make_graphs, whole,
                statistics: list | None = None) -> SplitSpec | None:
    """Write prefix.onnx and the suffix's graphs (`make_graphs(graph, trainable, frozen, prefix)`); the split
    section of the manifest, or None when the frozen part is not a prefix of the network."""
    found = split_suffix(model, lists.trainable)
    if found is None:
        return None
    inferred, crossing, shape, suffix = found
    names = {init.name for init in suffix.graph.initializer}
    if isinstance(crossing, list):
        prefix, boundary = _pack(_extract(inferred, [INPUT], crossing), crossing,
                                 _element_types(inferred, crossing)), PACKED
    else:
        prefix, boundary = _extract(inferred, [INPUT], [crossing]), crossing
    read = {init.name for init in prefix.graph.initializer}
    onnx.save(statistics_as_input(prefix, statistics or []), str(out_dir / "prefix.onnx"))
    frozen = [n for n in lists.frozen + lists.buffers if n in names]
    suffix_spec = make_graphs(suffix, lists.trainable, frozen, SUFFIX)
    if suffix_spec.layout != whole.layout:
        raise InternalError("the suffix's state layout differs from the whole graph's")
    return SplitSpec(boundary=boundary, boundary_shape=shape, suffix_prefix=SUFFIX,
                     prefix_statistics=[p.name for p in statistics or [] if p.name in read])
