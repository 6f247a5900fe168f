"""The host's whole chain through the CLI with whatever Python, onnx and onnxruntime this venv has (CI runs it on
the plain Python 3.13 host too, without the ORT training plugin): export the real ImageNet MobileNetV2 with `head`
and `full`, train it on real photos, deploy it, and check the deployed model against torch holding the trained
parameters."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli, torch_input
from edgeadapt.toolchain.demo import TEXTURES, write_texture_dataset

pytestmark = [pytest.mark.slow, pytest.mark.plain_host]
SIZE = 96


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    root = tmp_path_factory.mktemp("textures")
    write_texture_dataset(root, train_per_class=12, test_per_class=4)
    return root


def _trained_torch_model(bundle, manifest: dict):
    """torch's MobileNetV2 with the bundle's (exported seed's) head, its trainable tensors set from the state file."""
    import torch

    from edgeadapt.runtime.state import decode_safetensors
    from edgeadapt.toolchain.build import HeadRequest, build_zoo_model

    torch.manual_seed(0)
    model = build_zoo_model("mobilenet_v2", HeadRequest(labels=TEXTURES), "imagenet").module.eval()
    tensors, _ = decode_safetensors((bundle / "state.safetensors").read_bytes(), "state.safetensors")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in manifest["trainable"]:
            params[name].copy_(torch.from_numpy(np.array(tensors[f"params/{name}"])))
    return model


@pytest.mark.parametrize("preset", ["head", "full"])
def test_mobilenet_v2_exports_trains_and_deploys(tmp_path, textures, preset):
    import onnxruntime
    import torch
    from PIL import Image

    from edgeadapt.runtime.bundle import Bundle
    from edgeadapt.runtime.data import preprocess

    bundle = tmp_path / "bundle"
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(TEXTURES) + "\n")
    exported = run_cli("export", "mobilenet_v2", "--labels", labels, "--trainable", preset, "--input-size", SIZE,
                       "--out", bundle)
    assert exported.returncode == 0, exported.stderr
    assert "validated against torch" in exported.stdout
    start = json.loads((bundle / "manifest.json").read_text())
    assert start["weights"] == "imagenet"  # the zoo's pretrained weights without asking
    trained = run_cli("train", bundle, textures / "train", "--epochs", "2", "--batch-size", "16", "--quiet")
    assert trained.returncode == 0, trained.stderr
    deployed = run_cli("deploy", bundle, "--format", "onnx", "--out", tmp_path / "model.onnx")
    assert deployed.returncode == 0, deployed.stderr

    manifest = Bundle.open(bundle).manifest
    files = sorted((textures / "test").rglob("*.png"))
    images = np.stack([np.array(Image.open(f).convert("RGB").resize((SIZE, SIZE))) for f in files])
    x = preprocess(images, manifest, True)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        reference = _trained_torch_model(bundle, start)(torch_input(x)).numpy()
    assert np.abs(logits - reference).max() < 1e-3 * max(1.0, np.abs(reference).max())
    truth = np.array([TEXTURES.index(f.parent.name) for f in files])
    assert np.mean(logits.argmax(1) == truth) >= 0.75  # four textures, ImageNet features: well above chance
