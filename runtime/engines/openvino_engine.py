"""The portable training step on OpenVINO: CPU, GPU or NPU (f32 throughout), with static shapes: one compiled step
per batch size seen (the last, smaller batch of an epoch compiles once more). On CPU a dynamic batch needed 1.6-1.7×
the memory of a static one and ran 10-15% slower (MobileNetV2 full, 224 px, batch 8: 1922 vs 1228 MB)."""

from __future__ import annotations

import math

import numpy as np

from edgeadapt.runtime.data import as_model_input
from edgeadapt.runtime.engines import check_share
from edgeadapt.runtime.errors import BackendError
from edgeadapt.runtime.heap import release_freed
from edgeadapt.runtime.losses import mean_loss
from edgeadapt.runtime.manifest import GRAD_SHARE, GRAD_SUM
from edgeadapt.runtime.ov import openvino_module, with_constant_input
from edgeadapt.runtime.state import STATISTICS_INPUT, TrainState, optimizer_vectors


def devices() -> list[str]:
    return [d.lower() for d in openvino_module().Core().available_devices]


def create(bundle, graphs, device: str, threads: int | None, training: bool) -> "OpenVinoEngine":
    return OpenVinoEngine(bundle, graphs, device, threads, training)


class OpenVinoEngine:
    name = "openvino"

    def __init__(self, bundle, graphs, device: str = "cpu", threads: int | None = None, training: bool = True):
        openvino = openvino_module()
        manifest = bundle.manifest
        self._core = openvino.Core()
        self.device, self.manifest = device, manifest
        self._target = device.upper()
        if self._target.partition(".")[0] not in {d.partition(".")[0] for d in self._core.available_devices}:
            raise BackendError(f"OpenVINO device {self._target} is not present here (available: "
                               f"{', '.join(self._core.available_devices)}); use --device cpu.")
        self._config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads and self._target == "CPU":
            self._config["INFERENCE_NUM_THREADS"] = threads
        # the verified bytes, never the path: what was hashed is what runs
        self._graphs = {"forward": bundle.read_graph(graphs.forward)}
        if training:
            self._graphs["step"] = bundle.read_graph(graphs.train_step)
        self._compiled: dict[tuple[str, int], tuple[object, set[str]]] = {}
        self._state_names = list(manifest.portable.state)
        self._values: dict[str, np.ndarray] = {}
        self._statistics: np.ndarray | None = None  # BN statistics, compiled into the models as constants
        self._t = 0
        self._accumulates = graphs.accumulates
        self._size = sum(p.size for p in manifest.portable.layout)
        self._pending: np.ndarray | None = None  # the weighted gradient of this step's earlier micro-batches

    def _request(self, graph: str, batch: int):
        key = (graph, batch)
        if key not in self._compiled:
            model = self._core.read_model(self._graphs[graph])
            if self._statistics is not None:  # frozen during training: constants, folded into the weights
                model = with_constant_input(model, STATISTICS_INPUT, self._statistics)
            model.reshape({p.get_any_name(): _batched(p, batch, self._size) for p in model.inputs})
            request = self._core.compile_model(model, self._target, self._config).create_infer_request()
            del model
            release_freed()  # the graph's parsed copy and the compiler's scratch
            names = {name for port in request.model_inputs for name in port.get_names()}
            self._compiled[key] = (request, names)  # names: the inputs the compiled graph kept (unused are pruned)
        return self._compiled[key]

    def load(self, state: TrainState) -> None:
        moments, self._t = optimizer_vectors(state, self._state_names[1:])
        # copies: a caller's later writes to `state` must not reach the engine
        arrays = {"params": state.params, **moments}
        self._values = {name: np.array(value, np.float32) for name, value in arrays.items()}
        statistics = None if state.statistics is None else np.array(state.statistics, np.float32)
        if not _same(statistics, self._statistics):
            self._compiled.clear()  # compiled with other statistics
        self._statistics = statistics
        self._pending = None

    def state(self) -> TrainState:
        optimizer = {name: self._values[name].copy() for name in self._state_names[1:]}
        optimizer["step"] = np.asarray(self._t, np.int64)
        statistics = None if self._statistics is None else self._statistics.copy()
        return TrainState(self._values["params"].copy(), optimizer, statistics=statistics)

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float, share: float = 1.0) -> tuple[float, np.ndarray]:
        outputs = self._run_step(x, y, lr, share, update=True)
        loss = float(outputs["loss"])
        if math.isfinite(loss):
            self._values = {name: np.array(outputs[f"{name}.new"], np.float32) for name in self._state_names}
            self._t += 1
            self._pending = None
        return loss, np.array(outputs[self.manifest.output_name])

    def accumulate(self, x: np.ndarray, y: np.ndarray, share: float) -> tuple[float, np.ndarray]:
        outputs = self._run_step(x, y, 0.0, share, update=False)
        loss = float(outputs["loss"])
        if math.isfinite(loss):
            self._pending = np.array(outputs[f"{GRAD_SUM}.new"], np.float32)
        return loss, np.array(outputs[self.manifest.output_name])

    def _run_step(self, x: np.ndarray, y: np.ndarray, lr: float, share: float, update: bool) -> dict:
        check_share(self._accumulates, share, update)
        request, wanted = self._request("step", len(x))
        feed = {0: as_model_input(x), "labels": np.ascontiguousarray(y),
                "lr": np.asarray(lr, np.float32), "step": np.asarray(self._t + 1, np.int64), **self._values}
        if self._accumulates:
            pending = self._pending if self._pending is not None else np.zeros(self._size, np.float32)
            feed.update({GRAD_SUM: pending, GRAD_SHARE: np.asarray(share, np.float32)})
        result = request.infer({k: v for k, v in feed.items() if k == 0 or k in wanted})
        return {k.get_any_name(): v for k, v in result.items()}

    def logits(self, x: np.ndarray) -> np.ndarray:
        request, _ = self._request("forward", len(x))
        result = request.infer({0: as_model_input(x), "params": self._values["params"]})
        return np.array(next(v for k, v in result.items() if self.manifest.output_name in k.get_names()))

    def eval_step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        logits = self.logits(x)
        return mean_loss(self.manifest.loss, logits, y), logits


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def _batched(port, batch: int, state_size: int) -> list[int]:
    """The port's shape with the batch fixed (state vectors and scalars keep theirs; the gradient sum is fed whole)."""
    shape = port.get_partial_shape()
    if port.get_any_name() == GRAD_SUM:
        return [state_size]
    if shape.rank.get_length() == 0 or port.get_any_name() in ("lr", "step", "params", "adam_m", "adam_v"):
        return [d.get_length() for d in shape] if shape.is_static else shape
    return [batch, *[d.get_length() for d in list(shape)[1:]]]
