"""Runs a split bundle's frozen prefix on a chosen backend: ONNX Runtime (CPU or an execution provider) or
OpenVINO (CPU, GPU, NPU). Training then needs only the suffix, on the CPU."""

from __future__ import annotations

import numpy as np

from edgeadapt.runtime.data import as_model_input
from edgeadapt.runtime.errors import BackendError, ConfigError
from edgeadapt.runtime.heap import release_freed
from edgeadapt.runtime.ort import available_providers, onnxruntime_module, session_options
from edgeadapt.runtime.ov import openvino_device, with_constant_input
from edgeadapt.runtime.state import STATISTICS_INPUT

PREFIX_BACKENDS = ("onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-qnn", "onnxruntime-nnapi",
                   "onnxruntime-xnnpack", "openvino-cpu", "openvino-gpu", "openvino-npu")
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "qnn": "QNNExecutionProvider",
              "nnapi": "NnapiExecutionProvider", "xnnpack": "XnnpackExecutionProvider"}


class PrefixRunner:
    """`runner(x)` → boundary features for preprocessed inputs `x`; `model`: the prefix's verified bytes (see
    `Bundle.read_graph`); `statistics`: the bundle's BN statistics, fed to a prefix that reads them (an INT8 prefix
    has them baked in)."""

    def __init__(self, model: bytes, backend: str = "onnxruntime-cpu", threads: int | None = None,
                 statistics: np.ndarray | None = None):
        if backend not in PREFIX_BACKENDS:
            raise ConfigError(f"unknown prefix backend '{backend}'; choose one of {', '.join(PREFIX_BACKENDS)}.")
        self.backend = backend
        engine, device = backend.split("-", 1)
        self._statistics = statistics
        self._run = self._openvino(model, device.upper(), threads) if engine == "openvino" else \
            self._onnxruntime(model, _PROVIDERS[device], threads)
        self._extra = {STATISTICS_INPUT: np.ascontiguousarray(statistics, np.float32)} \
            if statistics is not None and STATISTICS_INPUT in self._inputs else {}
        if STATISTICS_INPUT in self._inputs and not self._extra:
            raise ConfigError("the prefix reads BN statistics: give the bundle's (its state file) to run it.")
        release_freed()  # the graph's parsed copy

    def _onnxruntime(self, model: bytes, provider: str, threads: int | None):
        if provider not in available_providers():
            raise BackendError(f"ONNX Runtime's {provider} is not available here (available: "
                               f"{', '.join(available_providers())}); use --prefix-device onnxruntime-cpu.")
        session = onnxruntime_module().InferenceSession(model, session_options(threads), providers=[provider])
        self._inputs = [i.name for i in session.get_inputs()]
        return lambda x: session.run(None, {self._inputs[0]: x, **self._extra})[0]

    def _openvino(self, model: bytes, device: str, threads: int | None):
        config = {"INFERENCE_PRECISION_HINT": "f32"} if device == "CPU" else {}
        if threads and device == "CPU":
            config["INFERENCE_NUM_THREADS"] = threads
        core = openvino_device(device)
        graph = core.read_model(model)
        if self._statistics is not None:  # constants, folded into static weights (NPUs need them)
            graph = with_constant_input(graph, STATISTICS_INPUT, self._statistics)
        compiled = core.compile_model(graph, device, config)
        self._inputs = [port.get_any_name() for port in compiled.inputs]
        output = compiled.output(0)
        return lambda x: np.asarray(compiled({0: x, **self._extra})[output])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self._run(as_model_input(x)), dtype=np.float32)
