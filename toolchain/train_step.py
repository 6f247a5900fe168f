"""The portable training step: one standard-ONNX graph that any maintained engine can run.

    train_step(input, [bn_stats], labels, lr, step, params, [adam_m, adam_v])
        -> loss, logits, params.new, [adam_m.new, adam_v.new]

and its accumulating twin, which also takes `grad_sum` (the weighted gradient of earlier micro-batches, or [0])
and `grad_share` (this micro-batch's share of the effective batch), updates with grad_sum + share · gradient and
gives that sum as `grad_sum.new`: N micro-batches train as one N× batch (BN statistics are frozen).

`params` holds every trainable tensor flattened into one vector (the layout is recorded in the manifest), so AdamW
is a handful of vector ops whatever the model. Frozen weights stay initializers; BN running statistics come in as
one more flat input, `bn_stats` (frozen: no gradient, no optimizer state), so a device can re-estimate them
(AdaBN) without touching the graphs. `forward(input, params) -> logits`
is the eval/inference graph over the same state. Losses follow PyTorch's definitions and AdamW ONNX Runtime
training's; the losses' gradients are written analytically, the model's by `gradients.backward`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeadapt.runtime.manifest import GRAD_SHARE, GRAD_SUM, ParamGroup, StateLayout
from edgeadapt.toolchain.bn import folded_weights, statistics_as_input
from edgeadapt.toolchain.fold import fold_constants
from edgeadapt.toolchain.gradients import backward, prune
from edgeadapt.toolchain.graph_builder import GraphBuilder, inferred_shapes

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
IR_VERSION = 8  # read by onnxruntime 1.19 and every later engine


@dataclass(frozen=True)
class PortableGraphs:
    step: onnx.ModelProto
    forward: onnx.ModelProto
    layout: list[StateLayout]
    state_names: list[str]
    kept_bytes_per_sample: int  # forward activations the backward pass reads (the planner's main term)
    largest_bytes_per_sample: int  # the largest forward tensor
    constant_bytes: int = 0  # what the step's and the forward graph's sessions hold whatever the batch: their
    #                          initializers (frozen weights, the backward's private copies) and the per-element
    #                          group vectors the engine folds at load
    accumulating_step: onnx.ModelProto | None = None
    masked_bytes_per_sample: int = 0  # the part of the kept bytes that only gradient masks and Shape read


def state_layout(model: onnx.ModelProto, trainable: list[str]) -> list[StateLayout]:
    dims = {init.name: list(init.dims) for init in model.graph.initializer}
    layout, offset = [], 0
    for name in trainable:
        size = int(np.prod(dims[name])) if dims[name] else 1
        layout.append(StateLayout(name, dims[name], offset, size))
        offset += size
    return layout


def _unpack_params(b: GraphBuilder, layout: list[StateLayout]) -> None:
    """params (flat) → one tensor per trainable parameter, under the parameter's own name."""
    pieces = b.split("params", [p.size for p in layout]) if len(layout) > 1 else ["params"]
    for piece, p in zip(pieces, layout):
        b.nodes.append(helper.make_node("Reshape", [piece, b.const(p.shape, np.int64)], [p.name],
                                        name=b.name("unpack")))


def _without_trainable(model: onnx.ModelProto, trainable: set[str]) -> onnx.ModelProto:
    result = copy.deepcopy(model)
    kept = [init for init in result.graph.initializer if init.name not in trainable]
    del result.graph.initializer[:]
    result.graph.initializer.extend(kept)
    return result


def _finish(model: onnx.ModelProto, b: GraphBuilder, head: list, inputs: list, outputs: list) -> onnx.ModelProto:
    nodes = prune(head + list(model.graph.node) + b.nodes, {o.name for o in outputs})
    used = {name for node in nodes for name in node.input}
    initializers = [i for i in list(model.graph.initializer) + b.initializers if i.name in used]
    graph = helper.make_graph(nodes, model.graph.name, inputs, outputs, initializer=initializers)
    result = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _opset(model))],
                               producer_name="edgeadapt")
    result.ir_version = IR_VERSION
    return result


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _vector(name: str, size: int | str = "state") -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [size])


