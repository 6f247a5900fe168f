"""Channel-level trainability that is real in the graphs: a conv whose selected output channels train and whose
other channels stay frozen becomes two convs, `W@sel` (trainable) and `W@rest` (a constant), whose outputs are
concatenated and put back in the original channel order by a constant-permutation Gather. Every per-channel tensor
of the layer (conv bias, BN scale, shift and running statistics) is split the same way. The backward pass then
computes weight gradients, and the optimizer keeps moments, for the selected channels only; frozen channels get
neither. The rewrite runs on the eval export before the BN policy, so each half folds its own BN like any conv."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

SELECTED, REST = "@sel", "@rest"


@dataclass(frozen=True)
class ConvLayer:
    """A Conv of the eval export with its per-output-channel tensors (all initializers)."""

    node: str  # the Conv node's first output (unique)
    weight: str
    outputs: int  # output channels
    depthwise: bool
    conv_bias: str | None
    bn: tuple[str, str, str, str] | None  # scale, shift, running mean, running variance

    @property
    def scale(self) -> str | None:
        return self.bn[0] if self.bn else None

    @property
    def biases(self) -> list[str]:
        """The layer's per-channel additive terms: they train whenever the layer lies after the cut."""
        return [n for n in (self.conv_bias, self.bn[1] if self.bn else None) if n]

    @property
    def channel_tensors(self) -> list[str]:
        return [n for n in (self.weight, self.conv_bias, *(self.bn or ())) if n]


def conv_layers(model: onnx.ModelProto, params: set[str]) -> list[ConvLayer]:
    """The Conv nodes whose weight is a parameter, in graph order, each with the BN that alone reads its output."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    layers = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.input[1] not in params:
            continue
        weight = next(i for i in model.graph.initializer if i.name == node.input[1])
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        readers = consumers.get(node.output[0], [])
        bn = readers[0] if len(readers) == 1 and readers[0].op_type == "BatchNormalization" else None
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        layers.append(ConvLayer(node.output[0], weight.name, int(weight.dims[0]), group > 1 and group == weight.dims[0],
                                bias, tuple(bn.input[1:5]) if bn else None))
    return layers


def part_names(name: str) -> tuple[str, str]:
    return name + SELECTED, name + REST


def split_layers(model: onnx.ModelProto, selected: dict[str, np.ndarray]) -> dict[str, tuple[str, list[int]]]:
    """Split, in place, each Conv whose weight is a key of `selected` (its trainable output channels, a proper
    non-empty subset); return every new tensor as {part name: (original name, channel indices)}."""
    layers = {layer.weight: layer for layer in conv_layers(model, set(selected))}
    parts: dict[str, tuple[str, list[int]]] = {}
    for weight, channels in selected.items():
        layer = layers[weight]
        chosen = np.unique(np.asarray(channels, np.int64))
        rest = np.setdiff1d(np.arange(layer.outputs), chosen)
        if layer.depthwise or not 0 < len(chosen) < layer.outputs:
            raise ValueError(f"{weight}: channel split needs a non-depthwise conv and a proper subset of channels")
        for name in layer.channel_tensors:
            for part, index in zip(part_names(name), (chosen, rest)):
                parts[part] = (name, index.tolist())
        _split_tensors(model, layer, chosen, rest)
        _split_nodes(model, layer, chosen, rest)
    return parts


def _split_tensors(model: onnx.ModelProto, layer: ConvLayer, chosen: np.ndarray, rest: np.ndarray) -> None:
    wanted = set(layer.channel_tensors)
    kept, added = [], []
    for init in model.graph.initializer:
        if init.name not in wanted:
            kept.append(init)
            continue
        value = numpy_helper.to_array(init)
        added += [numpy_helper.from_array(value[index], part)
                  for part, index in zip(part_names(init.name), (chosen, rest))]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + added)


def _split_nodes(model: onnx.ModelProto, layer: ConvLayer, chosen: np.ndarray, rest: np.ndarray) -> None:
    """Conv (+BN) → [Conv@sel (+BN@sel), Conv@rest (+BN@rest)] → Concat → Gather(inverse permutation)."""
    nodes = list(model.graph.node)
    conv_at = next(i for i, n in enumerate(nodes) if n.op_type == "Conv" and n.output[0] == layer.node)
    conv = nodes[conv_at]
    bn_at = next((i for i, n in enumerate(nodes) if n.op_type == "BatchNormalization" and n.input[0] == layer.node),
                 None) if layer.bn else None
    last = nodes[bn_at] if bn_at is not None else conv
    result = last.output[0]
    halves, new = [], []
    for tag in (SELECTED, REST):
        inputs = [conv.input[0], layer.weight + tag] + ([layer.conv_bias + tag] if layer.conv_bias else [])
        out = helper.make_node("Conv", inputs, [layer.node + tag], name=layer.weight + tag)
        out.attribute.extend(conv.attribute)
        new.append(out)
        half = layer.node + tag
        if bn_at is not None:
            bn = nodes[bn_at]
            norm = helper.make_node("BatchNormalization", [half, *(t + tag for t in layer.bn)], [result + tag],
                                    name=layer.weight + tag + "/bn")
            norm.attribute.extend(bn.attribute)
            new.append(norm)
            half = result + tag
        halves.append(half)
    inverse = np.argsort(np.concatenate([chosen, rest])).astype(np.int64)
    order = f"{layer.weight}/channel_order"
    model.graph.initializer.append(numpy_helper.from_array(inverse, order))
    new += [helper.make_node("Concat", halves, [result + "/halves"], axis=1, name=result + "/concat"),
            helper.make_node("Gather", [result + "/halves", order], [result], axis=1, name=result + "/reorder")]
    drop = {conv_at} | ({bn_at} if bn_at is not None else set())
    rebuilt = [n for i, n in enumerate(nodes[:max(drop) + 1]) if i not in drop] + new + nodes[max(drop) + 1:]
    del model.graph.node[:]
    model.graph.node.extend(rebuilt)


def expand_reference(values: dict[str, np.ndarray], parts: dict[str, tuple[str, list[int]]]) -> dict:
    """A per-name dict of full tensors (torch gradients, weights) with the split parts added."""
    out = dict(values)
    for part, (name, index) in parts.items():
        if name in values:
            out[part] = values[name][index]
    return out
