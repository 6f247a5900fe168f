"""The engines agree: the portable training step (onnxruntime, OpenVINO) and ONNX Runtime training's artifacts
train every zoo backbone and preset to the same loss and parameters, from the same state file."""

from __future__ import annotations

import numpy as np
import pytest

from edgeadapt.models.registry import backbone_names
from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.engines import available, open_engine
from edgeadapt.runtime.state import load_state
from edgeadapt.toolchain.build import HeadRequest

PRESETS = ("head", "last:2", "bias", "full", "scratch")
STEPS = 20
TINY = ("tiny_cnn", "tiny_mlp")


def fixed_batch(manifest, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Real images (scikit-learn's digits), resized and normalised as the bundle's input, with their labels."""
    from sklearn.datasets import load_digits

    from edgeadapt.runtime.data import preprocess

    digits = load_digits()
    if manifest.input.layout == "NC":
        return (digits.data[:size] / 16).astype(np.float32), digits.target[:size] % len(manifest.labels)
    images = (digits.images[:size] * 255 / 16).astype(np.uint8)
    from PIL import Image

    side = manifest.input.resize
    resized = np.stack([np.array(Image.fromarray(im).resize(side[::-1]).convert(manifest.input.channels))
                        for im in images])
    return preprocess(resized, manifest, True), digits.target[:size] % len(manifest.labels)


def trajectory(bundle: Bundle, engine: str, lr: float) -> tuple[np.ndarray, np.ndarray]:
    opened = open_engine(bundle, bundle.graphs(), engine)
    opened.load(load_state(bundle.state_path, bundle.manifest, bundle.bundle_id))
    x, y = fixed_batch(bundle.manifest)
    losses = [opened.train_step(x, y, lr)[0] for _ in range(STEPS)]
    return np.array(losses), opened.state().params


def _cases():
    for name in backbone_names():
        for preset in PRESETS if name != "tiny_mlp" else ("head", "full", "bias"):
            marks = () if name in TINY else (pytest.mark.slow,)
            yield pytest.param(name, preset, id=f"{name}-{preset}", marks=marks)


@pytest.mark.parametrize("optimizer,lr", [("sgd", 1e-3), ("adamw", 1e-4)])
@pytest.mark.parametrize("backbone,preset", list(_cases()))
def test_portable_step_matches_ort_training(bundle_factory, backbone, preset, optimizer, lr):
    size = None if backbone == "tiny_mlp" else (32,)
    path = bundle_factory(backbone, preset, input_size=size, validate=False, optimizer=optimizer,
                          head=HeadRequest(num_classes=5))
    bundle = Bundle.open(path)
    reference_loss, reference = trajectory(bundle, "ort-training", lr)
    for engine in ("onnxruntime", "openvino"):
        losses, params = trajectory(bundle, engine, lr)
        loss_error = float(np.max(np.abs(losses - reference_loss) / np.abs(reference_loss)))
        errors = {p.name: float(np.linalg.norm(params[p.offset:p.offset + p.size] - reference[p.offset:p.offset + p.size])
                  / max(np.linalg.norm(reference[p.offset:p.offset + p.size]), 1e-12)) for p in bundle.manifest.portable.layout}
        worst = max(errors, key=errors.get)
        print("\nPARITY", backbone, preset, optimizer, engine, f"loss {loss_error:.1e}", f"worst param {worst} {errors[worst]:.1e}")
        assert loss_error < 1e-4
        assert errors[worst] < 1e-4
