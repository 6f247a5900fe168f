"""Loading ONNX Runtime on a device: the maintained `onnxruntime` package (any build: CPU, GPU, QNN, …), or the
legacy training wheel, whose package `__init__` imports torch.

In the training wheel, `import onnxruntime` itself runs a build check that imports `onnxruntime.training.ortmodule`,
and `onnxruntime/training/__init__.py` imports onnx and torch (ORT issue #22070): ~2-3 s and ~280 MB when torch is
installed, an ImportError-guarded detour when it is not. We import the core with a bare `onnxruntime.training`
package and ORTModule blocked, then load `onnxruntime.training.api`, which needs only the compiled core
(~0.2 s, ~40 MB). With the maintained `onnxruntime` (no training package) this is a plain import.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

from edgeadapt.runtime.errors import BackendError

_BARE = ("onnxruntime.training", "onnxruntime.training.ortmodule")


def _training_dir() -> Path | None:
    spec = importlib.util.find_spec("onnxruntime")
    return None if spec is None or spec.origin is None else Path(spec.origin).parent / "training"


def onnxruntime_module() -> types.ModuleType:
    """`onnxruntime`, without the training wheel's torch-importing package (whose compiled API is loaded instead).
    Its telemetry is switched off before it loads: recent releases otherwise write a device id under
    ~/.cache/Microsoft at import, unasked (ORT_DISABLE_TELEMETRY, which a user may still set to 0)."""
    if "onnxruntime" in sys.modules:
        return sys.modules["onnxruntime"]
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    training = _training_dir()
    if training is None:
        raise BackendError("onnxruntime is not installed; `pip install edgeadapt` installs it.")
    if not training.is_dir():
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)  # warnings about graph rewrites are not the user's concern
        return onnxruntime
    bare = types.ModuleType("onnxruntime.training")
    bare.__path__ = [str(training)]
    sys.modules["onnxruntime.training"] = bare
    sys.modules["onnxruntime.training.ortmodule"] = None  # ORT's build check reads this as "no ORTModule"
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
        try:
            importlib.import_module("onnxruntime.training.api")
        except ImportError:
            pass  # a broken training install: the portable engines still run, training_api() says what to do
        return onnxruntime
    except ImportError as exc:
        raise BackendError(f"onnxruntime cannot be loaded ({exc}); reinstall edgeadapt.") from None
    finally:
        for name in _BARE:
            sys.modules.pop(name, None)


_OVERWRITTEN = ("onnxruntime-training cannot be loaded: onnxruntime's files were written over it (both were installed "
                "in one pip command); pip uninstall -y onnxruntime-training-cpu, then pip install it on its own.")


def training_api() -> types.ModuleType:
    """ONNX Runtime's training API (legacy engine), loaded without torch; refused when the compiled core lacks
    training (onnxruntime's files installed over the training wheel's)."""
    api = _training_package()
    from onnxruntime.capi import _pybind_state

    if not all(hasattr(_pybind_state, name) for name in ("CheckpointState", "Module", "load_checkpoint")):
        raise BackendError(_OVERWRITTEN)
    return api


def _training_package() -> types.ModuleType:
    onnxruntime_module()
    api = sys.modules.get("onnxruntime.training.api")
    if api is not None:
        return api
    if "onnxruntime.training" in sys.modules:  # the host imported the full package already
        try:
            return importlib.import_module("onnxruntime.training.api")
        except ImportError:
            raise BackendError(_OVERWRITTEN) from None
    training = _training_dir()
    if training is not None and training.is_dir():
        raise BackendError(_OVERWRITTEN)
    raise BackendError("the ort-training engine needs onnxruntime-training, which this install lacks (it exists for "
                       "x86_64 and Python <= 3.11 only); use --engine onnxruntime.")


def available_providers() -> list[str]:
    return list(onnxruntime_module().get_available_providers())


def session_options(threads: int | None = None):
    """Options for every edgeadapt session: no memory pattern (each session's own arena then holds what a run
    needs, not a planned block on top of it), and `threads` intra-op threads if given. With onnxruntime's
    defaults, or a process-wide arena shared by the sessions, 1.32 needed 1.6-1.9× 1.19.2's peak for the same step;
    without the pattern both agree within 3% (MobileNetV2 224 px, a step's peak RSS: full batch 8 568/564 MB and
    batch 32 1691/1658 MB on 1.32/1.19.2, against 978 and 3187 MB on 1.32 with the shared arena)."""
    ort = onnxruntime_module()
    options = ort.SessionOptions()
    options.enable_mem_pattern = False
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options
