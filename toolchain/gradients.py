"""Reverse-mode differentiation over an ONNX graph, written in standard-domain ONNX ops only.

One gradient rule per op type: `rule(b, node, dy) -> [d input_0, d input_1, …]` (None where no gradient flows).
Shapes come from ONNX shape inference; the batch dimension may stay symbolic. Convolution gradients avoid any
training op: the input gradient is a transposed convolution (a MatMul for 1×1 convolutions), the weight gradient a
convolution of the input with the output gradient as kernel (grouped, with stride and dilation swapped), or a
MatMul for 1×1 convolutions.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper

from edgeadapt.runtime.errors import ExportError
from edgeadapt.toolchain.graph_builder import GraphBuilder

Rule = Callable[[GraphBuilder, onnx.NodeProto, list], list]
RULES: dict[str, Rule] = {}
# Ops whose outputs carry no gradient (shapes, comparisons, index arithmetic).
NON_DIFFERENTIABLE = {"Shape", "Size", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Not", "And",
                      "Or", "ArgMax", "ArgMin", "ConstantOfShape", "Constant", "Range", "NonZero", "Sign", "Floor",
                      "Ceil", "Round", "OneHot", "IsNaN", "IsInf"}


def rule(*ops: str):
    def register(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn
    return register


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# ---- broadcasting ---------------------------------------------------------------------------------------------

def unbroadcast(b: GraphBuilder, grad: str, out: str, target: str) -> str:
    """Sum `grad` (shaped like `out`) over the axes along which `target` was broadcast."""
    return unbroadcast_shaped(b, grad, b.shape(out), target)


def unbroadcast_shaped(b: GraphBuilder, grad: str, out_shape: list, target: str) -> str:
    """`unbroadcast` for a gradient of shape `out_shape`."""
    in_shape = b.shape(target)
    lead = len(out_shape) - len(in_shape)
    axes = list(range(lead))
    for i, dim in enumerate(in_shape):
        other = out_shape[lead + i]
        if dim == other:
            continue
        if dim == 1:
            axes.append(lead + i)
        else:
            raise ExportError(f"cannot differentiate the broadcast of {target} {in_shape} to {out_shape}; "
                              "give the model static shapes except the batch.")
    if not axes:
        return grad
    reduced = b.op("ReduceSum", [grad, b.const(axes, np.int64)], keepdims=1)
    return b.op("Reshape", [reduced, b.const(b.static(target), np.int64)]) if -1 not in b.static(target) else \
        b.op("Reshape", [reduced, b.op("Shape", [target])])


def frozen_copy(b: GraphBuilder, weight: str, transpose: bool = False) -> str:
    """A frozen weight as the backward pass reads it: a private copy of the initializer. OpenVINO 2026.4's CPU
    plugin (f32) computes a second Conv/ConvTranspose/MatMul over a constant that a forward node also reads with
    another layout wrongly (up to O(1) off); a distinct constant avoids it. Trainable weights pass through."""
    value = b.constants.get(weight)
    if value is None or weight in b.statistics:
        return b.op("Transpose", [weight], perm=[1, 0]) if transpose else weight
    return b.const(value.T.copy() if transpose else value.copy())


def bn_folded_weight(b: GraphBuilder, weight: str) -> tuple[str, str] | None:
    """(W, scale) when a conv weight is a frozen W·scale folded from a BN whose statistics stay replaceable (the
    fold's record lists it: toolchain/bn.py `folded_weights`), else None. Its dX then scales dY per output channel
    and reads a copy of W: the folded product would be a constant shared with the forward conv (see frozen_copy)."""
    node = b.producers.get(weight)
    if node is None or node.op_type != "Mul" or weight not in b.folded_weights:
        return None
    raw, scale = node.input
    return (raw, scale) if raw in b.constants and raw not in b.statistics else None


def _scale(b: GraphBuilder, grad: str, factor: float) -> str:
    return grad if factor == 1.0 else b.op("Mul", [grad, b.const(factor)])


# ---- elementwise ---------------------------------------------------------------------------------------------

@rule("Add", "Sum")
def _add(b, node, dy):
    return [unbroadcast(b, dy[0], node.output[0], x) for x in node.input]


@rule("Sub")
def _sub(b, node, dy):
    a, c = node.input
    return [unbroadcast(b, dy[0], node.output[0], a), unbroadcast(b, b.op("Neg", [dy[0]]), node.output[0], c)]


@rule("Mul")
def _mul(b, node, dy):
    a, c = node.input
    return [unbroadcast(b, b.op("Mul", [dy[0], c]), node.output[0], a),
            unbroadcast(b, b.op("Mul", [dy[0], a]), node.output[0], c)]


@rule("Div")
def _div(b, node, dy):
    a, c = node.input
    da = b.op("Div", [dy[0], c])
    dc = b.op("Neg", [b.op("Mul", [da, node.output[0]])])  # -dy·a/c² = -(dy/c)·y
    return [unbroadcast(b, da, node.output[0], a), unbroadcast(b, dc, node.output[0], c)]


@rule("Neg")
def _neg(b, node, dy):
    return [b.op("Neg", [dy[0]])]


@rule("Sqrt")
def _sqrt(b, node, dy):
    return [b.op("Div", [_scale(b, dy[0], 0.5), node.output[0]])]


@rule("Exp")
def _exp(b, node, dy):
    return [b.op("Mul", [dy[0], node.output[0]])]


@rule("Log")
def _log(b, node, dy):
    return [b.op("Div", [dy[0], node.input[0]])]


@rule("Abs")
def _abs(b, node, dy):
    return [b.op("Mul", [dy[0], b.op("Sign", [node.input[0]])])]


@rule("Pow")
def _pow(b, node, dy):
    x, e = node.input
    slope = b.op("Mul", [e, b.op("Pow", [x, b.op("Sub", [e, b.const(1.0)])])])
    return [unbroadcast(b, b.op("Mul", [dy[0], slope]), node.output[0], x), None]


def _masked(b: GraphBuilder, grad: str, mask: str) -> str:
    """grad where mask, else 0 (Mul by the mask as floats: 4× faster than Where on ONNX Runtime's CPU)."""
    return b.op("Mul", [grad, b.op("Cast", [mask], to=onnx.TensorProto.FLOAT)])


@rule("Relu")
def _relu(b, node, dy):
    return [_masked(b, dy[0], b.op("Greater", [node.output[0], b.const(0.0)]))]


@rule("LeakyRelu")
def _leaky_relu(b, node, dy):
    alpha = attrs(node).get("alpha", 0.01)
    return [b.op("Where", [b.op("Greater", [node.input[0], b.const(0.0)]), dy[0], _scale(b, dy[0], alpha)])]


@rule("Clip")
def _clip(b, node, dy):
    """Gradient where min < x < max, read from the output (so the pre-activation need not be kept)."""
    y, bounds = node.output[0], list(node.input[1:]) + ["", ""]
    masks = []
    if bounds[0]:
        masks.append(b.op("Greater", [y, bounds[0]]))
    if bounds[1]:
        masks.append(b.op("Less", [y, bounds[1]]))
    if not masks:
        return [dy[0], None, None]
    mask = masks[0] if len(masks) == 1 else b.op("And", masks)
    return [_masked(b, dy[0], mask), None, None]


@rule("Sigmoid")
def _sigmoid(b, node, dy):
    y = node.output[0]
    return [b.op("Mul", [dy[0], b.op("Mul", [y, b.op("Sub", [b.const(1.0), y])])])]


@rule("Tanh")
def _tanh(b, node, dy):
    y = node.output[0]
    return [b.op("Mul", [dy[0], b.op("Sub", [b.const(1.0), b.op("Mul", [y, y])])])]


@rule("HardSigmoid")
def _hard_sigmoid(b, node, dy):
    alpha = attrs(node).get("alpha", 0.2)
    y = node.output[0]
    inside = b.op("And", [b.op("Greater", [y, b.const(0.0)]), b.op("Less", [y, b.const(1.0)])])
    return [_masked(b, _scale(b, dy[0], alpha), inside)]


@rule("HardSwish")
def _hard_swish(b, node, dy):
    x = node.input[0]
    slope = b.op("Add", [b.op("Mul", [x, b.const(1 / 3)]), b.const(0.5)])  # (2x + 3) / 6 on (-3, 3)
    slope = b.op("Where", [b.op("Greater", [x, b.const(3.0)]), b.const(1.0), slope])
    slope = b.op("Where", [b.op("Less", [x, b.const(-3.0)]), b.const(0.0), slope])
    return [b.op("Mul", [dy[0], slope])]


@rule("Erf")
def _erf(b, node, dy):
    x = node.input[0]
    slope = b.op("Mul", [b.op("Exp", [b.op("Neg", [b.op("Mul", [x, x])])]), b.const(2 / np.sqrt(np.pi))])
    return [b.op("Mul", [dy[0], slope])]


@rule("Gelu")
def _gelu(b, node, dy):
    """Exact GELU (opset 20): Φ(x) + x·φ(x)."""
    if attrs(node).get("approximate", b"none") not in (b"none", "none"):
        raise ExportError(f"Gelu {node.name} uses the tanh approximation, which has no gradient here.")
    x = node.input[0]
    cdf = b.op("Mul", [b.op("Add", [b.op("Erf", [b.op("Mul", [x, b.const(1 / np.sqrt(2))])]), b.const(1.0)]),
                       b.const(0.5)])
    pdf = b.op("Mul", [b.op("Exp", [b.op("Mul", [b.op("Mul", [x, x]), b.const(-0.5)])]),
                       b.const(1 / np.sqrt(2 * np.pi))])
    return [b.op("Mul", [dy[0], b.op("Add", [cdf, b.op("Mul", [x, pdf])])])]


@rule("Softmax")
def _softmax(b, node, dy):
    """dX = Y ⊙ (dY − Σ_axis dY ⊙ Y)."""
    y = node.output[0]
    axis = attrs(node).get("axis", -1)
    dot = b.op("ReduceSum", [b.op("Mul", [dy[0], y]), b.const([axis], np.int64)], keepdims=1)
    return [b.op("Mul", [y, b.op("Sub", [dy[0], dot])])]


def _mean_over(b: GraphBuilder, x: str, axes: list[int], count: int) -> str:
    """ReduceMean via ReduceSum (whose axes are an input at every opset ≥ 13)."""
    return _scale(b, b.op("ReduceSum", [x, b.const(axes, np.int64)], keepdims=1), 1.0 / count)


@rule("LayerNormalization")
def _layer_norm(b, node, dy):
    """Recomputes x̂ = (x − μ)/σ from the input (engines need not return the optional Mean/InvStdDev outputs);
    dX = (g − mean(g) − x̂·mean(g·x̂)) / σ with g = dY·scale; dScale = Σ dY·x̂, dBias = Σ dY over the leading axes."""
    a = attrs(node)
    x, scale = node.input[0], node.input[1]
    shape = b.static(x)
    axis = a.get("axis", -1) % len(shape)
    axes = list(range(axis, len(shape)))
    count = int(np.prod(shape[axis:]))
    centred = b.op("Sub", [x, _mean_over(b, x, axes, count)])
    variance = _mean_over(b, b.op("Mul", [centred, centred]), axes, count)
    inverse = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [variance, b.const(float(a.get("epsilon", 1e-5)))])])])
    normed = b.op("Mul", [centred, inverse])
    g = b.op("Mul", [dy[0], scale])
    inner = b.op("Sub", [b.op("Sub", [g, _mean_over(b, g, axes, count)]),
                         b.op("Mul", [normed, _mean_over(b, b.op("Mul", [g, normed]), axes, count)])])
    grads = [b.op("Mul", [inner, inverse]), unbroadcast(b, b.op("Mul", [dy[0], normed]), node.output[0], scale)]
    if len(node.input) > 2 and node.input[2]:
        grads.append(unbroadcast(b, dy[0], node.output[0], node.input[2]))
    return grads


