"""`--trainable sparse`: train the parameters, down to output channels, that contribute most per byte of planned
training memory (after MCUNetV3's sparse update and TinyTrain's task-adaptive selection).

1. Contribution analysis (torch, at export): with the new head briefly fitted on the calibration samples, the
   gradient of the loss is averaged over those samples; a parameter's score is |mean gradient|, AdamW's expected
   first-step loss decrease per unit of learning rate (its update is about lr·sign(g)). A channel scores the sum over
   its weights and BN scale.
2. Units: each non-depthwise conv offers its output channels, best first, in eighths; a depthwise conv, any other
   weight, trains whole. The head always trains, and so does every bias (conv bias, BN shift) after the cut.
3. The cut (the earliest block that trains) sets the activation memory: for each cut from the last block back, the
   planner (devices/planner.py) prices the training step of the head and the biases from the cut on; each unit then
   costs its parameters' state and, once per layer, the input its weight gradient keeps. Units are added greedily by
   score per MB while the plan fits the budget, and the cut with the highest total score wins.
4. The chosen channels become real graphs (channels.py); the planned peak of the graph actually written is checked
   against the budget and the selection shrunk until it fits.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import onnx

from edgeadapt.runtime.errors import ConfigError
from edgeadapt.runtime.manifest import SparseLayer, SparseSpec
from edgeadapt.toolchain.bn import apply_policy
from edgeadapt.toolchain.channels import ConvLayer, conv_layers, part_names, split_layers
from edgeadapt.toolchain.pricing import GraphShapes, Pricing, pricing

CHUNKS = 8  # a layer's channels are offered in eighths
HEAD_FIT_STEPS = 60  # AdamW steps on the head before scoring (a fresh head's gradients say little)
SCORE_BATCH = 32


@dataclass
class Unit:
    """Something that trains or not as a whole: a group of one layer's output channels, or a whole tensor."""

    layer: str  # the weight's name
    tensors: list[str]  # what trains with it (the weight and, for channels of a conv, the BN scale)
    channels: np.ndarray | None  # output channels, or None for whole tensors
    params: int
    score: float
    block: int


@dataclass
class Candidate:
    """One model's parameters, blocks and scores, ready for selection."""

    sizes: dict[str, int]
    shapes: dict[str, tuple[int, ...]]
    block_of: dict[str, int]
    head: list[str]
    layers: list[ConvLayer]
    scores: dict[str, np.ndarray]
    blocks: tuple[str, ...]
    units: list[Unit] = field(default_factory=list)
    biases: set[str] = field(default_factory=set)  # per-channel additive terms: they train whenever after the cut

    def score(self, names) -> float:
        return float(sum(self.scores[n].sum() for n in names if n in self.scores))


# ---- 1. contribution analysis -----------------------------------------------------------------------------------

def contribution_scores(module, head: list[str], head_is_new: bool, x: np.ndarray, y: np.ndarray, loss: str,
                        seed: int = 0) -> dict[str, np.ndarray]:
    """|mean gradient| of the loss over (x, y) for every parameter of `module` (eval mode, a copy)."""
    import torch

    from edgeadapt.toolchain.validate import torch_criterion

    torch.manual_seed(seed)
    model = copy.deepcopy(module).float().eval()
    inputs, targets = torch.from_numpy(x), _torch_targets(y, loss)
    criterion = torch_criterion(loss)
    if head_is_new:
        _fit_head(model, head, inputs, targets, criterion, seed)
    model.zero_grad()
    for start in range(0, len(x), SCORE_BATCH):
        part = slice(start, start + SCORE_BATCH)
        (criterion(model(inputs[part]), targets[part]) * (len(inputs[part]) / len(x))).backward()
    return {n: p.grad.detach().abs().numpy() for n, p in model.named_parameters() if p.grad is not None}


def _torch_targets(y: np.ndarray, loss: str):
    import torch

    return torch.from_numpy(y.astype(np.int64) if loss == "cross_entropy" else y.astype(np.float32))


def _fit_head(model, head: list[str], inputs, targets, criterion, seed: int) -> None:
    """A few AdamW steps on the head alone, over the frozen backbone's features (computed once)."""
    import torch

    module, features = _head_module_and_inputs(model, head, inputs)
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if n in set(head)], lr=1e-3)
    rng = np.random.default_rng(seed)
    for _ in range(HEAD_FIT_STEPS):
        index = torch.from_numpy(rng.choice(len(inputs), min(SCORE_BATCH, len(inputs)), replace=False))
        optimizer.zero_grad()
        criterion(module(features[index]), targets[index]).backward()
        optimizer.step()