def build_forward(model: onnx.ModelProto, layout: list[StateLayout],
                  statistics: list[StateLayout] = ()) -> onnx.ModelProto:
    model = fold_constants(statistics_as_input(model, list(statistics)), {p.name for p in layout})
    base = _without_trainable(model, {p.name for p in layout})
    b = GraphBuilder(_names(model), {}, "unpack")
    _unpack_params(b, layout)
    head = list(b.nodes)
    b.nodes.clear()
    total = sum(p.size for p in layout)
    inputs = list(base.graph.input) + [_vector("params", total)]
    return _finish(base, b, head, inputs, list(base.graph.output))


def _names(model: onnx.ModelProto) -> set[str]:
    names = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer}
    return names | {o for n in model.graph.node for o in n.output}


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    return values


@dataclass
class _Backward:
    builder: GraphBuilder
    base: onnx.ModelProto  # the eval graph without the trainable initializers
    head: list  # nodes that unpack the flat params
    labels: onnx.ValueInfoProto
    loss: str
    flat_grad: str
    layout: list[StateLayout]
    shapes: dict


def _backward(model: onnx.ModelProto, trainable: list[str], loss: str, output: str,
              statistics: list[StateLayout]) -> _Backward:
    layout = state_layout(model, trainable)
    model = fold_constants(statistics_as_input(model, statistics), set(trainable))
    base = _without_trainable(model, set(trainable))
    shapes = inferred_shapes(model)
    b = GraphBuilder(_names(model), shapes, "step")
    b.constants = {k: v for k, v in _constants(model).items() if k not in set(trainable)}
    b.statistics = {p.name for p in statistics}
    b.producers = {out: node for node in base.graph.node for out in node.output}
    b.folded_weights = folded_weights(model)
    _unpack_params(b, layout)
    head = list(b.nodes)
    b.nodes.clear()
    labels = _labels_input(loss, shapes[output])
    loss_value, d_logits = LOSSES[loss](b, output, labels.name)
    grads = backward(b, base.graph, trainable, output, d_logits)
    flat = [b.op("Reshape", [grads[p.name], b.const([-1], np.int64)]) for p in layout]
    flat_grad = flat[0] if len(flat) == 1 else b.concat(flat)
    return _Backward(b, base, head, labels, loss_value, flat_grad, layout, shapes)


def _identity(b: GraphBuilder, source: str, name: str) -> None:
    b.nodes.append(helper.make_node("Identity", [source], [name], name=b.name("out")))


def build_gradient_graph(model: onnx.ModelProto, trainable: list[str], loss: str, output: str = "logits",
                         statistics: list[StateLayout] = ()) -> tuple[onnx.ModelProto, list[StateLayout]]:
    """(input, [bn_stats], labels, params) -> loss, logits, gradients: the step's backward pass alone, for
    validation."""
    bw = _backward(model, trainable, loss, output, list(statistics))
    _identity(bw.builder, bw.loss, "loss")
    _identity(bw.builder, bw.flat_grad, "gradients")
    total = sum(p.size for p in bw.layout)
    inputs = [*bw.base.graph.input, bw.labels, _vector("params", total)]
    outputs = [helper.make_tensor_value_info("loss", TensorProto.FLOAT, []), *bw.base.graph.output,
               _vector("gradients", total)]
    return _finish(bw.base, bw.builder, bw.head, inputs, outputs), bw.layout


