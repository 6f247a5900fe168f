"""The only module that talks to `onnxruntime.training`: a facade over ORT's Module, Optimizer and CheckpointState.

In the training wheel, `import onnxruntime` itself runs a build check that imports `onnxruntime.training.ortmodule`,
and `onnxruntime/training/__init__.py` imports onnx and torch (ORT issue #22070): ~2-3 s and ~280 MB when torch is
installed, an ImportError-guarded detour when it is not. We import the core with a bare `onnxruntime.training`
package and ORTModule blocked, then load `onnxruntime.training.api`, which needs only the compiled core
(~0.2 s, ~40 MB). If the engine changes, this file changes.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np

from edgeadapt.runtime.errors import BackendError, BundleError

_BARE = ("onnxruntime.training", "onnxruntime.training.ortmodule")


def onnxruntime_module() -> types.ModuleType:
    """`onnxruntime` without its torch-importing training package; loads `onnxruntime.training.api` on the way."""
    if "onnxruntime" in sys.modules and "onnxruntime.training.api" in sys.modules:
        return sys.modules["onnxruntime"]
    if "onnxruntime.training" in sys.modules:  # the host imported the full package already
        importlib.import_module("onnxruntime.training.api")
        return sys.modules["onnxruntime"]
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        raise BackendError("onnxruntime-training is not installed; `pip install edgeadapt` installs it.")
    bare = types.ModuleType("onnxruntime.training")
    bare.__path__ = [str(Path(spec.origin).parent / "training")]
    sys.modules["onnxruntime.training"] = bare
    sys.modules["onnxruntime.training.ortmodule"] = None  # ORT's build check reads this as "no ORTModule"
    try:
        import onnxruntime

        importlib.import_module("onnxruntime.training.api")
        return onnxruntime
    except ImportError as exc:
        raise BackendError(f"onnxruntime-training cannot be loaded ({exc}); reinstall edgeadapt.") from None
    finally:
        for name in _BARE:
            sys.modules.pop(name, None)


def training_api() -> types.ModuleType:
    onnxruntime_module()
    return sys.modules["onnxruntime.training.api"]


def available_providers() -> list[str]:
    return list(onnxruntime_module().get_available_providers())


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


_ARENA_REGISTERED = False


def _register_cpu_arena() -> None:
    """One process-wide CPU arena that grows by what is requested, not in power-of-two chunks: peak memory then
    follows the graph's needs (MobileNetV2 full, batch 8: 622 MB instead of 960 MB) and the planner can predict it."""
    global _ARENA_REGISTERED
    if _ARENA_REGISTERED:
        return
    ort = onnxruntime_module()
    same_as_requested = 1
    config = ort.OrtArenaCfg(0, same_as_requested, -1, -1)
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, config)
    _ARENA_REGISTERED = True


def session_options(threads: int | None = None):
    """Options for every edgeadapt session: the shared arena, and `threads` intra-op threads if given."""
    ort = onnxruntime_module()
    _register_cpu_arena()
    options = ort.SessionOptions()
    options.add_session_config_entry("session.use_env_allocators", "1")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


class Engine:
    """One training session over a bundle's graphs and a checkpoint file."""

    def __init__(self, bundle_dir: Path, checkpoint: Path, device: str = "cpu", threads: int | None = None,
                 with_optimizer: bool = True, graphs: str = ""):
        """`graphs` prefixes the standard file names: "suffix_" trains a split bundle's suffix."""
        api = training_api()
        options = session_options(threads)
        bundle_dir = Path(bundle_dir)
        self.state = self._load_state(api, checkpoint)
        self.module = api.Module(str(bundle_dir / f"{graphs}training_model.onnx"), self.state,
                                 str(bundle_dir / f"{graphs}eval_model.onnx"), device=_device_name(device),
                                 session_options=options)
        self.optimizer = api.Optimizer(str(bundle_dir / f"{graphs}optimizer_model.onnx"), self.module) \
            if with_optimizer else None

    @staticmethod
    def without_optimizer_state(checkpoint: Path, target: Path) -> None:
        """Copy `checkpoint` to `target` with parameters and properties only (a fresh optimizer starts from it)."""
        api = training_api()
        api.CheckpointState.save_checkpoint(Engine._load_state(api, checkpoint), str(target),
                                            include_optimizer_state=False)

    @staticmethod
    def read_properties(checkpoint: Path) -> dict:
        state = Engine._load_state(training_api(), checkpoint)
        return dict(iter(state.properties))

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

    @staticmethod
    def copy_parameters(source: Path, target: Path, destination: Path, properties: dict, bundle_dir: Path,
                        graphs: str = "") -> None:
        """Write `target`'s checkpoint with the values of the parameters both hold taken from `source` (a trained
        suffix into the whole-graph checkpoint, or back), plus `properties`, to `destination` (no optimizer
        state). `graphs` names the target's graphs: ORT sets parameter values only through a session."""
        api = training_api()
        trained, state = Engine._load_state(api, source), Engine._load_state(api, target)
        session = api.Module(str(Path(bundle_dir) / f"{graphs}training_model.onnx"), state,  # noqa: F841 (alive)
                             str(Path(bundle_dir) / f"{graphs}eval_model.onnx"))
        for name, parameter in trained.parameters:
            if name in state.parameters:
                state.parameters[name] = np.array(parameter.data)
        for key, value in properties.items():
            state.properties[key] = value
        api.CheckpointState.save_checkpoint(state, str(destination), include_optimizer_state=False)

    def set_properties(self, values: dict) -> None:
        for key, value in values.items():
            self.state.properties[key] = value

    def properties(self) -> dict:
        props = self.state.properties
        return dict(iter(props))

    def save(self, path: Path, include_optimizer: bool = True) -> None:
        training_api().CheckpointState.save_checkpoint(self.state, str(path), include_optimizer_state=include_optimizer)

    def export_inference(self, path: Path, output_names: list[str]) -> None:
        self.module.export_model_for_inferencing(str(path), output_names)

