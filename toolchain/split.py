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
from edgeadapt.runtime.manifest import SplitSpec
from edgeadapt.toolchain.bn import statistics_as_input
from edgeadapt.toolchain.stages import INPUT_NAME as INPUT
from edgeadapt.toolchain.stages import OUTPUT_NAME as OUTPUT

SUFFIX = "suffix_"


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


def _shape(model: onnx.ModelProto, name: str) -> list[int]:
    for value in model.graph.value_info:
        if value.name == name:
            return [d.dim_value if d.dim_value > 0 else -1 for d in value.type.tensor_type.shape.dim]
    raise ValueError(f"no shape for {name}")


def _extract(model: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    part = Extractor(model).extract_model(inputs, outputs)
    part.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    part.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    del part.graph.value_info[:]
    return part


def build_split(model: onnx.ModelProto, lists, out_dir: Path, make_graphs, whole,
                statistics: list | None = None) -> SplitSpec | None:
    """Write prefix.onnx and the suffix's graphs (`make_graphs(graph, trainable, frozen, prefix)`); the split
    section of the manifest, or None when the frozen part is not a prefix of the network."""
    inferred = shape_inference.infer_shapes(model)
    boundary = find_boundary(inferred, lists.trainable)
    if boundary is None:
        return None
    suffix = _extract(inferred, [boundary], [OUTPUT])
    names = {init.name for init in suffix.graph.initializer}
    if not set(lists.trainable) <= names:
        return None
    shape = _shape(inferred, boundary)
    shape[0] = -1
    prefix = _extract(inferred, [INPUT], [boundary])
    read = {init.name for init in prefix.graph.initializer}
    onnx.save(statistics_as_input(prefix, statistics or []), str(out_dir / "prefix.onnx"))
    frozen = [n for n in lists.frozen + lists.buffers if n in names]
    suffix_spec = make_graphs(suffix, lists.trainable, frozen, SUFFIX)
    if suffix_spec.layout != whole.layout:
        raise InternalError("the suffix's state layout differs from the whole graph's")
    return SplitSpec(boundary=boundary, boundary_shape=shape, suffix_prefix=SUFFIX,
                     prefix_statistics=[p.name for p in statistics or [] if p.name in read])
