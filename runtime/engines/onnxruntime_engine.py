"""The portable training step on the maintained onnxruntime, any execution provider. The state lives in OrtValues
on the provider's device between steps (I/O binding): a GPU keeps parameters and moments in its own memory."""

from __future__ import annotations

import math

import numpy as np

from edgeadapt.runtime.data import as_model_input
from edgeadapt.runtime.engines import check_share
from edgeadapt.runtime.errors import BackendError
from edgeadapt.runtime.heap import release_freed
from edgeadapt.runtime.losses import mean_loss
from edgeadapt.runtime.manifest import GRAD_SHARE, GRAD_SUM
from edgeadapt.runtime.ort import available_providers, onnxruntime_module, session_options
from edgeadapt.runtime.state import STATISTICS_INPUT, TrainState, optimizer_vectors

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "rocm": "ROCMExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider", "dml": "DmlExecutionProvider",
             "coreml": "CoreMLExecutionProvider", "qnn": "QNNExecutionProvider",
             "openvino": "OpenVINOExecutionProvider", "xnnpack": "XnnpackExecutionProvider",
             "nnapi": "NnapiExecutionProvider", "webgpu": "WebGpuExecutionProvider"}
_ON_DEVICE = {"cuda", "rocm"}  # providers whose memory the state can stay in between steps


def devices() -> list[str]:
    have = set(available_providers())
    return [short for short, provider in PROVIDERS.items() if provider in have]


def provider_for(device: str) -> tuple[str, int]:
    kind, _, index = device.lower().partition(":")
    provider = PROVIDERS.get(kind)
    if provider is None:
        raise BackendError(f"unknown --device '{device}' for onnxruntime; choose one of {', '.join(PROVIDERS)}.")
    if provider not in available_providers():
        raise BackendError(f"--device {device} needs onnxruntime's {provider}, which this install lacks (it has "
                           f"{', '.join(available_providers())}); install the matching onnxruntime build "
                           "(e.g. onnxruntime-gpu) or use --device cpu.")
    return provider, int(index or 0)


def create(bundle, graphs, device: str, threads: int | None, training: bool) -> "OnnxRuntimeEngine":
    return OnnxRuntimeEngine(bundle, graphs, device, threads, training)


