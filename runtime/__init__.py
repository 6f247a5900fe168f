"""Device side of edgeadapt: trains and runs bundles with numpy and a maintained engine (onnxruntime on any
execution provider, or OpenVINO); never torch or onnx. ONNX Runtime training is one optional legacy engine.

Public API (imported lazily by name): `Bundle`, `Trainer`, `evaluate`, `predict`, `deploy`.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "Bundle": "edgeadapt.runtime.bundle",
    "Manifest": "edgeadapt.runtime.manifest",
    "Trainer": "edgeadapt.runtime.trainer",
    "TrainConfig": "edgeadapt.runtime.trainer",
    "evaluate": "edgeadapt.runtime.inference",
    "predict": "edgeadapt.runtime.inference",
    "deploy": "edgeadapt.runtime.deploy",
    "load_dataset": "edgeadapt.runtime.data",
    "EdgeAdaptError": "edgeadapt.runtime.errors",
}


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(name)
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # wins over a same-named submodule (runtime.deploy) bound by the import
    return value