def build_train_step(model: onnx.ModelProto, trainable: list[str], loss: str, optimizer: str,
                     groups: list[ParamGroup] = (), output: str = "logits",
                     statistics: list[StateLayout] = (), with_accumulating: bool = False) -> PortableGraphs:
    """The step (and, `with_accumulating`, its accumulating twin); each tensor's update uses its group's lr
    multiplier and decay (ungrouped: 1 and none)."""
    bw = _backward(model, trainable, loss, output, list(statistics))
    b = bw.builder
    total = sum(p.size for p in bw.layout)
    state_names = ["params", "adam_m", "adam_v"] if optimizer == "adamw" else ["params"]
    lr = _group_lr(b, bw.layout, groups)
    updates = _adamw(b, bw.flat_grad, lr, _group_decay(b, bw.layout, groups)) if optimizer == "adamw" \
        else [_sgd(b, bw.flat_grad, lr)]
    for new, name in zip(updates, state_names):
        _identity(b, new, f"{name}.new")
    _identity(b, bw.loss, "loss")
    inputs = [*bw.base.graph.input, bw.labels, helper.make_tensor_value_info("lr", TensorProto.FLOAT, []),
              helper.make_tensor_value_info("step", TensorProto.INT64, []),
              *(_vector(n, total) for n in state_names)]
    outputs = [helper.make_tensor_value_info("loss", TensorProto.FLOAT, []), *bw.base.graph.output,
               *(_vector(f"{n}.new", total) for n in state_names)]
    step = _finish(bw.base, b, bw.head, inputs, outputs)
    kept, masked, largest = _activation_bytes(step, bw.base, b, bw.shapes)
    forward = build_forward(model, bw.layout, statistics)
    constants = initializer_bytes(step) + initializer_bytes(forward) + 4 * total * len(b.per_element_vectors)
    return PortableGraphs(step, forward, bw.layout, state_names, kept, largest, constants,
                          accumulating(step, bw.flat_grad, total) if with_accumulating else None,
                          masked_bytes_per_sample=masked)


def accumulating(step: onnx.ModelProto, flat_grad: str, total: int) -> onnx.ModelProto:
    """The step whose update reads grad_sum + grad_share · gradient (and gives that sum as grad_sum.new) instead of
    the micro-batch's gradient alone. grad_sum may be [0] (broadcast): a first micro-batch needs no zero vector."""
    result = copy.deepcopy(step)
    graph = result.graph
    names = _names(result)
    scaled, summed = (_fresh(names, f"{flat_grad}_{tag}") for tag in ("shared", "summed"))
    for node in graph.node:  # the update's nodes read the sum
        node.input[:] = [summed if name == flat_grad else name for name in node.input]
    producer = next(i for i, node in enumerate(graph.node) if flat_grad in node.output)
    added = [helper.make_node("Mul", [flat_grad, GRAD_SHARE], [scaled], name=f"{scaled}_mul"),
             helper.make_node("Add", [GRAD_SUM, scaled], [summed], name=f"{summed}_add"),
             helper.make_node("Identity", [summed], [f"{GRAD_SUM}.new"], name=f"{GRAD_SUM}_out")]
    for offset, node in enumerate(added, start=producer + 1):
        graph.node.insert(offset, node)
    graph.input.extend([_vector(GRAD_SUM, "grad_sum_size"),
                        helper.make_tensor_value_info(GRAD_SHARE, TensorProto.FLOAT, [])])
    graph.output.append(_vector(f"{GRAD_SUM}.new", total))
    return result


def _fresh(taken: set[str], hint: str) -> str:
    name, n = hint, 0
    while name in taken:
        n += 1
        name = f"{hint}_{n}"
    taken.add(name)
    return name


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of a graph's initializers (what a session holds as constants)."""
    return sum(int(np.prod(init.dims)) * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
               for init in model.graph.initializer)


# Backward readers that only compare a forward tensor or take its shape (an activation's gradient mask, a reshape's
# target): no working set of the backward pass grows with what they read, unlike a weight gradient's.
MASK_READERS = frozenset({"Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal", "Sign", "Shape"})


