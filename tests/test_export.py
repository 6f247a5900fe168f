"""Export is driven by the registry: every backbone and preset exports, validates against torch, and yields a
bundle whose training and eval graphs compute the same function."""

import json

import numpy as np
import onnx
import pytest

from edgeadapt.models.registry import backbone_names, get_entry
from edgeadapt.runtime.engine import Engine
from edgeadapt.toolchain.build import HeadRequest
from edgeadapt.toolchain.validate import GRAD_TOLERANCE

PRESETS = ["head", "full", "last:2", "bias", "scratch"]
SMALL_INPUT = {"mobilenet_v2": (64,), "mobilenet_v3_small": (64,), "resnet18": (64,), "efficientnet_lite0": (64,)}


def _bundle(bundle_factory, backbone, preset):
    return bundle_factory(backbone, preset, input_size=SMALL_INPUT.get(backbone))


@pytest.mark.parametrize("backbone", backbone_names())
def test_every_backbone_exports_and_matches_torch(bundle_factory, backbone):
    manifest = json.loads((_bundle(bundle_factory, backbone, "full") / "manifest.json").read_text())
    validation = manifest["validation"]
    assert validation["eval_max_abs_diff"] <= 1e-4
    assert validation["loss_rel_diff"] <= 1e-4
    assert validation["grad_max_rel_diff"] <= GRAD_TOLERANCE


@pytest.mark.parametrize("backbone", backbone_names())
def test_spec_matches_module(backbone):
    entry = get_entry(backbone)
    module = entry.factory(7)
    names = [n for n, _ in module.named_parameters()]
    assert module.get_submodule(entry.spec.head)
    for block in entry.spec.blocks:
        assert any(n.startswith(block + ".") for n in names), block
    assert len(entry.spec.mean) == len(entry.spec.std)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("backbone", ["tiny_cnn", "tiny_mlp"])
def test_every_initializer_is_trainable_or_frozen_exactly_once(bundle_factory, backbone, preset):
    bundle = _bundle(bundle_factory, backbone, preset)
    manifest = json.loads((bundle / "manifest.json").read_text())
    lists = manifest["trainable"] + manifest["frozen"] + manifest["buffers"]
    assert len(lists) == len(set(lists))
    graph = onnx.load(str(bundle / "eval_model.onnx"))
    graph_params = {i.name for i in graph.graph.input} | {i.name for i in graph.graph.initializer}
    assert set(lists) <= graph_params
    params = dict(get_entry(backbone).factory(10).named_parameters())
    assert set(manifest["trainable"]) | set(manifest["frozen"]) == set(params)
    assert manifest["trainable_params"] + manifest["frozen_params"] == sum(p.numel() for p in params.values())


def _fixed_batch(manifest, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal([batch, *manifest["input"]["shape"][1:]]).astype(np.float32)
    return x, rng.integers(0, len(manifest["labels"]), batch).astype(np.int64)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("backbone", ["tiny_cnn", "tiny_mlp"])
def test_train_and_eval_graphs_compute_the_same_function(bundle_factory, backbone, preset):
    bundle = _bundle(bundle_factory, backbone, preset)
    manifest = json.loads((bundle / "manifest.json").read_text())
    engine = Engine(bundle, bundle / "checkpoint")
    engine.set_learning_rate(1e-2)
    x, y = _fixed_batch(manifest)
    losses = []
    for _ in range(20):
        losses.append(engine.train_batch(x, y)[0])
        engine.apply_update()
    train_loss, _, _ = engine.forward_backward(x, y)
    eval_loss, _ = engine.eval_step(x, y)
    assert losses[-1] < losses[0]
    assert abs(train_loss - eval_loss) <= 1e-4


def test_ort_format_adds_mobile_models(bundle_factory):
    bundle = bundle_factory("tiny_cnn", "head", ort_format=True)
    names = {p.name for p in bundle.iterdir()}
    assert {"training_model.ort", "eval_model.ort", "optimizer_model.ort"} <= names
    assert "required_operators.config" in names


def test_custom_model_factory(bundle_factory, tmp_path):
    bundle = bundle_factory("tiny_cnn", "head")  # noqa: F841 - warms the cache like other tests
    from edgeadapt.models.registry import BackboneSpec
    from edgeadapt.toolchain.export import ExportOptions, export_bundle

    spec = BackboneSpec(name="user", input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, feature_dim=0,
                        head="classifier", blocks=())
    result = export_bundle(ExportOptions(out=tmp_path / "user", model="user_models:small_net",
                                         head=HeadRequest(num_classes=3), trainable="head", user_spec=spec))
    assert result.manifest.trainable == ["classifier.weight", "classifier.bias"]
    assert result.validation.eval_max_abs_diff <= 1e-4


@pytest.fixture(scope="module")
def mobilenet_onnx(tmp_path_factory):
    """A user's own ONNX file: torch's default export of MobileNetV2 with BN nodes kept and a fixed batch of 1."""
    import torch

    from edgeadapt.models.registry import get_entry

    path = tmp_path_factory.mktemp("onnx") / "user_model.onnx"
    torch.manual_seed(0)
    model = get_entry("mobilenet_v2").factory(6).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial statistics, as in a trained model
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), str(path), input_names=["image"], opset_version=17,
                      dynamo=False, do_constant_folding=False)
    assert any(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)
    return path


@pytest.mark.parametrize("mode, preset", [("keep", "full"), ("keep", "head"), ("feature", "bias")])
def test_onnx_source(mobilenet_onnx, tmp_path, mode, preset):
    from edgeadapt.toolchain.export import ExportOptions, export_bundle

    head = {"keep": dict(head=HeadRequest(keep_head=True), head_params=("classifier.1.weight", "classifier.1.bias")),
            "feature": dict(head=HeadRequest(num_classes=3), feature_output="/GlobalAveragePool_output_0")}[mode]
    result = export_bundle(ExportOptions(out=tmp_path / "b", onnx=mobilenet_onnx, trainable=preset, **head))
    graph = onnx.load(str(tmp_path / "b" / "training_model.onnx"))
    assert not any("BatchNorm" in n.op_type for n in graph.graph.node)
    assert result.validation.eval_max_abs_diff <= 1e-4 and result.validation.loss_rel_diff <= 1e-4
    engine = Engine(tmp_path / "b", tmp_path / "b" / "checkpoint")
    x = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    y = np.arange(4) % len(result.manifest.labels)
    first = engine.train_batch(x, y)[0]
    engine.apply_update()
    for _ in range(10):
        engine.train_batch(x, y)
        engine.apply_update()
    assert engine.eval_step(x, y)[0] < first