@rule("Where")
def _where(b, node, dy):
    cond, a, c = node.input
    zero = b.const(0.0)
    return [None, unbroadcast(b, b.op("Where", [cond, dy[0], zero]), node.output[0], a),
            unbroadcast(b, b.op("Where", [cond, zero, dy[0]]), node.output[0], c)]


# ---- shape and layout ----------------------------------------------------------------------------------------

@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(b, node, dy):
    x = node.input[0]
    back = b.const(b.static(x), np.int64) if -1 not in b.static(x) else b.op("Shape", [x])
    return [b.op("Reshape", [dy[0], back])] + [None] * (len(node.input) - 1)


@rule("Identity", "Dropout")
def _identity(b, node, dy):
    return [dy[0]] + [None] * (len(node.input) - 1)


@rule("Cast")
def _cast(b, node, dy):
    return [dy[0]]


@rule("Transpose")
def _transpose(b, node, dy):
    perm = attrs(node).get("perm") or list(reversed(range(len(b.shape(node.input[0])))))
    return [b.op("Transpose", [dy[0]], perm=list(np.argsort(perm)))]


@rule("Expand")
def _expand(b, node, dy):
    return [unbroadcast(b, dy[0], node.output[0], node.input[0]), None]


@rule("Slice")
def _slice(b, node, dy):
    """Constant starts/ends/axes with step 1: the gradient is dY padded back to the input's shape with zeros."""
    x = node.input[0]
    shape = b.static(x)
    bounds = list(node.input[1:]) + [""] * (5 - len(node.input))
    starts, ends, axes, steps = [b.constants.get(name) if name else None for name in bounds]
    if starts is None or ends is None or (len(node.input) > 3 and node.input[3] and axes is None) or \
            (len(node.input) > 4 and node.input[4] and steps is None):
        raise ExportError(f"Slice {node.name} lies on the trainable path with computed bounds, which have no gradient "
                          "here; freeze the layers before it.")
    axes = [int(a) % len(shape) for a in axes] if axes is not None else list(range(len(starts)))
    if steps is not None and any(int(s) != 1 for s in steps):
        raise ExportError(f"Slice {node.name} has a step other than 1 on the trainable path, which has no gradient "
                          "here.")
    pads = [0] * (2 * len(shape))
    for axis, start, end in zip(axes, starts, ends):
        if shape[axis] < 0:
            raise ExportError(f"Slice {node.name} cuts the batch axis on the trainable path; slice fixed axes only.")
        first, stop, _ = slice(int(start), int(end)).indices(shape[axis])
        pads[axis], pads[len(shape) + axis] = first, shape[axis] - max(stop, first)
    return [b.op("Pad", [dy[0], b.const(pads, np.int64)])] + [None] * (len(node.input) - 1)