def _activation_bytes(step: onnx.ModelProto, base: onnx.ModelProto, b: GraphBuilder,
                      shapes: dict) -> tuple[int, int, int]:
    """Per-sample bytes of the forward tensors that backward nodes read, of those of them that only mask readers
    read, and of the largest forward tensor."""
    forward = {o for n in base.graph.node for o in n.output} | {i.name for i in base.graph.input}
    backward = {n.name for n in b.nodes}
    readers: dict[str, set[str]] = {}
    for node in step.graph.node:
        if node.name in backward:
            for name in node.input:
                if name in forward:
                    readers.setdefault(name, set()).add(node.op_type)

    def per_sample(name: str) -> int:
        dims = shapes.get(name) or []
        if "batch" not in dims:
            return 0
        return 4 * int(np.prod([d for d in dims if isinstance(d, int)]))
    masked = sum(per_sample(name) for name, ops in readers.items() if ops <= MASK_READERS)
    return sum(per_sample(name) for name in readers), masked, max((per_sample(n) for n in forward), default=0)


def _labels_input(loss: str, logits_shape: list) -> onnx.ValueInfoProto:
    if loss == "cross_entropy":
        return helper.make_tensor_value_info("labels", TensorProto.INT64, [logits_shape[0]])
    return helper.make_tensor_value_info("labels", TensorProto.FLOAT, logits_shape)


# ---- losses: (mean loss, d loss / d logits) -------------------------------------------------------------------

def _count(b: GraphBuilder, logits: str, per_batch: bool) -> str:
    if per_batch:
        size = b.op("Gather", [b.op("Shape", [logits]), b.const(0, np.int64)], axis=0)
    else:
        size = b.op("Size", [logits])
    return b.op("Cast", [size], to=TensorProto.FLOAT)


def _cross_entropy(b: GraphBuilder, logits: str, labels: str) -> tuple[str, str]:
    classes = b.op("Gather", [b.op("Shape", [logits]), b.const(1, np.int64)], axis=0)
    onehot = b.op("OneHot", [labels, classes, b.const([0.0, 1.0])], axis=-1)
    log_p = b.op("LogSoftmax", [logits], axis=1)
    n = _count(b, logits, per_batch=True)
    picked = b.op("ReduceSum", [b.op("Mul", [onehot, log_p]), b.const([1], np.int64)], keepdims=0)
    loss = b.op("Neg", [b.op("Div", [b.op("ReduceSum", [picked], keepdims=0), n])])
    grad = b.op("Div", [b.op("Sub", [b.op("Exp", [log_p]), onehot]), n])
    return loss, grad


def _bce_with_logits(b: GraphBuilder, logits: str, labels: str) -> tuple[str, str]:
    n = _count(b, logits, per_batch=False)
    softplus = b.op("Softplus", [b.op("Neg", [b.op("Abs", [logits])])])
    terms = b.op("Add", [b.op("Sub", [b.op("Relu", [logits]), b.op("Mul", [logits, labels])]), softplus])
    loss = b.op("Div", [b.op("ReduceSum", [terms], keepdims=0), n])
    grad = b.op("Div", [b.op("Sub", [b.op("Sigmoid", [logits]), labels]), n])
    return loss, grad


def _mse(b: GraphBuilder, logits: str, labels: str) -> tuple[str, str]:
    n = _count(b, logits, per_batch=False)
    diff = b.op("Sub", [logits, labels])
    loss = b.op("Div", [b.op("ReduceSum", [b.op("Mul", [diff, diff])], keepdims=0), n])
    return loss, b.op("Div", [b.op("Mul", [diff, b.const(2.0)]), n])


def _l1(b: GraphBuilder, logits: str, labels: str) -> tuple[str, str]:
    n = _count(b, logits, per_batch=False)
    diff = b.op("Sub", [logits, labels])
    loss = b.op("Div", [b.op("ReduceSum", [b.op("Abs", [diff])], keepdims=0), n])
    return loss, b.op("Div", [b.op("Sign", [diff]), n])