def _head_module_and_inputs(model, head: list[str], inputs):
    """The module owning the head's parameters, and what it reads for each input (captured by a hook)."""
    import torch

    modules = dict(model.named_modules())
    name = head[0].rsplit(".", 1)[0]
    while name not in modules:
        name = name.rsplit(".", 1)[0] if "." in name else ""
    captured = []
    handle = modules[name].register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
    with torch.no_grad():
        for start in range(0, len(inputs), SCORE_BATCH):
            model(inputs[start:start + SCORE_BATCH])
    handle.remove()
    return modules[name], torch.cat(captured)


# ---- 2. units -----------------------------------------------------------------------------------------------------

def build_candidate(graph: onnx.ModelProto, params: list[str], head: list[str], blocks: tuple[str, ...],
                    scores: dict[str, np.ndarray]) -> Candidate:
    """`graph` is the eval export with its BN nodes (before the BN policy)."""
    shapes = {i.name: tuple(int(d) for d in i.dims) for i in graph.graph.initializer if i.name in set(params)}
    layers = conv_layers(graph, set(params) - set(head))
    blocks = blocks or tuple(layer.weight.rsplit(".", 1)[0] for layer in layers)
    block_of = {n: _block_index(n, blocks) for n in params}
    weights = {layer.weight for layer in layers}
    biases = {b for layer in layers for b in layer.biases} | \
        {n for n in params if n.endswith(".bias") and n not in weights}
    cand = Candidate({n: int(np.prod(s)) for n, s in shapes.items()}, shapes, block_of, head, layers,
                     {n: scores.get(n, np.zeros(shapes[n], np.float32)) for n in params}, blocks, biases=biases)
    cand.units = _units(cand, params)
    return cand


def _block_index(name: str, blocks: tuple[str, ...]) -> int:
    """The last block whose prefix `name` falls under; 0 for names outside every block (they train only with all)."""
    hits = [i for i, p in enumerate(blocks) if name == p or name.startswith(p + ".")]
    return hits[-1] if hits else 0


def _units(cand: Candidate, params: list[str]) -> list[Unit]:
    units, covered = [], set(cand.head)
    for layer in cand.layers:
        covered.update(layer.channel_tensors)
        tensors = [layer.weight] + ([layer.scale] if layer.scale else [])
        block = cand.block_of[layer.weight]
        if layer.depthwise or layer.outputs < CHUNKS:
            units.append(Unit(layer.weight, tensors, None, sum(cand.sizes[t] for t in tensors), cand.score(tensors),
                              block))
            continue
        per_channel = sum(cand.scores[t].reshape(layer.outputs, -1).sum(axis=1) for t in tensors)
        order = np.argsort(-per_channel, kind="stable")
        width = int(np.ceil(layer.outputs / CHUNKS))
        channel_params = sum(cand.sizes[t] for t in tensors) // layer.outputs
        for start in range(0, layer.outputs, width):
            chosen = order[start:start + width]
            units.append(Unit(layer.weight, tensors, chosen, channel_params * len(chosen),
                              float(per_channel[chosen].sum()), block))
    for name in params:  # other weights (a Linear inside the backbone, a norm's scale) train whole
        if name not in covered and name not in cand.biases:
            units.append(Unit(name, [name], None, cand.sizes[name], cand.score([name]), cand.block_of[name]))
    return units


def biases_from(cand: Candidate, cut: int) -> list[str]:
    return [n for n in cand.sizes if n not in cand.head and cand.block_of[n] >= cut and n in cand.biases]


# ---- 3. the search ------------------------------------------------------------------------------------------------

def input_bytes(raw: onnx.ModelProto, weights: list[str], shapes: dict) -> dict[str, float]:
    """Per-sample bytes of the tensor each weight's layer reads (its weight gradient needs it kept), from shapes
    measured by running the graph (graph_builder.inferred_shapes)."""
    reader = {}
    for node in raw.graph.node:
        for name in node.input[1:]:
            reader.setdefault(name, node.input[0])
    per_sample = {name: 4.0 * float(np.prod([d for d in dims if d != "batch"])) for name, dims in shapes.items()
                  if "batch" in dims}
    return {w: per_sample.get(reader.get(w, ""), 0.0) for w in weights}


@dataclass
class Selection:
    cut: int
    units: list[Unit]
    mandatory: list[str]
    score: float
    base_mb: float  # planned peak of the head and the biases alone, at this cut
    room_mb: float  # what the units were given
    planned_mb: float = 0.0


