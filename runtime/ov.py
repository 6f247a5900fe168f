"""Loading OpenVINO (an optional package: `pip install 'edgeadapt[openvino]'`), and its devices."""

from __future__ import annotations

import types

from edgeadapt.runtime.errors import BackendError


def openvino_module() -> types.ModuleType:
    try:
        import openvino  # optional and heavy: only where an OpenVINO path is used
    except ImportError:
        raise BackendError("OpenVINO is not installed; `pip install 'edgeadapt[openvino]'` (or use --engine "
                           "onnxruntime / --format onnx).") from None
    return openvino


def openvino_device(device: str):
    """An OpenVINO Core that has `device` (CPU, GPU, NPU, GPU.1, …)."""
    core = openvino_module().Core()
    if device not in core.available_devices:
        raise BackendError(f"OpenVINO device {device} is not present on this machine (available: "
                           f"{', '.join(core.available_devices)}); use --device CPU.")
    return core
