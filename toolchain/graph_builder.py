"""A small helper for writing standard-ONNX subgraphs: unique names, nodes, constants, and static shapes."""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper, numpy_helper

Dim = int | str | None  # a size, a symbolic name (the batch), or unknown
# onnxruntime-web's WebGPU provider binds at most 10 storage buffers per node (inputs and outputs that are not
# constants), and (1.30) computes a Split or Concat of 8 or more pieces wrongly: the portable graphs keep every node
# within 8 tensors, so they run there as on every CPU engine.
MAX_NODE_TENSORS = 8


class GraphBuilder:
    """Collects nodes and constant initializers to append to a graph; names never clash with the graph's own."""

    def __init__(self, taken: set[str], shapes: dict[str, list[Dim]], tag: str = "g"):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.shapes = shapes
        self._taken = set(taken)
        self._tag = tag
        self._count = 0
        self._constants: dict[tuple, str] = {}
        self.constants: dict[str, np.ndarray] = {}  # values of the source graph's constants, by tensor name
        self.statistics: set[str] = set()  # BN running statistics: constants a device may replace
        self.producers: dict[str, onnx.NodeProto] = {}  # the source graph's node producing each tensor
        self.folded_weights: set[str] = set()  # conv weights the BN fold computes as W·scale (toolchain/bn.py)
        self.per_element_vectors: list[str] = []  # flat vectors of per-tensor constants (folded at load)

    def name(self, hint: str) -> str:
        while True:
            self._count += 1
            candidate = f"{self._tag}/{hint}_{self._count}"
            if candidate not in self._taken:
                self._taken.add(candidate)
                return candidate

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        """Add one node with one output; returns the output's name."""
        return self.ops(op_type, inputs, 1, **attrs)[0]

    def ops(self, op_type: str, inputs: list[str], outputs: int, **attrs) -> list[str]:
        names = [self.name(op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.name(op_type + "_node"), **attrs))
        return names

    def split(self, source: str, sizes: list[int], axis: int = 0) -> list[str]:
        """`source` cut into pieces of `sizes` along `axis`: one Split when it stays within MAX_NODE_TENSORS, else
        a Slice per piece (each reads only its part: no more copying than one Split)."""
        if len(sizes) + 1 <= MAX_NODE_TENSORS:
            return self.ops("Split", [source, self.const(sizes, np.int64)], len(sizes), axis=axis)
        pieces, start = [], 0
        for size in sizes:
            pieces.append(self.slice(source, start, start + size, axis))
            start += size
        return pieces

    def slice(self, source: str, start: int, end: int, axis: int = 0, output: str | None = None) -> str:
        """`source[start:end]` along `axis` (two tensors: within any engine's per-node limit)."""
        inputs = [source, self.const([start], np.int64), self.const([end], np.int64), self.const([axis], np.int64)]
        if output is None:
            return self.op("Slice", inputs)
        self.nodes.append(helper.make_node("Slice", inputs, [output], name=self.name("Slice_node")))
        return output

    def concat(self, pieces: list[str], axis: int = 0, output: str | None = None) -> str:
        """One tensor from `pieces` along `axis`: a tree of Concats of at most MAX_NODE_TENSORS − 1 inputs."""
        fan_in = MAX_NODE_TENSORS - 1
        while len(pieces) > fan_in:
            pieces = [self.op("Concat", pieces[i:i + fan_in], axis=axis) for i in range(0, len(pieces), fan_in)]
        if output is None:
            return self.op("Concat", pieces, axis=axis)
        self.nodes.append(helper.make_node("Concat", pieces, [output], name=self.name("Concat_node"), axis=axis))
        return output

    def const(self, value, dtype=np.float32) -> str:
        """A constant initializer (deduplicated by value for small ones)."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 16 else None
        if key is not None and key in self._constants:
            return self._constants[key]
        name = self.name("const")
        self.initializers.append(numpy_helper.from_array(array, name))
        if key is not None:
            self._constants[key] = name
        return name

    def shape(self, tensor: str) -> list[Dim]:
        shape = self.shapes.get(tensor)
        if shape is None:
            raise KeyError(tensor)
        return shape

    def static(self, tensor: str) -> list[int]:
        """The shape without the batch dimension must be known; the batch stays symbolic (-1)."""
        dims = self.shape(tensor)
        if any(d is None for d in dims):
            raise KeyError(tensor)
        return [d if isinstance(d, int) else -1 for d in dims]


SHAPE_ARITHMETIC_ELEMENTS = 1024  # initializers up to this size may be shape arithmetic's operands (shapes, scales)


def with_inferred_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with onnx's inferred value_info, as `onnx.shape_inference.infer_shapes` gives it, without serializing
    the weights for it (0.55 s -> 0.01 s for MiniLM's 124 MB step): initializers larger than any shape arithmetic's
    operands enter the inference as typed graph inputs, since only their types bear on shapes."""
    graph = model.graph
    big = [t for t in graph.initializer if np.prod(t.dims) > SHAPE_ARITHMETIC_ELEMENTS]
    listed = {value.name for value in graph.input}
    as_inputs = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in big if t.name not in listed]
    skipped = {t.name for t in big}
    light = helper.make_model(
        helper.make_graph(graph.node, graph.name, [*graph.input, *as_inputs], graph.output,
                          initializer=[t for t in graph.initializer if t.name not in skipped],
                          value_info=graph.value_info),
        ir_version=model.ir_version, opset_imports=model.opset_import, functions=model.functions)
    typed = onnx.shape_inference.infer_shapes(light).graph
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for field in ("value_info", "output"):
        del getattr(result.graph, field)[:]
        getattr(result.graph, field).extend(getattr(typed, field))
    return result


def inferred_shapes(model: onnx.ModelProto, batches: tuple[int, int] = (2, 3),
                    typed: onnx.ModelProto | None = None) -> dict[str, list[Dim]]:
    """Shapes of every tensor, measured: the graph runs at two batch sizes; a dimension that follows the batch is
    symbolic ("batch"), the rest are static. (Static inference loses sizes behind shape arithmetic such as
    TensorFlow-style 'SAME' padding.) `typed`: the model with its inferred types, where the caller has it."""
    from edgeadapt.runtime.ort import onnxruntime_module

    onnxruntime = onnxruntime_module()

    typed = typed or with_inferred_types(model)
    types = {v.name: v.type for v in [*typed.graph.value_info, *typed.graph.output]}
    probe = copy.deepcopy(model)
    del probe.graph.output[:]
    outputs = [o for n in model.graph.node for o in n.output if o and o in types]
    probe.graph.output.extend(helper.make_value_info(name, types[name]) for name in outputs)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    runs = [dict(zip(outputs, session.run(outputs, _example_feed(model, batch)))) for batch in batches]
    shapes: dict[str, list[Dim]] = {name: [a if a == c else "batch" for a, c in zip(runs[0][name].shape,
                                                                                   runs[1][name].shape)]
                                    for name in outputs}
    for value in model.graph.input:
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else "batch" for d in
                              value.type.tensor_type.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _example_feed(model: onnx.ModelProto, batch: int) -> dict[str, np.ndarray]:
    feed = {}
    for value in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in value.type.tensor_type.shape.dim]
        if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            feed[value.name] = np.random.default_rng(0).standard_normal(dims).astype(np.float32)
        else:  # token ids: id 0 is valid in every vocabulary
            feed[value.name] = np.zeros(dims, onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
    return feed