def select(cand: Candidate, price_cut, budget_mb: float, activation: dict[str, float]) -> tuple[Selection, list[str]]:
    """The best-scoring selection over cuts whose planned peak fits; `price_cut(cut)` prices the head and the biases
    from `cut` on, `activation` is each layer's input bytes per sample. The last "cut", past every block, is the head
    alone: a budget that affords nothing more makes sparse the `head` preset, never worse. Raises if not even the
    head fits."""
    best, reasons = None, []
    for cut in range(len(cand.blocks), -1, -1):
        mandatory = cand.head + biases_from(cand, cut)
        price = price_cut(cut)
        base = price.peak(sum(cand.sizes[n] for n in mandatory))
        if base > budget_mb:  # earlier cuts keep more activations still
            reasons.append(f"{cut_name(cand, cut)}: {base:.1f} MB with the head and biases alone")
            break
        chosen = fill(cand, cut, budget_mb - base, price, activation)
        total = cand.score(mandatory) + sum(u.score for u in chosen)
        reasons.append(f"{cut_name(cand, cut)}: score {total:.3g}")
        if best is None or total > best.score:
            best = Selection(cut, chosen, mandatory, total, base, budget_mb - base)
    if best is None:
        raise ConfigError(f"--trainable sparse: not even the head fits {budget_mb:.1f} MB ({reasons[-1]}); raise "
                          "--budget-mb or lower the batch size.")
    return best, reasons


def cut_name(cand: Candidate, cut: int) -> str:
    return f"cut at {cand.blocks[cut]}" if cut < len(cand.blocks) else "the head alone"


def fill(cand: Candidate, cut: int, room_mb: float, price: Pricing, activation: dict[str, float]) -> list[Unit]:
    """Greedy by score per MB: units of blocks ≥ `cut` while they fit `room_mb`. A layer's channel groups come best
    first; the first one also pays for keeping the layer's input for its weight gradient."""
    queues: dict[str, list[Unit]] = {}
    for unit in cand.units:
        if unit.block >= cut:
            queues.setdefault(unit.layer, []).append(unit)
    opened, chosen = set(), []

    def cost(unit: Unit) -> float:
        extra = 0.0 if unit.layer in opened else price.kept_mb(activation.get(unit.layer, 0.0))
        return unit.params * price.mb_per_param + extra
    while queues:
        layer, unit = max(((n, q[0]) for n, q in queues.items()), key=lambda item: item[1].score / cost(item[1]))
        if cost(unit) > room_mb:
            del queues[layer]  # neither this group nor the weaker ones after it
            continue
        room_mb -= cost(unit)
        opened.add(layer)
        chosen.append(unit)
        queues[layer].pop(0)
        if not queues[layer]:
            del queues[layer]
    return chosen


# ---- 4. the graphs ------------------------------------------------------------------------------------------------

@dataclass
class SparseGraph:
    graph: onnx.ModelProto  # BN policy applied
    params: list[str]  # every parameter, split ones replaced by their parts, in model order
    trainable: list[str]
    parts: dict[str, tuple[str, list[int]]]


def realize(raw: onnx.ModelProto, cand: Candidate, selection: Selection, params: list[str],
            bn_policy: str) -> SparseGraph:
    """The eval graph with the selection's channel splits, BN policy applied, and its trainable names."""
    channels: dict[str, list[np.ndarray]] = {}
    whole: set[str] = set(selection.mandatory)
    for unit in selection.units:
        if unit.channels is None:
            whole.update(unit.tensors)
        else:
            channels.setdefault(unit.layer, []).append(unit.channels)
    layer_of = {layer.weight: layer for layer in cand.layers}
    partial = {}
    for weight, groups in channels.items():
        picked = np.unique(np.concatenate(groups))
        if len(picked) == layer_of[weight].outputs:
            whole.update([weight] + ([layer_of[weight].scale] if layer_of[weight].scale else []))
        else:
            partial[weight] = picked
    graph = copy.deepcopy(raw)
    parts = split_layers(graph, partial)
    split = {name for name, _ in parts.values()}
    trainable_parts = set()
    for weight in partial:
        layer = layer_of[weight]
        trainable_parts.update(part_names(weight)[:1])
        if layer.scale:
            trainable_parts.add(part_names(layer.scale)[0])
        for bias in layer.biases:
            if bias in whole:
                trainable_parts.update(part_names(bias))
    all_params = [p for n in params for p in (part_names(n) if n in split else (n,))]
    trainable = [p for p in all_params if p in whole or p in trainable_parts]
    return SparseGraph(apply_policy(graph, bn_policy), all_params, trainable, parts)


def charged(units: list[Unit], price: Pricing, activation: dict[str, float]) -> float:
    """Planned MB of `units`: their parameters' state and, once per layer, its kept input."""
    layers = {u.layer for u in units}
    return sum(u.params for u in units) * price.mb_per_param + \
        sum(price.kept_mb(activation.get(layer, 0.0)) for layer in layers)


