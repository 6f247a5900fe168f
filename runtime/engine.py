"""The only module that talks to `onnxruntime.training`: a facade over ORT's Module, Optimizer and CheckpointState.

`onnxruntime/training/__init__.py` imports torch (ORT issue #22070): ~3 s and ~310 MB when torch is present and an
ImportError when it is not. We load `onnxruntime.training.api` under a bare parent package instead, which needs
only the compiled core (~0.2 s, ~42 MB). If the engine changes, this file changes.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import numpy as np

from edgeadapt.runtime.errors import BackendError, BundleError


def training_api() -> types.ModuleType:
    """`onnxruntime.training.api` without running the torch-importing package `__init__`."""
    if "onnxruntime.training.api" in sys.modules:
        return sys.modules["onnxruntime.training.api"]
    import onnxruntime

    if "onnxruntime.training" in sys.modules:  # the host already imported the full package
        return importlib.import_module("onnxruntime.training.api")
    bare = types.ModuleType("onnxruntime.training")
    bare.__path__ = [str(Path(onnxruntime.__file__).parent / "training")]
    sys.modules["onnxruntime.training"] = bare
    try:
        return importlib.import_module("onnxruntime.training.api")
    except ImportError as exc:
        raise BackendError(f"onnxruntime-training is not installed ({exc}); "
                           "install edgeadapt with `pip install edgeadapt` on the device.") from None
    finally:
        sys.modules.pop("onnxruntime.training", None)


def available_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def _device_name(device: str) -> str:
    if device == "cpu":
        return "cpu"
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available_providers():
            raise BackendError("--device cuda needs onnxruntime's GPU training build (onnxruntime-training with CUDA, "
                               "as on a Jetson); this install has only " + ", ".join(available_providers())
                               + ". Use --device cpu.")
        return device
    raise BackendError(f"unknown device '{device}'; use cpu or cuda.")


class Engine:
    """One training session over a bundle's graphs and a checkpoint file."""

    def __init__(self, bundle_dir: Path, checkpoint: Path, device: str = "cpu", threads: int | None = None,
                 with_optimizer: bool = True):
        api = training_api()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        bundle_dir = Path(bundle_dir)
        self.state = self._load_state(api, checkpoint)
        self.module = api.Module(str(bundle_dir / "training_model.onnx"), self.state,
                                 str(bundle_dir / "eval_model.onnx"), device=_device_name(device),
                                 session_options=options)
        self.optimizer = api.Optimizer(str(bundle_dir / "optimizer_model.onnx"), self.module) if with_optimizer \
            else None

    @staticmethod
    def without_optimizer_state(checkpoint: Path, target: Path) -> None:
        """Copy `checkpoint` to `target` with parameters and properties only (a fresh optimizer starts from it)."""
        api = training_api()
        api.CheckpointState.save_checkpoint(Engine._load_state(api, checkpoint), str(target),
                                            include_optimizer_state=False)

    @staticmethod
    def read_properties(checkpoint: Path) -> dict:
        state = Engine._load_state(training_api(), checkpoint)
        return {key: state.properties[key] for key in state.properties}

    @staticmethod
    def rewrite_properties(checkpoint: Path, target: Path, values: dict) -> None:
        api = training_api()
        state = Engine._load_state(api, checkpoint)
        for key, value in values.items():
            state.properties[key] = value
        api.CheckpointState.save_checkpoint(state, str(target), include_optimizer_state=False)

    @staticmethod
    def _load_state(api, checkpoint: Path):
        try:
            return api.CheckpointState.load_checkpoint(str(checkpoint))
        except Exception as exc:  # ORT raises its own Fail/RuntimeError types
            raise BundleError(f"checkpoint {checkpoint} cannot be loaded ({str(exc).splitlines()[0][:120]}); "
                              "it is truncated or corrupt: restore it from the bundle's last good copy or re-export.") \
                from None

    def train_batch(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """Forward + backward (gradients accumulate); call `apply_update` or `discard_gradients` next."""
        self.module.train()
        loss, logits = self.module(x, y)
        return float(loss), logits

    def apply_update(self) -> None:
        self.optimizer.step()
        self.module.lazy_reset_grad()

    def discard_gradients(self) -> None:
        self.module.lazy_reset_grad()

    def forward_backward(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, dict[str, np.ndarray]]:
        """One forward and backward pass without an optimizer step; returns (loss, logits, gradients)."""
        self.module.train()
        self.module.lazy_reset_grad()
        loss, logits = self.module(x, y)
        grads = {name: np.array(p.grad) for name, p in self.state.parameters if p.requires_grad}
        return float(loss), logits, grads

    def eval_step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        self.module.eval()
        loss, logits = self.module(x, y)
        return float(loss), logits

    def set_learning_rate(self, lr: float) -> None:
        self.optimizer.set_learning_rate(float(lr))

    def parameter(self, name: str) -> np.ndarray:
        return np.array(self.state.parameters[name].data)

    def parameter_names(self) -> list[str]:
        return [name for name, _ in self.state.parameters]

    def set_properties(self, values: dict) -> None:
        for key, value in values.items():
            self.state.properties[key] = value

    def properties(self) -> dict:
        props = self.state.properties
        return {key: props[key] for key in props}

    def save(self, path: Path, include_optimizer: bool = True) -> None:
        training_api().CheckpointState.save_checkpoint(self.state, str(path), include_optimizer_state=include_optimizer)

    def export_inference(self, path: Path, output_names: list[str]) -> None:
        self.module.export_model_for_inferencing(str(path), output_names)

