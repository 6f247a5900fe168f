"""Pricing a trainable set before anything is exported: the planner's memory record measured on the training step
built in memory (as the export builds it: artifacts.write_portable, split.build_split), then the planner's one
pricing function (devices/planner.py `price`). `--trainable auto` and `--trainable sparse` price here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from edgeadapt.devices.planner import KEPT_FACTOR, MB, price


@dataclass(frozen=True)
class Pricing:
    """Planned peak MB of training with `n` trainable parameters, from one planner memory record."""

    memory: dict[str, float]
    split: bool
    total_params: int
    moments: int
    batch: int
    kind: str = "image"  # the input kind: picks the planner's calibration

    def peak(self, trainable: int, accumulating: bool = False) -> float:
        return price(trainable, self.total_params, self.moments, self.memory, self.batch, self.split,
                     self.kind, accumulating).total_mb

    @property
    def mb_per_param(self) -> float:
        return (self.peak(1_000_000) - self.peak(0)) / 1_000_000

    def kept_mb(self, bytes_per_sample: float) -> float:
        """What keeping one more forward tensor for the backward pass adds to the plan."""
        return KEPT_FACTOR * bytes_per_sample * self.batch / MB


@dataclass(frozen=True)
class GraphShapes:
    """A graph's measured and inferred shapes and its largest forward tensor, computed once for many pricings."""

    measured: dict
    inferred: onnx.ModelProto
    largest_bytes_per_sample: float

    @classmethod
    def of(cls, graph: onnx.ModelProto) -> "GraphShapes":
        from edgeadapt.toolchain.graph_builder import inferred_shapes, with_inferred_types

        typed = with_inferred_types(graph)
        measured = inferred_shapes(graph, typed=typed)
        largest = max(4.0 * float(np.prod([d for d in dims if d != "batch"])) for dims in measured.values()
                      if "batch" in dims)
        return cls(measured, typed, largest)


def pricing(graph: onnx.ModelProto, trainable: list[str], opts, batch: int, total_params: int,
            shapes: GraphShapes | None = None, kind: str = "image", groups: tuple | list = ()) -> Pricing:
    """The planner's inputs for training `trainable` of `graph` (BN policy applied), split when the frozen part is a
    prefix — computed as the export computes them (artifacts.write_portable, split.build_split), with the export's
    parameter `groups` (their per-element rate and decay vectors are constants a transformer's plan prices). With
    `shapes` (a search over many trainable sets), a split graph's prefix is priced by its largest tensor alone."""
    from edgeadapt.toolchain.artifacts import memory_record
    from edgeadapt.toolchain.split import SUFFIX, split_suffix
    from edgeadapt.toolchain.train_step import build_train_step, initializer_bytes

    def measured(model, prefix=""):
        graphs = build_train_step(model, trainable, opts.loss, opts.optimizer, groups)
        return len(graphs.state_names) - 1, memory_record(graphs, prefix)
    found = split_suffix(graph, trainable, shapes and shapes.measured, shapes and shapes.inferred) \
        if opts.split else None
    if found is None:
        moments, memory = measured(graph)
        return Pricing(memory, False, total_params, moments, batch, kind)
    moments, memory = measured(found[3], SUFFIX)
    memory["prefix_constant_bytes"] = float(initializer_bytes(graph))  # the frozen prefix holds about all of them
    memory["prefix_largest_bytes_per_sample"] = shapes.largest_bytes_per_sample if shapes else \
        measured(graph)[1]["largest_bytes_per_sample"]
    return Pricing(memory, True, total_params, moments, batch, kind)