@rule("Concat")
def _concat(b, node, dy):
    axis = attrs(node)["axis"]
    sizes = [b.static(x)[axis] for x in node.input]
    if any(s < 0 for s in sizes):
        raise ExportError(f"cannot differentiate Concat {node.name} along a dynamic axis.")
    return b.split(dy[0], sizes, axis)


@rule("Gather")
def _gather(b, node, dy):
    """A constant permutation of one axis (channel reordering, see channels.py) has its inverse as gradient; one
    constant index (a [CLS] token) pads dY back; rows picked along axis 0 (an embedding table read at token ids) get
    dY scatter-added back into a zero table."""
    data, indices = node.input
    order = b.constants.get(indices)
    axis = attrs(node).get("axis", 0)
    if order is not None and order.ndim == 1 and np.array_equal(np.sort(order), np.arange(len(order))):
        return [b.op("Gather", [dy[0], b.const(np.argsort(order), np.int64)], axis=axis), None]
    shape = b.static(data)
    axis %= len(shape)
    if order is not None and order.ndim == 0 and shape[axis] > 0:  # one constant index (BERT's [CLS] pooling)
        index = int(order) % shape[axis]
        pads = [0] * (2 * len(shape))
        pads[axis], pads[len(shape) + axis] = index, shape[axis] - index - 1
        return [b.op("Pad", [b.op("Unsqueeze", [dy[0], b.const([axis], np.int64)]), b.const(pads, np.int64)]), None]
    if axis != 0 or -1 in shape:
        raise ExportError(f"Gather {node.name} lies on the trainable path along axis {axis}, which has no gradient "
                          "here (rows of a table only); freeze the layers before it.")
    row = int(np.prod(shape[1:]))
    flat = b.op("Reshape", [indices, b.const([-1, 1], np.int64)])
    flat = b.op("Add", [flat, b.op("Mul", [b.op("Cast", [b.op("Less", [flat, b.const(0, np.int64)])],
                                                        to=onnx.TensorProto.INT64), b.const(shape[0], np.int64)])])
    updates = b.op("Reshape", [dy[0], b.const([-1, row], np.int64)])
    rows = b.op("Expand", [flat, b.op("Shape", [updates])])
    table = b.op("ConstantOfShape", [b.const([shape[0], row], np.int64)],
                 value=helper.make_tensor("zero", onnx.TensorProto.FLOAT, [1], [0.0]))
    summed = b.op("ScatterElements", [table, rows, updates], axis=0, reduction="add")
    return [b.op("Reshape", [summed, b.const(shape, np.int64)]), None]