def spec_of(cand: Candidate, selection: Selection, budget_mb: float, batch: int, samples: int,
            price: Pricing, activation: dict[str, float]) -> SparseSpec:
    """The manifest's record: per trained layer, the channels, parameters, score and the memory they take."""
    groups: dict[str, list[Unit]] = {}
    for unit in selection.units:
        groups.setdefault(unit.layer, []).append(unit)
    layers = []
    for name, units in groups.items():
        channels = sorted(int(c) for u in units if u.channels is not None for c in u.channels)
        total = cand.shapes[name][0] if channels else 0
        params = sum(u.params for u in units)
        layers.append(SparseLayer(name=name, channels=channels, total_channels=total, params=params,
                                  score=round(sum(u.score for u in units), 8),
                                  mb=round(charged(units, price, activation), 3)))
    layers.sort(key=lambda layer: -layer.score / max(layer.params, 1))
    mandatory = sum(cand.sizes[n] for n in selection.mandatory)
    return SparseSpec(budget_mb=float(budget_mb), batch_size=batch, planned_mb=round(selection.planned_mb, 2),
                      cut=cand.blocks[selection.cut] if selection.cut < len(cand.blocks) else "",
                      calibration_samples=samples, layers=layers,
                      always=len(selection.mandatory), always_params=mandatory,
                      always_score=round(cand.score(selection.mandatory), 8))


# ---- the whole choice ---------------------------------------------------------------------------------------------

MAX_CALIBRATION = 512  # samples scored (a random subset of larger sets)
SHRINK_TRIES = 6


@dataclass(frozen=True)
class _DataView:
    """What the runtime's data loaders read from a manifest, before there is one."""

    input: object
    labels: list[str]
    loss: str
    assets: dict = field(default_factory=dict)  # the bundle's files to be (a text model's vocabulary)

    def tokenizer(self):
        from edgeadapt.runtime.text import WordPiece

        return WordPiece.from_text(self.assets[self.input.tokens.vocab_file].decode("utf-8"), self.input.tokens)

    @property
    def is_classification(self) -> bool:
        return self.loss in ("cross_entropy", "bce_with_logits")

    @property
    def num_outputs(self) -> int:
        return len(self.labels)


def calibration_arrays(path, input_spec, labels: list[str], loss: str, seed: int,
                       assets: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs and targets of the calibration data (any format `edgeadapt train` reads)."""
    from edgeadapt.runtime.data import batch_inputs, load_dataset

    if path is None:
        raise ConfigError("--trainable sparse needs --calibration DATA (your samples, or a labelled proxy set in any "
                          "format `edgeadapt train` reads) to score what to train.")
    view = _DataView(input_spec, list(labels), loss, assets or {})
    data = load_dataset(path, view)
    index = np.sort(np.random.default_rng(seed).permutation(len(data))[:MAX_CALIBRATION])
    return batch_inputs(data, index, view), data.targets[index]


@dataclass
class SparseChoice:
    graph: SparseGraph
    spec: SparseSpec
    reasons: list[str]


def choose_sparse(raw: onnx.ModelProto, module, params: list[str], head: list[str], head_is_new: bool,
                  blocks: tuple[str, ...], x: np.ndarray, y: np.ndarray, opts, budget_mb: float,
                  batch: int) -> SparseChoice:
    """Score, search and realize a sparse selection of `raw` (the eval export with BN nodes) under `budget_mb`."""
    scores = contribution_scores(module, head, head_is_new, x, y, opts.loss, opts.seed)
    cand = build_candidate(raw, params, head, blocks, scores)
    dense_graph = apply_policy(copy.deepcopy(raw), opts.bn)
    total = sum(cand.sizes.values())

    shapes = GraphShapes.of(dense_graph)

    def price_cut(cut: int) -> Pricing:
        return pricing(dense_graph, head + biases_from(cand, cut), opts, batch, total, shapes)
    activation = input_bytes(raw, sorted({u.layer for u in cand.units}), shapes.measured)
    selection, reasons = select(cand, price_cut, budget_mb, activation)
    for _ in range(SHRINK_TRIES):
        realized = realize(raw, cand, selection, params, opts.bn)
        sizes = {i.name: int(np.prod(i.dims)) for i in realized.graph.graph.initializer}
        price = pricing(realized.graph, realized.trainable, opts, batch, total)
        selection.planned_mb = price.peak(sum(sizes[n] for n in realized.trainable))
        if selection.planned_mb <= budget_mb:
            spec = spec_of(cand, selection, budget_mb, batch, len(x), price, activation)
            return SparseChoice(realized, spec, reasons)
        # the plan grows about linearly with the room given: aim the next try at the budget, with 3% to spare
        growth = (selection.planned_mb - selection.base_mb) / max(selection.room_mb, 1e-6)
        selection.room_mb = min(selection.room_mb, 0.97 * (budget_mb - selection.base_mb) / max(growth, 1e-6))
        selection.units = fill(cand, selection.cut, selection.room_mb, price, activation)
    raise ConfigError(f"--trainable sparse: no selection under {budget_mb:.0f} MB was found after {SHRINK_TRIES} "
                      "tries; raise --budget-mb.")
