"""The engines agree: the portable training step (onnxruntime, OpenVINO) and ONNX Runtime training's artifacts
train every zoo backbone and preset to the same loss and parameters, from the same state file."""

from __future__ import annotations

import numpy as np
import pytest

from edgeadapt.models.registry import backbone_names
from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.engines import available, open_engine
from edgeadapt.toolchain.build import HeadRequest

PRESETS = ("head", "last:2", "bias", "full", "scratch")
STEPS = 20
TINY = ("tiny_cnn", "tiny_mlp")
PRETRAINED = ("mobilenet_v2", "efficientnet_lite0")  # ImageNet weights available offline


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


def trajectory(bundle: Bundle, engine: str, lr: float, steps: int = STEPS) -> tuple[np.ndarray, np.ndarray]:
    opened = open_engine(bundle, bundle.graphs(), engine)
    opened.load(bundle.load_state())
    x, y = fixed_batch(bundle.manifest)
    losses = [opened.train_step(x, y, lr)[0] for _ in range(steps)]
    return np.array(losses), opened.state().params


def per_tensor_error(bundle: Bundle, params: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    return {p.name: float(np.linalg.norm(params[p.offset:p.offset + p.size] - reference[p.offset:p.offset + p.size])
                          / max(np.linalg.norm(reference[p.offset:p.offset + p.size]), 1e-12))
            for p in bundle.manifest.portable.layout}


def _export(bundle_factory, backbone: str, preset: str, optimizer: str) -> Bundle:
    pretrained = "imagenet" if backbone in PRETRAINED else None
    return Bundle.open(bundle_factory(backbone, preset, input_size=None if backbone == "tiny_mlp" else (32,),
                                      validate=False, optimizer=optimizer, weights=pretrained, split=False,
                                      head=HeadRequest(num_classes=5)))


def _cases(presets=PRESETS):
    for name in backbone_names():
        for preset in presets if name != "tiny_mlp" else [p for p in presets if p in ("head", "full", "bias")]:
            marks = () if name in TINY else (pytest.mark.slow,)
            yield pytest.param(name, preset, id=f"{name}-{preset}", marks=marks)


ENGINES = [e for e in ("onnxruntime", "openvino") if e in available()]


def fp32_noise(bundle: Bundle, backbone: str, preset: str) -> dict[str, float]:
    """Per tensor, how far PyTorch's own fp32 gradient is from its float64 one on the fixed batch: the rounding
    floor that any two fp32 implementations share (a randomly initialised MobileNetV3 has gradients of norm ~3000
    and a floor of ~1.6e-4)."""
    import torch

    from edgeadapt.toolchain.export import ExportOptions, build

    pretrained = "imagenet" if backbone in PRETRAINED else None
    options = ExportOptions(out=None, backbone=backbone, head=HeadRequest(num_classes=5), trainable=preset,
                            weights=pretrained, input_size=None if backbone == "tiny_mlp" else (32,))
    x, y = fixed_batch(bundle.manifest)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        model = build(options).module.to(dtype).eval()
        torch.nn.functional.cross_entropy(model(torch.from_numpy(x).to(dtype)), torch.from_numpy(y).long()).backward()
        grads[dtype] = {n: p.grad.double().numpy() for n, p in model.named_parameters() if p.grad is not None}
    return {n: float(np.linalg.norm(grads[torch.float32][n] - grads[torch.float64][n]) /
                     max(np.linalg.norm(grads[torch.float64][n]), 1e-30)) for n in bundle.manifest.trainable}


@pytest.mark.parametrize("backbone,preset", list(_cases()))
def test_gradients_match_ort_training(bundle_factory, backbone, preset):
    """One SGD step at lr 1: the update is the gradient, tensor by tensor, for every backbone and preset: within
    1e-4, or within three times PyTorch's own fp32 rounding where that is larger: two fp32 implementations are each
    about one floor from the truth, and OpenVINO folds the BN statistics (a graph input since AdaBN) into the
    weights with its own arithmetic: weights an ulp apart, which a random-init MobileNetV3 amplifies to ~2e-4."""
    bundle = _export(bundle_factory, backbone, preset, "sgd")
    start = bundle.load_state().params
    reference_loss, reference = trajectory(bundle, "ort-training", 1.0, steps=1)
    noise = fp32_noise(bundle, backbone, preset)
    for engine in ENGINES:
        loss, params = trajectory(bundle, engine, 1.0, steps=1)
        assert abs(loss[0] - reference_loss[0]) <= 1e-4 * abs(reference_loss[0])
        errors = per_tensor_error(bundle, start - params, start - reference)
        over = {n: e for n, e in errors.items() if e > max(1e-4, 3 * noise[n])}
        assert not over, (engine, over, {n: noise[n] for n in over})


AMPLIFIED = pytest.mark.xfail(strict=False, reason="AdamW's update is about lr·sign(g): on a zero-initialised bias, "
                               "elements whose gradient sum cancels to rounding level can take opposite signs in two "
                               "fp32 implementations; the per-tensor error then grows with the steps")


def _trajectory_cases():
    """Head on every backbone with real weights (a randomly initialised MobileNetV3 or ResNet-18 has features of
    norm ~1e3: SGD on its head saturates the softmax within steps, and rounding then decides; their gradients are
    checked above), and every preset on the tiny models."""
    cases = [case for case in _cases(("head",)) if case.values[0] in PRETRAINED or case.values[0] in TINY]
    for backbone in TINY:
        for preset in PRESETS if backbone == "tiny_cnn" else ("full", "bias"):
            cases.append(pytest.param(backbone, preset, id=f"{backbone}-{preset}"))
    return cases


@pytest.mark.parametrize("optimizer,lr", [("sgd", 1e-2), ("adamw", 1e-3)])
@pytest.mark.parametrize("backbone,preset", _trajectory_cases())
def test_twenty_steps_match_ort_training(bundle_factory, backbone, preset, optimizer, lr, request):
    """20 steps on a fixed batch: the loss at every step and every parameter tensor agree to 1e-4."""
    if (backbone, preset, optimizer) == ("tiny_cnn", "scratch", "adamw"):
        request.applymarker(AMPLIFIED)
    bundle = _export(bundle_factory, backbone, preset, optimizer)
    reference_loss, reference = trajectory(bundle, "ort-training", lr)
    for engine in ENGINES:
        losses, params = trajectory(bundle, engine, lr)
        assert np.max(np.abs(losses - reference_loss) / np.abs(reference_loss)) < 1e-4, engine
        errors = per_tensor_error(bundle, params, reference)
        assert max(errors.values()) < 1e-4, (engine, max(errors, key=errors.get), max(errors.values()))


def test_openvino_trains_to_the_loss_onnxruntime_reaches(bundle_factory, tmp_path, digit_image_npz):
    """Whole runs through the trainer (data, shuffling, schedule, validation) on both portable engines."""
    import shutil

    from edgeadapt.runtime.trainer import TrainConfig, Trainer

    if "openvino" not in available():
        pytest.skip("OpenVINO is not installed")
    finals = {}
    for engine in ("onnxruntime", "openvino"):
        bundle = tmp_path / engine
        shutil.copytree(bundle_factory("tiny_cnn", "last:2", input_size=(16,)), bundle)
        summary = Trainer(bundle, TrainConfig(epochs=3, lr=3e-3, engine=engine, split="off")).fit(digit_image_npz)
        finals[engine] = (summary.final.train_loss, summary.final.val_loss)
    for mine, reference in zip(finals["openvino"], finals["onnxruntime"]):
        assert abs(mine - reference) <= 1e-3 * abs(reference)