@rule("Pad")
def _pad(b, node, dy):
    if attrs(node).get("mode", b"constant") not in (b"constant", "constant"):
        raise ExportError(f"Pad {node.name} uses a mode other than constant, which has no gradient here.")
    x, pads = node.input[0], node.input[1]
    rank = len(b.shape(x))
    starts = b.op("Slice", [pads, b.const([0], np.int64), b.const([rank], np.int64)])
    ends = b.op("Add", [starts, b.op("Shape", [x])])
    return [b.op("Slice", [dy[0], starts, ends])] + [None] * (len(node.input) - 1)


# ---- reductions and pooling -----------------------------------------------------------------------------------

@rule("GlobalAveragePool")
def _global_average_pool(b, node, dy):
    x = node.input[0]
    count = int(np.prod(b.static(x)[2:]))
    return [b.op("Expand", [_scale(b, dy[0], 1.0 / count), b.op("Shape", [x])])]


def _reduce_back(b: GraphBuilder, node, dy: str, axes: list[int] | None, scale_by_count: bool) -> str:
    x = node.input[0]
    shape = b.static(x)
    axes = [a % len(shape) for a in (axes if axes is not None else range(len(shape)))]
    keep = [1 if i in axes else d for i, d in enumerate(shape)]
    grad = dy if attrs(node).get("keepdims", 1) else b.op("Reshape", [dy, b.const(keep, np.int64)])
    if scale_by_count:
        grad = _scale(b, grad, 1.0 / int(np.prod([shape[a] for a in axes])))
    return b.op("Expand", [grad, b.op("Shape", [x])])