LOSSES = {"cross_entropy": _cross_entropy, "bce_with_logits": _bce_with_logits, "mse": _mse, "l1": _l1}


# ---- optimizers (over the flat state) ------------------------------------------------------------------------

def _per_element(b: GraphBuilder, layout: list[StateLayout], value: dict[str, float]) -> str | None:
    """A flat vector holding each tensor's `value` over its elements, built from one scalar per run of equal values
    (ORT folds it at load); None when every tensor has the same value."""
    runs: list[list] = []
    for p in layout:
        if runs and runs[-1][0] == value[p.name]:
            runs[-1][1] += p.size
        else:
            runs.append([value[p.name], p.size])
    if len(runs) == 1:
        return None
    pieces = [b.op("Expand", [b.const(np.float32(v)), b.const([n], np.int64)]) for v, n in runs]
    vector = b.concat(pieces)
    b.per_element_vectors.append(vector)
    return vector


def _group_value(layout: list[StateLayout], groups: list[ParamGroup], attribute: str,
                 default: float) -> dict[str, float]:
    value = {p.name: default for p in layout}
    value.update({t: float(getattr(g, attribute)) for g in groups for t in g.tensors})
    return value


def _group_lr(b: GraphBuilder, layout: list[StateLayout], groups: list[ParamGroup]) -> str:
    """`lr` times each tensor's group multiplier: a scalar, or one value per element."""
    scale = _group_value(layout, groups, "lr_scale", 1.0)
    vector = _per_element(b, layout, scale)
    if vector is not None:
        return b.op("Mul", ["lr", vector])
    only = next(iter(scale.values()))
    return "lr" if only == 1.0 else b.op("Mul", ["lr", b.const(np.float32(only))])


def _group_decay(b: GraphBuilder, layout: list[StateLayout], groups: list[ParamGroup]) -> str | None:
    decay = _group_value(layout, groups, "weight_decay", 0.0)
    vector = _per_element(b, layout, decay)
    if vector is not None:
        return vector
    only = next(iter(decay.values()))
    return b.const(np.float32(only)) if only else None


def _sgd(b: GraphBuilder, grad: str, lr: str) -> str:
    return b.op("Sub", ["params", b.op("Mul", [grad, lr])])


def _adamw(b: GraphBuilder, grad: str, lr: str, decay: str | None) -> list[str]:
    """AdamW as ONNX Runtime training computes it (its `adam_mode` 1, Hugging Face's AdamW): the bias correction
    scales the learning rate, ε is added to √v, and the decoupled decay follows the update. Both engines then
    train identically."""
    beta1, beta2 = ADAM_BETAS
    t = b.op("Cast", ["step"], to=TensorProto.FLOAT)
    one = b.const(1.0)
    correction1 = b.op("Sub", [one, b.op("Pow", [b.const(beta1), t])])
    correction2 = b.op("Sub", [one, b.op("Pow", [b.const(beta2), t])])
    m = b.op("Add", [b.op("Mul", ["adam_m", b.const(beta1)]), b.op("Mul", [grad, b.const(1 - beta1)])])
    v = b.op("Add", [b.op("Mul", ["adam_v", b.const(beta2)]), b.op("Mul", [b.op("Mul", [grad, grad]),
                                                                           b.const(1 - beta2)])])
    step_size = b.op("Div", [b.op("Mul", [lr, b.op("Sqrt", [correction2])]), correction1])
    denom = b.op("Add", [b.op("Sqrt", [v]), b.const(ADAM_EPS)])
    params = b.op("Sub", ["params", b.op("Mul", [b.op("Div", [m, denom]), step_size])])
    if decay is not None:
        params = b.op("Mul", [params, b.op("Sub", [one, b.op("Mul", [lr, decay])])])
    return [params, m, v]
