"""Split bundles: when the frozen part of the network is a prefix (presets `head`, `last:K`), emit it as a plain
inference model (`prefix.onnx`, for an NPU, a GPU or a feature cache) and the trainable rest as training artifacts
(`suffix_*`) that take the boundary tensor as input. The whole-graph artifacts stay in the bundle."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import shape_inference
from onnx.utils import Extractor

from edgeadapt.runtime.manifest import SplitSpec

INPUT, OUTPUT = "input", "logits"


def _from_input(model: onnx.ModelProto) -> set[str]:
    """Tensors computed from the graph input (as opposed to constants and weights)."""
    reached = {INPUT}
    for node in model.graph.node:
        if any(name in reached for name in node.input):
            reached.update(node.output)
    return reached


def find_boundary(model: onnx.ModelProto, trainable: list[str]) -> str | None:
    """The one tensor where data enters the trainable part, if the frozen part is a prefix; else None."""
    dependent, consumers = set(trainable), []
    for node in model.graph.node:
        if any(name in dependent for name in node.input):
            dependent.update(node.output)
            consumers.append(node)
    data = _from_input(model)
    frontier = {name for node in consumers for name in node.input if name in data and name not in dependent}
    if len(frontier) != 1 or frontier == {INPUT}:
        return None
    return frontier.pop()


def _shape(model: onnx.ModelProto, name: str) -> list[int]:
    for value in model.graph.value_info:
        if value.name == name:
            return [d.dim_value if d.dim_value > 0 else -1 for d in value.type.tensor_type.shape.dim]
    raise ValueError(f"no shape for {name}")


def _suffix_graph(model: onnx.ModelProto, boundary: str) -> onnx.ModelProto:
    """Graph from the boundary to the logits. The Extractor keeps the weights the suffix needs as initializers."""
    suffix = Extractor(model).extract_model([boundary], [OUTPUT])
    suffix.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    suffix.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    return suffix


def build_split(model: onnx.ModelProto, trainable: list[str], frozen: list[str], out_dir: Path,
                make_artifacts) -> SplitSpec | None:
    """Write prefix.onnx and the suffix_* artifacts; `make_artifacts(graph, trainable, frozen, prefix)` builds the
    training artifacts. Returns the manifest's split section, or None when the frozen part is not a prefix."""
    inferred = shape_inference.infer_shapes(model)
    boundary = find_boundary(inferred, trainable)
    if boundary is None:
        return None
    shape = _shape(inferred, boundary)
    shape[0] = -1
    prefix = Extractor(inferred).extract_model([INPUT], [boundary])
    prefix.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    prefix.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    del prefix.graph.value_info[:]
    onnx.save(prefix, str(out_dir / "prefix.onnx"))
    suffix = _suffix_graph(inferred, boundary)
    del suffix.graph.value_info[:]
    names = {init.name for init in suffix.graph.initializer}
    make_artifacts(suffix, [n for n in trainable if n in names], [n for n in frozen if n in names], "suffix_")
    return SplitSpec(boundary=boundary, boundary_shape=shape)