@rule("ReduceMean")
def _reduce_mean(b, node, dy):
    return [_reduce_back(b, node, dy[0], attrs(node).get("axes"), True)]


@rule("ReduceSum")
def _reduce_sum(b, node, dy):
    axes = None
    if len(node.input) > 1 and node.input[1]:
        axes = [int(a) for a in b.constants[node.input[1]]]
    return [_reduce_back(b, node, dy[0], axes, False), None]


@rule("MaxPool")
def _max_pool(b, node, dy):
    """Scatter-add the gradient to the argmax positions (the forward node is given an Indices output)."""
    x = node.input[0]
    if len(node.output) < 2:
        node.output.append(b.name("maxpool_indices"))
    flat = b.const([-1], np.int64)
    zeros = b.op("ConstantOfShape", [b.op("Shape", [b.op("Reshape", [x, flat])])],
                 value=helper.make_tensor("zero", onnx.TensorProto.FLOAT, [1], [0.0]))
    scattered = b.op("ScatterElements", [zeros, b.op("Reshape", [node.output[1], flat]),
                                         b.op("Reshape", [dy[0], flat])], axis=0, reduction="add")
    return [b.op("Reshape", [scattered, b.op("Shape", [x])])]


# ---- linear layers ------------------------------------------------------------------------------------------------

@rule("Gemm")
def _gemm(b, node, dy):
    a = attrs(node)
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    trans_a, trans_b = a.get("transA", 0), a.get("transB", 0)
    x, w = node.input[0], node.input[1]
    g = dy[0]
    if trans_a:
        dx = b.op("Gemm", [frozen_copy(b, w), g], alpha=alpha, transA=trans_b, transB=1)
    elif w in b.constants:  # dX = dY·B'ᵀ, with B'ᵀ stored as a constant of its own
        dx = b.op("Gemm", [g, frozen_copy(b, w, transpose=not trans_b)], alpha=alpha)
    else:
        dx = b.op("Gemm", [g, w], alpha=alpha, transA=0, transB=1 - trans_b)
    if trans_b:
        dw = b.op("Gemm", [g, x], alpha=alpha, transA=1, transB=trans_a)
    else:
        dw = b.op("Gemm", [x, g], alpha=alpha, transA=1 - trans_a, transB=0)
    grads = [dx, dw]
    if len(node.input) > 2 and node.input[2]:
        grads.append(unbroadcast(b, _scale(b, g, beta), node.output[0], node.input[2]))
    return grads


def _swap_last(b: GraphBuilder, x: str, rank: int) -> str:
    return b.op("Transpose", [x], perm=[*range(rank - 2), rank - 1, rank - 2])


def _matmul_batched(b: GraphBuilder, node, dy: str) -> list[str]:
    """A @ B with both operands of rank ≥ 2 (attention's Q·Kᵀ and P·V): dA = dY·Bᵀ, dB = Aᵀ·dY, each summed over
    the batch axes along which its operand was broadcast."""
    a, c = node.input
    ys = b.shape(node.output[0])
    a_shape, c_shape = b.shape(a), b.shape(c)
    if min(len(a_shape), len(c_shape)) < 2:
        raise ExportError(f"MatMul {node.name}: a 1-D operand on the trainable path has no gradient here.")
    da = b.op("MatMul", [dy, _swap_last(b, c, len(c_shape))])
    dc = b.op("MatMul", [_swap_last(b, a, len(a_shape)), dy])
    return [unbroadcast_shaped(b, da, [*ys[:-2], *a_shape[-2:]], a),
            unbroadcast_shaped(b, dc, [*ys[:-2], *c_shape[-2:]], c)]


