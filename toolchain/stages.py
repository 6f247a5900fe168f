"""The typed stages every export goes through, whatever the model came from:

    Source (eval graph + parameter lists + labels + reference)  →  TrainingPlan (toolchain/plan.py)
    →  Artifacts (graphs, state, split)  →  ValidationReport  →  Manifest (+ signature)

`Source` is built from a zoo backbone, a `--model` factory or an `--onnx` file; everything after it is shared."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from edgeadapt.runtime.manifest import InputSpec, PortableSpec, SplitSpec
from edgeadapt.runtime.state import STATE_FILE, TrainState, named_parameters, write_safetensors

INPUT_NAME, OUTPUT_NAME = "input", "logits"


@dataclass
class Source:
    """The first stage: an eval-mode graph (`input` → `logits`, BN folded) and what the later stages need."""

    graph: onnx.ModelProto
    params: list[str]  # trainable candidates, in model order
    buffers: list[str]  # statistics and constants: always frozen
    labels: list[str]
    input: InputSpec
    backbone: str
    weights: str
    head: list[str]
    head_is_new: bool
    reference: Callable[[np.ndarray], np.ndarray]  # the source model's logits, for validation
    torch_module: object | None = None  # the torch model, when there is one: gradients are checked against it
    blocks: tuple[str, ...] = ()  # block boundaries, input to output (`last:K`)
    head_module: str = ""  # the head's module name in a torch model
    notes: list[str] = field(default_factory=list)
    parts: dict[str, tuple[str, list[int]]] = field(default_factory=dict)  # channel splits: part -> (name, channels)
    sparse: object | None = None  # `--trainable sparse`: the SparseChoice (toolchain/sparse.py)
    assets: dict[str, bytes] = field(default_factory=dict)  # files the bundle ships besides graphs (vocab.txt)
    lora: object | None = None  # `lora:R`: the manifest's LoraSpec (without its merged layout)
    merged_graph: onnx.ModelProto | None = None  # `lora:R`: the eval graph with the adapters merged

    def examples(self, batch: int, seed: int = 0) -> np.ndarray:
        """Example inputs of this source's kind (real token ids for text)."""
        from edgeadapt.toolchain.inputs import examples

        return examples(self.input, self.assets, batch, seed)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.input.shape[1:])


@dataclass(frozen=True)
class Lists:
    """Every initializer lands in exactly one list."""

    trainable: list[str]
    frozen: list[str]
    buffers: list[str]


@dataclass
class Artifacts:
    portable: PortableSpec
    split: SplitSpec | None
    memory: dict[str, float]
    ort_training_missing: str  # why ONNX Runtime training's artifacts were left out ("": written)
    lora: object | None = None  # `lora:R`: the manifest's LoraSpec, merged layout included


def initial_values(graph: onnx.ModelProto, layout: list) -> np.ndarray:
    """The graph's initializers of `layout` as one flat float32 vector."""
    values = {init.name: onnx.numpy_helper.to_array(init) for init in graph.graph.initializer}
    return np.concatenate([values[p.name].astype(np.float32).ravel() for p in layout]) if layout \
        else np.zeros(0, np.float32)


def initial_state(graph: onnx.ModelProto, portable: PortableSpec) -> TrainState:
    statistics = initial_values(graph, portable.statistics) if portable.statistics else None
    return TrainState(initial_values(graph, portable.layout), statistics=statistics)


def write_initial_state(out_dir: Path, graph: onnx.ModelProto, portable: PortableSpec) -> None:
    """The exported parameters (and BN statistics) as the bundle's first state (no optimizer state, no progress)."""
    state = initial_state(graph, portable)
    tensors = {f"params/{name}": value for name, value in named_parameters(state.params, portable.layout).items()}
    if state.statistics is not None:
        tensors.update({f"statistics/{name}": value for name, value in
                        named_parameters(state.statistics, portable.statistics).items()})
    write_safetensors(out_dir / STATE_FILE, tensors, {"format": "pt"})
