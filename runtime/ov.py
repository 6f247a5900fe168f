"""Loading OpenVINO (an optional package: `pip install 'edgeadapt[openvino]'`), and its devices.

`import openvino` imports its model-conversion tool, whose telemetry writes a client id under ~/intel at once,
unasked; edgeadapt loads OpenVINO with the telemetry package blocked (every use of it in OpenVINO falls back to
its own no-op stub), so nothing is written outside the user's files."""

from __future__ import annotations

import sys
import types

from edgeadapt.runtime.errors import BackendError


def openvino_module() -> types.ModuleType:
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)
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


def with_constant_input(model, name: str, value):
    """`model` (an ov.Model) with its input `name` replaced by a constant holding `value`: OpenVINO then folds it
    at compile time, so BN statistics fold into static conv weights (what NPUs and fast CPU kernels need)."""
    import numpy as np

    opset = openvino_module().opset13
    for parameter in list(model.get_parameters()):
        if name in parameter.output(0).get_names():
            constant = opset.constant(np.ascontiguousarray(value, np.float32))
            parameter.output(0).replace(constant.output(0))
            model.remove_parameter(parameter)
    model.validate_nodes_and_infer_types()
    return model