@rule("MatMul")
def _matmul(b, node, dy):
    x, w = node.input
    xs, ws = b.static(x), b.static(w)
    if len(ws) != 2:
        return _matmul_batched(b, node, dy[0])
    wt = frozen_copy(b, w, transpose=True)
    dx = b.op("MatMul", [dy[0], wt])
    rows_x = b.op("Reshape", [x, b.const([-1, xs[-1]], np.int64)])
    rows_g = b.op("Reshape", [dy[0], b.const([-1, ws[-1]], np.int64)])
    dw = b.op("Gemm", [rows_x, rows_g], transA=1)
    return [dx, dw]


# ---- convolution --------------------------------------------------------------------------------------------

def _conv_geometry(b: GraphBuilder, node) -> dict:
    a = attrs(node)
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ExportError(f"Conv {node.name} uses auto_pad; export it with explicit pads.")
    kernel = b.static(node.input[1])[2:]
    rank = len(kernel)
    return {"strides": list(a.get("strides", [1] * rank)), "dilations": list(a.get("dilations", [1] * rank)),
            "pads": list(a.get("pads", [0] * 2 * rank)), "group": a.get("group", 1), "kernel": kernel}


def _is_pointwise(geo: dict) -> bool:
    return geo["group"] == 1 and all(k == 1 for k in geo["kernel"]) and all(s == 1 for s in geo["strides"]) \
        and not any(geo["pads"])


def _conv_input_grad(b: GraphBuilder, node, g: str, geo: dict) -> str:
    x, w = node.input[0], node.input[1]
    folded = bn_folded_weight(b, w)
    if folded is not None:  # conv(x, W·s)'s dX = conv'(dY·s, W): s is per output channel
        w, scale = folded
        shape = b.const([1, b.static(w)[0]] + [1] * len(geo["kernel"]), np.int64)
        g = b.op("Mul", [g, b.op("Reshape", [scale, shape])])
    xs, ys = b.static(x), b.static(node.output[0])
    if _is_pointwise(geo):  # dX = Wᵀ·dY per pixel
        c_out, c_in = b.static(w)[:2]
        flat_w = b.op("Reshape", [frozen_copy(b, w), b.const([c_out, c_in], np.int64)])
        wt = b.op("Transpose", [flat_w], perm=[1, 0])
        rows = b.op("Reshape", [g, b.const([0, c_out, -1], np.int64)])
        return b.op("Reshape", [b.op("MatMul", [wt, rows]), b.op("Shape", [x])])
    flipped = _flipped_transposed_weight(b, w, geo)
    if flipped is not None:  # stride 1: a plain convolution (4x faster than ConvTranspose for depthwise layers)
        # strides spelled out: onnxruntime-web's WebGPU Conv refuses a Conv without them
        return b.op("Conv", [g, flipped], strides=[1] * len(geo["kernel"]), pads=_full_pads(geo),
                    dilations=geo["dilations"], group=geo["group"])
    rank = len(geo["kernel"])
    output_padding = [xs[2 + i] - ((ys[2 + i] - 1) * geo["strides"][i] + (geo["kernel"][i] - 1) * geo["dilations"][i]
                                   + 1 - geo["pads"][i] - geo["pads"][rank + i]) for i in range(rank)]
    return b.op("ConvTranspose", [g, frozen_copy(b, w)], strides=geo["strides"], pads=geo["pads"],
                dilations=geo["dilations"], group=geo["group"], output_padding=output_padding)


def _full_pads(geo: dict) -> list[int]:
    reach = [d * (k - 1) for d, k in zip(geo["dilations"], geo["kernel"])]
    return [r - p for r, p in zip(reach * 2, geo["pads"])]


def _flipped_transposed_weight(b: GraphBuilder, w: str, geo: dict) -> str | None:
    """For a stride-1 conv that is plain (group 1) or depthwise, the weight of the convolution that computes dX:
    input and output channels swapped, kernel rotated by 180°. None where a ConvTranspose is needed instead."""
    c_out, c_in_group = b.static(w)[:2]
    depthwise = c_in_group == 1 and c_out == geo["group"]
    if any(s != 1 for s in geo["strides"]) or min(_full_pads(geo)) < 0 or not (geo["group"] == 1 or depthwise):
        return None
    rank = len(geo["kernel"])
    spatial = list(range(2, 2 + rank))
    value = b.constants.get(w)
    if value is not None:
        swapped = value if depthwise else value.transpose(1, 0, *spatial)
        return b.const(np.ascontiguousarray(np.flip(swapped, axis=tuple(spatial))))
    flipped = w if depthwise else b.op("Transpose", [w], perm=[1, 0, *spatial])
    # reversed by a Gather per axis, not a Slice with negative steps: onnxruntime-web's WebGPU Slice drops an element
    for axis, size in zip(spatial, geo["kernel"]):
        flipped = b.op("Gather", [flipped, b.const(list(range(size - 1, -1, -1)), np.int64)], axis=axis)
    return flipped


