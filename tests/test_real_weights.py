"""End-to-end with the real ImageNet MobileNetV2 (torchvision's mobilenet_v2-b0353104.pth, resolved offline-first):
every preset loads in stock ONNX Runtime and learns, --keep-head recognises real photos as torch does, and the
runtime adapts it on real images with torch blocked."""

import json

import numpy as np
import pytest

from conftest import run_without_torch, torch_input
from edgeadapt.toolchain.build import HeadRequest

pytestmark = pytest.mark.slow
EXPECTED_TRAINABLE = {"head": 12_810, "full": 2_236_682, "scratch": 2_236_682, "last:2": None, "bias": None}


@pytest.fixture(scope="module")
def mobilenet(bundle_factory):
    def export(preset, **kwargs):
        kwargs.setdefault("head", HeadRequest(num_classes=10))
        return bundle_factory("mobilenet_v2", preset, weights="imagenet", **kwargs)
    return export


@pytest.mark.ort_training
@pytest.mark.parametrize("preset", list(EXPECTED_TRAINABLE))
def test_preset_trains_in_stock_onnxruntime(mobilenet, preset):
    from onnxruntime.training import api  # stock API, as any ORT client would use it

    bundle = mobilenet(preset)
    manifest = json.loads((bundle / "manifest.json").read_text())
    if EXPECTED_TRAINABLE[preset] is not None:
        assert manifest["trainable_params"] == EXPECTED_TRAINABLE[preset]
    assert manifest["trainable_params"] + manifest["frozen_params"] == 2_236_682
    state = api.CheckpointState.load_checkpoint(str(bundle / "checkpoint"))
    module = api.Module(str(bundle / "training_model.onnx"), state, str(bundle / "eval_model.onnx"))
    optimizer = api.Optimizer(str(bundle / "optimizer_model.onnx"), module)
    optimizer.set_learning_rate(1e-3 if preset in ("head", "bias", "scratch") else 1e-4)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 224, 224)).astype(np.float32)
    y = np.arange(4, dtype=np.int64)
    losses = []
    for _ in range(20):
        module.train()
        losses.append(float(module(x, y)[0]))
        optimizer.step()
        module.lazy_reset_grad()
    module.train()
    train_loss = float(module(x, y)[0])
    module.lazy_reset_grad()
    module.eval()
    eval_loss = float(module(x, y)[0])
    assert losses[-1] < losses[0] * 0.8
    assert abs(train_loss - eval_loss) <= 1e-4


def test_pretrained_gradients_match_torch_tightly(mobilenet):
    """The portable step on the real model: its SGD update at lr 1 is the gradient times the tensor's rate (the
    head 1, the pretrained backbone 0.1), which must match torch's float64 gradient per tensor to 1e-3 (pretrained
    weights: no kinks at rounding distance)."""
    import torch

    from edgeadapt.runtime.bundle import Bundle
    from edgeadapt.runtime.engines import open_engine
    from edgeadapt.toolchain.build import build_zoo_model

    bundle = Bundle.open(mobilenet("full", optimizer="sgd", input_size=(96,)))
    engine = open_engine(bundle, bundle.graphs(), "onnxruntime")
    start = bundle.load_state().params
    engine.load(bundle.load_state())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 96, 96)).astype(np.float32)
    y = np.arange(4, dtype=np.int64)
    engine.train_step(x, y, 1.0)
    gradient = start - engine.state().params
    torch.manual_seed(0)  # the export's seed: the same new head
    model = build_zoo_model("mobilenet_v2", HeadRequest(num_classes=10), "imagenet").module.double().eval()
    torch.nn.functional.cross_entropy(model(torch_input(x, torch.float64)), torch.from_numpy(y)).backward()
    grads = dict(model.named_parameters())
    for p in bundle.manifest.portable.layout:
        reference = grads[p.name].grad.numpy().ravel() * (1.0 if p.name.startswith("classifier.") else 0.1)
        mine = gradient[p.offset:p.offset + p.size]
        assert np.linalg.norm(mine - reference) / np.linalg.norm(reference) < 1e-3, p.name


def _photo(name):
    import skimage.data

    return getattr(skimage.data, name)()


def test_keep_head_recognises_photos_like_torch(mobilenet, tmp_path):
    import torch
    from PIL import Image

    from edgeadapt.runtime.bundle import Bundle
    from edgeadapt.runtime.data import decode_image, preprocess
    from edgeadapt.runtime.inference import predict
    from edgeadapt.toolchain.build import build_zoo_model

    bundle = mobilenet("head", head=HeadRequest(keep_head=True))
    manifest = Bundle.open(bundle).manifest
    files = []
    for name in ("chelsea", "coffee"):
        files.append(tmp_path / f"{name}.png")
        Image.fromarray(_photo(name)).save(files[-1])
    predictions = predict(bundle, files, top_k=3)
    model = build_zoo_model("mobilenet_v2", HeadRequest(keep_head=True), "imagenet").module
    for file, prediction, expected in zip(files, predictions, ("Egyptian cat", "espresso")):
        x = preprocess(decode_image(file, "RGB", (224, 224), manifest.input.crop)[None], manifest, True)
        with torch.no_grad():
            probs = torch.softmax(model(torch_input(x)), 1)[0].numpy()
        assert prediction.top[0]["label"] == expected
        assert prediction.top[0]["index"] == int(probs.argmax())
        assert prediction.top[0]["score"] == pytest.approx(float(probs.max()), abs=1e-4)


def test_runtime_adapts_real_model_on_real_images_without_torch(mobilenet, tmp_path):
    from edgeadapt.toolchain.demo import TEXTURES, write_texture_dataset

    write_texture_dataset(tmp_path / "data", train_per_class=24, test_per_class=12)
    bundle = mobilenet("head", head=HeadRequest(labels=TEXTURES))
    import shutil

    shutil.copytree(bundle, tmp_path / "bundle")
    result = run_without_torch(f"""
        import json
        from edgeadapt.runtime.inference import evaluate
        from edgeadapt.runtime.trainer import Trainer, TrainConfig
        bundle, data = {str(tmp_path / 'bundle')!r}, {str(tmp_path / 'data')!r}
        before = evaluate(bundle, data + "/test").accuracy
        Trainer(bundle, TrainConfig(epochs=2, batch_size=16, val_split=0.0)).fit(data + "/train")
        print(json.dumps({{"before": before, "after": evaluate(bundle, data + "/test").accuracy}}))
    """)
    assert result.returncode == 0, result.stderr
    accuracy = json.loads(result.stdout.strip().splitlines()[-1])
    assert accuracy["after"] >= 0.85 and accuracy["after"] > accuracy["before"] + 0.2
