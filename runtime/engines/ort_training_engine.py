"""Legacy engine: ONNX Runtime training's own artifacts (Module, Optimizer, CheckpointState). The only module
that talks to `onnxruntime.training`. Its wheel exists for x86_64 (and macOS arm64, Windows) on Python <= 3.11
only. The bundle's state file stays the source of truth: parameters are copied in and out, and ORT's own
checkpoint (which holds its optimizer state) travels inside the state file for an exact resume."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np

from edgeadapt.runtime.engines import check_share
from edgeadapt.runtime.errors import BackendError, BundleError
from edgeadapt.runtime.manifest import is_uniform
from edgeadapt.runtime.ort import available_providers, session_options, training_api
from edgeadapt.runtime.state import TrainState, digest, named_parameters

CHECKPOINT_KEY = "ort_checkpoint"
ARTIFACT_ROLES = ("ort_training", "ort_eval", "ort_optimizer", "ort_checkpoint")


def devices() -> list[str]:
    training_api()
    return ["cpu"] + (["cuda"] if "CUDAExecutionProvider" in available_providers() else [])


def create(bundle, graphs, device: str, threads: int | None, training: bool) -> "OrtTrainingEngine":
    training_api()  # a missing or broken plugin is the first thing to say
    _check_artifacts(bundle, graphs)
    if graphs.accumulates:
        raise BackendError("--accumulate trains through the portable step's accumulating graph, which the "
                           "ort-training engine does not run: use --engine onnxruntime or openvino.")
    if training and not is_uniform(bundle.manifest):
        groups = ", ".join(f"{g.name} ×{g.lr_scale:g} decay {g.weight_decay:g}" for g in bundle.manifest.param_groups)
        raise BackendError(f"this bundle trains parameter groups ({groups}), and ONNX Runtime training's optimizer "
                           "takes one rate and decay for all tensors: use --engine onnxruntime or openvino, or "
                           "export with --backbone-lr-ratio 1 --decay-norms.")
    return OrtTrainingEngine(bundle, graphs, device, threads)


def _check_artifacts(bundle, graphs) -> None:
    """The bundle must hold ORT training's files: exported with the plugin, and not packed for apps."""
    for role in ARTIFACT_ROLES:
        name = getattr(graphs, role)
        if name not in bundle.manifest.files:
            raise BackendError(f"{bundle.path} has no ONNX Runtime training artifacts ({name}; exported without "
                               "onnxruntime-training): use --engine onnxruntime or openvino.")
        if not bundle.has(name):
            raise BackendError(f"{bundle.path} lacks ONNX Runtime training's artifacts ({name}; it was packed for "
                               "apps): use --engine onnxruntime or openvino, or copy the full bundle.")


def _device_name(device: str) -> str:
    if device == "cpu":
        return "cpu"
    if device.startswith("cuda") and "CUDAExecutionProvider" in available_providers():
        return device
    raise BackendError(f"--device {device} is not available to the ort-training engine (providers: "
                       f"{', '.join(available_providers())}); use --engine onnxruntime or --device cpu.")


def _load_checkpoint(api, path: Path):
    try:
        return api.CheckpointState.load_checkpoint(str(path))
    except Exception as exc:  # ORT raises its own Fail/RuntimeError types
        raise BundleError(f"checkpoint {path} cannot be loaded ({str(exc).splitlines()[0][:120]}); it is truncated "
                          "or corrupt: re-export the bundle.") from None


def _private_copies(bundle, graphs, folder: Path) -> dict[str, Path]:
    """ORT training's API opens files by path: it gets private copies of the verified bytes, never the bundle's."""
    paths = {}
    for role in ARTIFACT_ROLES:
        name = getattr(graphs, role)
        data = bundle.read_graph(name) if name.endswith(".onnx") else bundle.read(name)
        paths[role] = folder / name
        paths[role].write_bytes(data)
    return paths


class OrtTrainingEngine:
    name = "ort-training"

    def __init__(self, bundle, graphs, device: str = "cpu", threads: int | None = None):
        self.api = training_api()
        self.device, self.manifest = device, bundle.manifest
        self._copies = tempfile.TemporaryDirectory(prefix="edgeadapt-ort-training-")
        self._paths = _private_copies(bundle, graphs, Path(self._copies.name))
        self._threads = threads
        self._device = _device_name(device)
        self.module = self.optimizer = self.checkpoint = None
        self._statistics: np.ndarray | None = None

    def _open(self, checkpoint: Path) -> None:
        self.checkpoint = _load_checkpoint(self.api, checkpoint)
        self.module = self.api.Module(str(self._paths["ort_training"]), self.checkpoint,
                                      str(self._paths["ort_eval"]), device=self._device,
                                      session_options=session_options(self._threads))
        self.optimizer = self.api.Optimizer(str(self._paths["ort_optimizer"]), self.module)

    def load(self, state: TrainState) -> None:
        self._check_statistics(state.statistics)
        self._statistics = state.statistics
        saved = state.optimizer.get(CHECKPOINT_KEY)
        if saved is None:
            self._open(self._paths["ort_checkpoint"])
            for name, value in named_parameters(state.params, self.manifest.portable.layout).items():
                self.checkpoint.parameters[name] = value
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "checkpoint"
            path.write_bytes(saved.tobytes())
            self._open(path)

    def state(self) -> TrainState:
        params = np.concatenate([np.asarray(self.checkpoint.parameters[p.name].data, np.float32).ravel()
                                 for p in self.manifest.portable.layout])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "checkpoint"
            self.api.CheckpointState.save_checkpoint(self.checkpoint, str(path), include_optimizer_state=True)
            saved = np.frombuffer(path.read_bytes(), np.uint8).copy()
            os.remove(path)
        return TrainState(params, {CHECKPOINT_KEY: saved}, statistics=self._statistics)

    def _check_statistics(self, statistics: np.ndarray | None) -> None:
        """ONNX Runtime training's artifacts hold the exported BN statistics folded in: re-estimated ones (AdaBN)
        need a portable engine."""
        exported = self.manifest.portable.statistics_sha256
        if statistics is not None and exported and digest(statistics) != exported:
            raise BackendError("this bundle's BN statistics were re-estimated (adapt-bn), and the ort-training "
                               "engine can only use the exported ones: use --engine onnxruntime or openvino.")

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float, share: float = 1.0) -> tuple[float, np.ndarray]:
        check_share(False, share, update=True)  # a whole batch: create() refused accumulation
        self.module.train()
        self.optimizer.set_learning_rate(float(lr))
        loss, logits = self.module(x, y)
        if math.isfinite(float(loss)):
            self.optimizer.step()
        self.module.lazy_reset_grad()
        return float(loss), logits

    def gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """One forward and backward pass without an update: the loss and each trainable parameter's gradient."""
        self.module.train()
        self.module.lazy_reset_grad()
        loss, _ = self.module(x, y)
        grads = {name: np.array(p.grad) for name, p in self.checkpoint.parameters if p.requires_grad}
        self.module.lazy_reset_grad()
        return float(loss), grads

    def eval_step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        self.module.eval()
        loss, logits = self.module(x, y)
        return float(loss), logits