def _conv_weight_grad(b: GraphBuilder, node, g: str, geo: dict) -> str:
    x, w = node.input[0], node.input[1]
    ws = b.static(w)
    c_out, c_in_group = ws[:2]
    if _is_pointwise(geo):  # dW = Σₙ dY·Xᵀ
        cols_x = b.op("Reshape", [x, b.const([0, c_in_group, -1], np.int64)])
        cols_g = b.op("Reshape", [g, b.const([0, c_out, -1], np.int64)])
        per_sample = b.op("MatMul", [cols_g, b.op("Transpose", [cols_x], perm=[0, 2, 1])])
        summed = b.op("ReduceSum", [per_sample, b.const([0], np.int64)], keepdims=0)
        return b.op("Reshape", [summed, b.const(ws, np.int64)])
    return _conv_weight_grad_general(b, x, g, b.static(node.output[0]), geo, ws)


def _conv_weight_grad_general(b: GraphBuilder, x: str, g: str, gs: list[int], geo: dict, ws: list[int]) -> str:
    """dW[o, i, t] = Σ_{n,p} taps[n, i, t, p] · dY[n, o, p], where taps (im2col) comes from a grouped convolution of
    X with one-hot kernels, one per kernel tap; then one batched MatMul per group and a sum over the batch. Strided
    convolutions go tap by tap instead."""
    groups, kernel = geo["group"], geo["kernel"]
    c_out, c_in_group = ws[:2]
    c_in, c_out_group, taps_per = c_in_group * groups, c_out // groups, int(np.prod(kernel))
    if max(geo["strides"]) > 1:
        return _strided_weight_grad(b, x, g, gs, geo, ws)
    taps = _taps_by_conv(b, x, c_in, geo)
    pixels = int(np.prod(gs[2:]))
    taps = b.op("Reshape", [taps, b.const([0, groups, c_in_group * taps_per, pixels], np.int64)])
    if c_out_group == 1:
        g_cols = b.op("Reshape", [g, b.const([0, groups, pixels, 1], np.int64)])
    else:
        g_cols = b.op("Transpose", [b.op("Reshape", [g, b.const([0, groups, c_out_group, pixels], np.int64)])],
                      perm=[0, 1, 3, 2])
    summed = b.op("ReduceSum", [b.op("MatMul", [taps, g_cols]), b.const([0], np.int64)], keepdims=0)
    if c_out_group > 1:  # (G, ci·K, co) → (G, co, ci·K)
        summed = b.op("Transpose", [summed], perm=[0, 2, 1])
    return b.op("Reshape", [summed, b.const(ws, np.int64)])


def _taps_by_conv(b: GraphBuilder, x: str, c_in: int, geo: dict) -> str:
    """taps[n, i·K + t, p]: a grouped convolution of X with one one-hot kernel per tap."""
    kernel = geo["kernel"]
    taps_per = int(np.prod(kernel))
    one_hot = np.tile(np.eye(taps_per, dtype=np.float32), (c_in, 1)).reshape(c_in * taps_per, 1, *kernel)
    return b.op("Conv", [x, b.const(one_hot)], strides=geo["strides"], pads=geo["pads"], dilations=geo["dilations"],
                group=c_in)


