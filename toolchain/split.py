"""Split bundles: when the frozen part of the network is a prefix (presets `head`, `last:K`), emit it as a plain
inference model (`prefix.onnx`, for an NPU, a GPU or a feature cache) and the trainable rest as training graphs
(`suffix_*`) that take the boundary tensor as input. The suffix trains exactly the whole graph's trainable
parameters, so both share one state file."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import shape_inference
from onnx.utils import Extractor

from edgeadapt.runtime.errors import InternalError
from edgeadapt.runtime.manifest import SUFFIX_PREFIX, SplitSpec
from edgeadapt.toolchain.bn import copy_fold_record, statistics_as_input
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


def find_boundary(model: onnx.ModelProto, trainable: list[str]) -> str | None:
    """The one tensor where data enters the trainable part, if the frozen part is a prefix with weights of its own
    (a prefix of padding or reshapes alone is not worth a model); else None."""
    dependent, consumers = set(trainable), []
    for node in model.graph.node:
        if any(name in dependent for name in node.input):
            dependent.update(node.output)
            consumers.append(node)
    data = _from_input(model)
    frontier = {name for node in consumers for name in node.input if name in data and name not in dependent}
    frozen_layers = [n for n in model.graph.node if n.op_type in WEIGHTED and not set(n.output) & dependent]
    if len(frontier) != 1 or frontier == {INPUT} or not frozen_layers:
        return None
    return frontier.pop()


def _measured_shape(model: onnx.ModelProto, name: str, shapes: dict | None = None) -> list[int]:
    """`name`'s shape with -1 for the batch, measured by running the graph (static inference loses sizes behind
    shape arithmetic such as EfficientNet's SAME padding); `shapes`: graph_builder.inferred_shapes(model)."""
    from edgeadapt.toolchain.graph_builder import inferred_shapes

    return [-1 if d == "batch" else int(d) for d in (shapes or inferred_shapes(model))[name]]


def _extract(model: onnx.ModelProto, inputs: list[str], outputs: list[str],
             input_shape: list[int] | None = None) -> onnx.ModelProto:
    part = Extractor(model).extract_model(inputs, outputs)
    dims = part.graph.input[0].type.tensor_type.shape.dim
    for dim, size in zip(dims, input_shape or []):
        if size > 0:
            dim.dim_value = size
    dims[0].dim_param = "batch"
    part.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    del part.graph.value_info[:]
    return part


def split_suffix(model: onnx.ModelProto, trainable: list[str], shapes: dict | None = None,
                 inferred: onnx.ModelProto | None = None):
    """(shape-inferred model, boundary, its shape, suffix graph) when the frozen part is a prefix holding none of
    `trainable`, else None. `shapes` and `inferred`, when given, are the model's measured and inferred shapes."""
    inferred = inferred or shape_inference.infer_shapes(model)
    boundary = find_boundary(inferred, trainable)
    if boundary is None:
        return None
    shape = _measured_shape(model, boundary, shapes)
    suffix = copy_fold_record(model, _extract(inferred, [boundary], [OUTPUT], shape))
    if not set(trainable) <= {init.name for init in suffix.graph.initializer}:
        return None
    return inferred, boundary, shape, suffix


def build_split(model: onnx.ModelProto, lists, out_dir: Path, make_graphs, whole,
                statistics: list | None = None) -> SplitSpec | None:
    """Write prefix.onnx and the suffix's graphs (`make_graphs(graph, trainable, frozen, prefix)`); the split
    section of the manifest, or None when the frozen part is not a prefix of the network."""
    found = split_suffix(model, lists.trainable)
    if found is None:
        return None
    inferred, boundary, shape, suffix = found
    names = {init.name for init in suffix.graph.initializer}
    prefix = _extract(inferred, [INPUT], [boundary])
    read = {init.name for init in prefix.graph.initializer}
    onnx.save(statistics_as_input(prefix, statistics or []), str(out_dir / "prefix.onnx"))
    frozen = [n for n in lists.frozen + lists.buffers if n in names]
    suffix_spec = make_graphs(suffix, lists.trainable, frozen, SUFFIX)
    if suffix_spec.layout != whole.layout:
        raise InternalError("the suffix's state layout differs from the whole graph's")
    return SplitSpec(boundary=boundary, boundary_shape=shape, suffix_prefix=SUFFIX,
                     prefix_statistics=[p.name for p in statistics or [] if p.name in read])
