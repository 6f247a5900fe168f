"""Constant folding for the portable graphs: every subgraph that depends only on frozen initializers (a frozen
conv's BN-folded weight W·γ/√(σ²+ε), shape arithmetic of constants) is computed once at export and stored as an
initializer. Engines then see frozen weights as plain constants, and the backward pass can give the ones it reads
a private copy (see gradients.frozen_copy)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import numpy_helper


def _constant_nodes(model: onnx.ModelProto, variable: set[str]) -> list:
    """Nodes computable from initializers outside `variable` alone."""
    constant = {init.name for init in model.graph.initializer if init.name not in variable}
    nodes = []
    for node in model.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        if all(not name or name in constant for name in node.input):
            nodes.append(node)
            constant.update(node.output)
    return nodes


def fold_constants(model: onnx.ModelProto, variable: set[str]) -> onnx.ModelProto:
    """`model` with every constant subgraph (not touching `variable` initializers or graph inputs) evaluated."""
    from edgeadapt.runtime.ort import onnxruntime_module

    onnxruntime = onnxruntime_module()

    nodes = _constant_nodes(model, variable)
    folded = {id(n) for n in nodes}
    produced = {o for n in nodes for o in n.output}
    kept_nodes = [n for n in model.graph.node if id(n) not in folded]
    frontier = sorted({name for n in kept_nodes for name in n.input if name in produced} |
                      {o.name for o in model.graph.output if o.name in produced})
    if not frontier:
        return model
    read = {name for n in nodes for name in n.input}  # only these: not every frozen weight of the model
    probe = onnx.helper.make_graph(nodes, "constants", [], [onnx.helper.make_empty_tensor_value_info(n)
                                                             for n in frontier],
                                   initializer=[i for i in model.graph.initializer if i.name in read])
    probe_model = onnx.helper.make_model(probe, opset_imports=model.opset_import)
    probe_model.ir_version = model.ir_version
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    values = onnxruntime.InferenceSession(probe_model.SerializeToString(), options,
                                          providers=["CPUExecutionProvider"]).run(frontier, {})
    result = copy.deepcopy(model)
    del result.graph.node[:]
    result.graph.node.extend(kept_nodes)
    used = {name for n in kept_nodes for name in n.input} | {o.name for o in model.graph.output}
    initializers = [i for i in model.graph.initializer if i.name in used]
    initializers += [numpy_helper.from_array(np.asarray(v), name) for name, v in zip(frontier, values)]
    del result.graph.initializer[:]
    result.graph.initializer.extend(initializers)
    return result