def _strided_weight_grad(b: GraphBuilder, x: str, g: str, gs: list[int], geo: dict, ws: list[int]) -> str:
    """dW of a strided convolution one tap at a time: each tap's inputs are a strided slice of the padded X, summed
    against dY (no im2col tensor; onnxruntime-web's WebGPU Conv computes a strided one-hot conv wrongly)."""
    groups, kernel, rank = geo["group"], geo["kernel"], len(geo["kernel"])
    c_out, c_in_group = ws[:2]
    c_out_group, pixels, pads = c_out // groups, int(np.prod(gs[2:])), geo["pads"]
    depthwise = c_in_group == 1 and c_out_group == 1
    padded = b.op("Pad", [x, b.const([0, 0, *pads[:rank], 0, 0, *pads[rank:]], np.int64)])
    axes, steps = b.const(list(range(2, 2 + rank)), np.int64), b.const(geo["strides"], np.int64)
    batch_and_pixels = b.const([0, *range(2, 2 + rank)], np.int64)
    if not depthwise:  # (N, G, P, co)
        g_cols = b.op("Transpose", [b.op("Reshape", [g, b.const([0, groups, c_out_group, pixels], np.int64)])],
                      perm=[0, 1, 3, 2])
    per_tap = []
    for tap in range(int(np.prod(kernel))):
        starts = [int(i) * d for i, d in zip(np.unravel_index(tap, kernel), geo["dilations"])]
        ends = [start + stride * (size - 1) + 1 for start, stride, size in zip(starts, geo["strides"], gs[2:])]
        inputs = b.op("Slice", [padded, b.const(starts, np.int64), b.const(ends, np.int64), axes, steps])
        if depthwise:  # dW[c, 0, t] = Σ_{n,p} X_t[n, c, p]·dY[n, c, p]
            summed = b.op("ReduceSum", [b.op("Mul", [inputs, g]), batch_and_pixels], keepdims=0)
        else:  # (N, G, ci, P)·(N, G, P, co), summed over the batch: (G, ci, co)
            rows = b.op("Reshape", [inputs, b.const([0, groups, c_in_group, pixels], np.int64)])
            summed = b.op("ReduceSum", [b.op("MatMul", [rows, g_cols]), b.const([0], np.int64)], keepdims=0)
        per_tap.append(b.op("Unsqueeze", [summed, b.const([-1], np.int64)]))
    stacked = b.concat(per_tap, axis=-1)  # depthwise: (C, K); else (G, ci, co, K)
    if not depthwise:
        stacked = b.op("Transpose", [stacked], perm=[0, 2, 1, 3])  # (G, co, ci, K)
    return b.op("Reshape", [stacked, b.const(ws, np.int64)])


@rule("Conv")
def _conv(b, node, dy):
    geo = _conv_geometry(b, node)
    g = dy[0]
    grads = [_conv_input_grad(b, node, g, geo), _conv_weight_grad(b, node, g, geo)]
    if len(node.input) > 2 and node.input[2]:
        axes = [0, *range(2, 2 + len(geo["kernel"]))]
        grads.append(b.op("ReduceSum", [g, b.const(axes, np.int64)], keepdims=0))
    return grads


# ---- the backward pass ------------------------------------------------------------------------------------------

def differentiable_tensors(graph: onnx.GraphProto, sources: list[str]) -> set[str]:
    """Tensors that depend on `sources` through ops that carry gradients."""
    reached = set(sources)
    for node in graph.node:  # ONNX graphs are topologically sorted
        if node.op_type not in NON_DIFFERENTIABLE and any(name in reached for name in node.input):
            reached.update(node.output)
    return reached


def backward(b: GraphBuilder, graph: onnx.GraphProto, sources: list[str], output: str, d_output: str) -> dict[str, str]:
    """Add the nodes that compute d output / d source for every source (given `d_output`); returns their names.
    A node on the path whose op has no rule fails with one line naming the op and the node."""
    reached = differentiable_tensors(graph, sources)
    grads: dict[str, list[str]] = {output: [d_output]}
    for node in reversed(graph.node):
        outputs = [grads.get(name) for name in node.output]
        if not any(outputs) or not any(name in reached for name in node.input):
            continue
        if node.op_type not in RULES:
            raise ExportError(f"op {node.op_type} (node {node.name or node.output[0]}) has no gradient in the "
                              "portable training step and lies on the trainable path; freeze the layers before it "
                              "(e.g. --trainable head) or replace the op.")
        dy = [_summed(b, parts) if parts else None for parts in outputs[:1]]
        if dy[0] is None:
            continue
        for name, grad in zip(node.input, RULES[node.op_type](b, node, dy)):
            if grad is not None and name in reached:
                grads.setdefault(name, []).append(grad)
    missing = [s for s in sources if s not in grads]
    if missing:
        raise ExportError(f"trainable {missing[0]} does not influence the output; leave it out of --trainable.")
    return {s: _summed(b, grads[s]) for s in sources}


def _summed(b: GraphBuilder, parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else b.op("Sum", parts)


def prune(nodes: list[onnx.NodeProto], keep: set[str]) -> list[onnx.NodeProto]:
    """Drop nodes none of whose outputs is used by a later node or named in `keep`."""
    needed, kept = set(keep), []
    for node in reversed(nodes):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
    return list(reversed(kept))