class OnnxRuntimeEngine:
    name = "onnxruntime"

    def __init__(self, bundle, graphs, device: str = "cpu", threads: int | None = None, training: bool = True):
        ort = onnxruntime_module()
        provider, index = provider_for(device)
        manifest = bundle.manifest
        self.device, self.manifest, self._ort = device, manifest, ort
        providers = [(provider, {"device_id": index})] if provider != "CPUExecutionProvider" else []
        providers.append("CPUExecutionProvider")
        options = session_options(threads)
        # the verified bytes, never the path: what was hashed is what runs
        self._forward = ort.InferenceSession(bundle.read_graph(graphs.forward), options, providers=providers)
        self._step = ort.InferenceSession(bundle.read_graph(graphs.train_step), options, providers=providers) \
            if training else None
        release_freed()  # the graphs' parsed copies
        kind = device.lower().partition(":")[0]
        self._where = (kind, index) if kind in _ON_DEVICE else ("cpu", 0)
        self._state_names = list(manifest.portable.state)
        # parameters and moments in two engine-owned sets, outside the session's arena: a step reads one and writes
        # the other, then they swap, so the arena holds only a step's transient tensors
        self._values: dict = {}
        self._spare: dict = {}
        self._statistics: dict = {}  # {"bn_stats": OrtValue} when the graphs take BN statistics
        self._t = 0
        self._accumulates = graphs.accumulates
        self._sums: list = []  # the two buffers the weighted gradient sum alternates between
        self._pending = None  # the weighted gradient of this step's earlier micro-batches (one of _sums)
        self._no_sum = self._ortvalue(np.zeros(1, np.float32)) if self._accumulates else None

    def _ortvalue(self, array: np.ndarray):
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), *self._where)

    def _buffer(self, shape, dtype):
        return self._ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, *self._where)

    def load(self, state: TrainState) -> None:
        moments, self._t = optimizer_vectors(state, self._state_names[1:])
        arrays = {"params": state.params, **moments}
        # copies: the set a step writes into is the engine's own, never the caller's arrays
        self._values = {name: self._ortvalue(np.array(value)) for name, value in arrays.items()}
        self._spare = self._spare or {name: self._buffer(value.shape, value.dtype) for name, value in arrays.items()}
        statistics = state.statistics
        self._statistics = {STATISTICS_INPUT: self._ortvalue(np.array(statistics))} if statistics is not None else {}
        self._pending = None

    def state(self) -> TrainState:
        optimizer = {name: self._values[name].numpy().copy() for name in self._state_names[1:]}
        optimizer["step"] = np.asarray(self._t, np.int64)
        statistics = self._statistics[STATISTICS_INPUT].numpy().copy() if self._statistics else None
        return TrainState(self._values["params"].numpy().copy(), optimizer, statistics=statistics)

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float, share: float = 1.0) -> tuple[float, np.ndarray]:
        outputs = self._run_step(x, y, lr, share, update=True)
        loss, logits = float(outputs[0].numpy()), outputs[1].numpy()
        if math.isfinite(loss):
            self._values, self._spare = self._spare, self._values
            self._t += 1
            self._pending = None
        return loss, logits

    def accumulate(self, x: np.ndarray, y: np.ndarray, share: float) -> tuple[float, np.ndarray]:
        outputs = self._run_step(x, y, 0.0, share, update=False)
        loss, logits = float(outputs[0].numpy()), outputs[1].numpy()
        if math.isfinite(loss):
            self._pending = self._next_sum()  # the buffer this run wrote
        return loss, logits

    def _run_step(self, x: np.ndarray, y: np.ndarray, lr: float, share: float, update: bool) -> list:
        check_share(self._accumulates, share, update)
        binding = self._step.io_binding()
        binding.bind_cpu_input(self._step.get_inputs()[0].name, as_model_input(x))
        binding.bind_cpu_input("labels", np.ascontiguousarray(y))
        binding.bind_cpu_input("lr", np.asarray(lr, np.float32))
        binding.bind_cpu_input("step", np.asarray(self._t + 1, np.int64))
        for name in self._state_names:
            binding.bind_ortvalue_input(name, self._values[name])
        self._bind_statistics(binding, self._step)
        binding.bind_output("loss", "cpu")
        binding.bind_output(self.manifest.output_name, "cpu")
        if self._accumulates:
            binding.bind_ortvalue_input(GRAD_SUM, self._pending or self._no_sum)
            binding.bind_cpu_input(GRAD_SHARE, np.asarray(share, np.float32))
        if not update:
            binding.bind_ortvalue_output(f"{GRAD_SUM}.new", self._next_sum())
        for name in self._state_names if update else ():
            binding.bind_ortvalue_output(f"{name}.new", self._spare[name])
        self._step.run_with_iobinding(binding)
        return binding.get_outputs()

    def _next_sum(self):
        """The gradient-sum buffer the next micro-batch writes: the one that is not the pending sum."""
        if not self._sums:
            params = self._values["params"]
            self._sums = [self._buffer(params.shape(), np.float32) for _ in range(2)]
        return self._sums[1] if self._pending is self._sums[0] else self._sums[0]

    def logits(self, x: np.ndarray) -> np.ndarray:
        binding = self._forward.io_binding()
        binding.bind_cpu_input(self._forward.get_inputs()[0].name, as_model_input(x))
        binding.bind_ortvalue_input("params", self._values["params"])
        self._bind_statistics(binding, self._forward)
        binding.bind_output(self.manifest.output_name, "cpu")
        self._forward.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def _bind_statistics(self, binding, session) -> None:
        """BN statistics go to the graphs that read them (a head's suffix has no BN)."""
        wanted = {i.name for i in session.get_inputs()}
        for name, value in self._statistics.items():
            if name in wanted:
                binding.bind_ortvalue_input(name, value)

    def eval_step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        logits = self.logits(x)
        return mean_loss(self.manifest.loss, logits, y), logits
