"""One engine protocol for training and evaluation, three implementations:

- `onnxruntime`: the portable training step on any onnxruntime build and execution provider (CPU, CUDA, …);
- `openvino`: the same graphs on OpenVINO's CPU, GPU or NPU;
- `ort-training`: ONNX Runtime training's own artifacts (legacy: x86_64 and Python <= 3.11 only).

Every engine takes and gives a `TrainState`; the trainer, evaluation and benchmarks see only this protocol.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Protocol

import numpy as np

from edgeadapt.runtime.errors import BackendError, InternalError, UnknownNameError
from edgeadapt.runtime.state import TrainState

ENGINES = ("auto", "onnxruntime", "openvino", "ort-training")
_MODULES = {"onnxruntime": "onnxruntime_engine", "openvino": "openvino_engine", "ort-training": "ort_training_engine"}


class Engine(Protocol):
    name: str
    device: str

    def load(self, state: TrainState) -> None:
        """Take parameters (and optimizer state, when it holds this engine's) from `state`."""

    def state(self) -> TrainState:
        """Current parameters and optimizer state (no progress)."""

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float, share: float = 1.0) -> tuple[float, np.ndarray]:
        """Forward, backward and update; a non-finite loss leaves the state unchanged. On an engine opened over
        the accumulating step (`GraphFiles.accumulates`), the update uses the micro-batches accumulated since the
        last update plus `share` × this batch's gradient."""

    def accumulate(self, x: np.ndarray, y: np.ndarray, share: float) -> tuple[float, np.ndarray]:
        """Accumulating step only: add `share` × this micro-batch's gradient (its share of the effective batch)
        to the sum the next `train_step` updates with; parameters stay. `load` drops a pending sum."""

    def eval_step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """Loss and logits with the current parameters."""


def check_share(accumulates: bool, share: float, update: bool) -> None:
    """A micro-batch needs an engine over the accumulating step (the trainer opens one for --accumulate)."""
    if not accumulates and (share != 1.0 or not update):
        raise InternalError("micro-batches need an engine opened over the accumulating step")


def resolve_engine(name: str, device: str) -> str:
    """`auto`: OpenVINO for an Intel GPU/NPU (`--device gpu|npu` with OpenVINO installed), else onnxruntime."""
    if name not in ENGINES:
        raise UnknownNameError(f"unknown --engine '{name}'; choose one of {', '.join(ENGINES)}.")
    if name != "auto":
        return name
    if device.lower() in ("gpu", "npu") and importlib.util.find_spec("openvino") is not None:
        return "openvino"
    return "onnxruntime"


def open_engine(bundle, graphs, name: str = "auto", device: str = "cpu", threads: int | None = None,
                training: bool = True) -> Engine:
    """An engine over `graphs` (a bundle's whole-graph or suffix files), loaded with the bundle's current state."""
    chosen = resolve_engine(name, device)
    module = importlib.import_module(f"edgeadapt.runtime.engines.{_MODULES[chosen]}")
    return module.create(bundle, graphs, device, threads, training)


def available() -> dict[str, list[str]]:
    """Engines this install can run, with their devices."""
    found: dict[str, list[str]] = {}
    for name, module in _MODULES.items():
        try:
            devices = importlib.import_module(f"edgeadapt.runtime.engines.{module}").devices()
        except BackendError:
            continue
        if devices:
            found[name] = devices
    return found
