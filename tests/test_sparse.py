"""`--trainable sparse`: the selection respects its memory budget, channel-level selection is real in the graphs
(frozen channels get no gradient, no optimizer state and keep their exact values, on every engine), its gradients
match torch, and it works for `--model` factories. Tiny models at 32 px: budgets are the planner's MB."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from test_engines import fixed_batch

from conftest import run_cli, torch_input
from edgeadapt.devices.planner import RUNTIME_BASE_MB, planned_peak
from edgeadapt.models.registry import BackboneSpec, backbone_names
from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.deploy import inference_model
from edgeadapt.runtime.engines import open_engine
from edgeadapt.runtime.errors import ConfigError
from edgeadapt.runtime.trainer import TrainConfig, Trainer
from edgeadapt.toolchain.build import HeadRequest
from edgeadapt.toolchain.export import ExportOptions, build, export_bundle

LABELS = tuple(str(i) for i in range(10))
# tiny_cnn at 32 px, batch 32, over the runtime's own footprint: head + the last biases need up to ~1.7 MB, all of
# features.3 ~1.78 MB (from ~1.75 MB its conv trains part of its channels); more reaches back (all of it at ~3.4 MB).
BUDGETS = tuple(RUNTIME_BASE_MB + extra for extra in (1.5, 1.76, 3.0, 3.5))


def _export(out, budget, calibration, backbone="tiny_cnn", **extra):
    return export_bundle(ExportOptions(out=out, backbone=backbone, head=HeadRequest(labels=LABELS),
                                       trainable="sparse", budget_mb=budget, calibration=calibration, force=True,
                                       **extra))


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    from sklearn.datasets import load_digits

    digits = load_digits()
    path = tmp_path_factory.mktemp("calibration") / "digits.npz"
    np.savez(path, x=(digits.images[:300] * 255 / 16).astype(np.uint8), y=digits.target[:300].astype(str))
    return path


@pytest.fixture(scope="module")
def ladder(tmp_path_factory, calibration):
    root = tmp_path_factory.mktemp("sparse")
    return {budget: _export(root / f"b{budget}", budget, calibration) for budget in BUDGETS}


def _split_bundle(ladder):
    """The ladder's bundle with a conv split by channels."""
    for result in ladder.values():
        if any(n.endswith("@sel") for n in result.manifest.trainable):
            return result
    pytest.fail("no budget of the ladder split a conv by channels")


def test_trainable_set_and_planned_peak_respect_the_budget(ladder):
    full = build(ExportOptions(out=None, backbone="tiny_cnn", head=HeadRequest(labels=LABELS))).module
    sizes = {n: p.numel() for n, p in full.named_parameters()}
    previous = 0
    for budget, result in ladder.items():
        m = result.manifest
        bundle = Bundle.open(result.out)
        step = onnx.load(str(result.out / m.portable.train_step))  # the graph's own flat state, not the manifest's
        graph_params = next(i for i in step.graph.input if i.name == "params").type.tensor_type.shape.dim[0].dim_value
        assert graph_params == m.trainable_params
        assert planned_peak(m, 32, split=m.split is not None) <= budget + 1e-6
        assert m.sparse.budget_mb == budget and m.sparse.batch_size == 32
        # the head always trains; every trainable tensor is a parameter or a channel part of one
        assert {"classifier.weight", "classifier.bias"} <= set(m.trainable)
        originals = {n.split("@")[0] for n in m.trainable}
        assert originals <= set(sizes) and len(originals) < len(sizes)
        # the state holds exactly the trainable tensors, whose sizes add up to the manifest's count
        layout = {p.name: p.size for p in m.portable.layout}
        assert list(layout) == m.trainable and sum(layout.values()) == m.trainable_params
        assert m.trainable_params + m.frozen_params == sum(sizes.values())
        state = bundle.load_state()
        assert state.params.size == m.trainable_params
        assert m.trainable_params >= previous  # a larger budget never trains less
        previous = m.trainable_params
    assert ladder[BUDGETS[-1]].manifest.trainable_params > ladder[BUDGETS[0]].manifest.trainable_params


def test_channel_split_is_real_and_gradients_match_torch(ladder):
    result = _split_bundle(ladder)
    m = result.manifest
    split = next(n for n in m.trainable if n.endswith(".weight@sel") and n.count(".") > 1)
    weight = split.removesuffix("@sel")
    layer = next(layer for layer in m.sparse.layers if layer.name == weight)
    assert 0 < len(layer.channels) < layer.total_channels
    layout = {p.name: p.shape for p in m.portable.layout}
    assert layout[split][0] == len(layer.channels)  # the gradient and the moments cover the chosen channels only
    assert weight not in layout and weight + "@rest" not in layout and weight + "@rest" in m.frozen
    step = onnx.load(str(result.out / m.portable.train_step))
    convs = [n for n in step.graph.node if n.op_type == "Conv" and weight in n.name]
    assert len(convs) == 2  # the forward pass: the chosen half and the frozen half, each its own conv


def test_a_sparse_step_is_torchs_gradient_on_the_chosen_channels(ladder):
    """The gradient a channel-split bundle's step computes against torch's float64 gradient of the unsplit model,
    restricted to each part's channels: the split convs, their BN scales and shifts, and the whole tensors. The step
    is AdamW from a fresh state, whose first moment comes out as exactly (1 − β1)·g."""
    from conftest import ADAM_BETAS

    result = _split_bundle(ladder)
    m = result.manifest
    bundle = Bundle.open(result.out)
    x, y = fixed_batch(m)
    engine = open_engine(bundle, bundle.graphs(), "onnxruntime")
    engine.load(bundle.load_state())
    engine.train_step(x, y, 1e-3)
    update = engine.state().optimizer["adam_m"].astype(np.float64) / (1 - ADAM_BETAS[0])
    module = build(ExportOptions(out=None, backbone="tiny_cnn", head=HeadRequest(labels=LABELS))).module.double()
    torch.nn.functional.cross_entropy(module.eval()(torch_input(x, torch.float64)), torch.from_numpy(y)).backward()
    grads = {n: p.grad.numpy() for n, p in module.named_parameters()}
    channels = {}
    for layer in m.sparse.layers:
        if 0 < len(layer.channels) < layer.total_channels:
            bn = layer.name.rsplit(".", 2)[0] + ".1"
            for name in (layer.name, f"{bn}.weight", f"{bn}.bias"):
                channels[name] = np.asarray(layer.channels)
    for p in m.portable.layout:
        base, _, part = p.name.partition("@")
        expected = grads[base]
        if part:
            chosen = np.isin(np.arange(expected.shape[0]), channels[base])
            expected = expected[chosen if part == "sel" else ~chosen]
        mine = update[p.offset:p.offset + p.size]
        error = np.linalg.norm(mine - expected.ravel()) / max(np.linalg.norm(expected), 1e-12)
        assert error < 1e-3, (p.name, error)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_frozen_channels_keep_their_exact_values_through_training(ladder, digit_image_npz, tmp_path, engine):
    result = _split_bundle(ladder)
    path = tmp_path / "bundle"
    shutil.copytree(result.out, path)
    before = _conv_weights(Bundle.open(path))
    Trainer(path, TrainConfig(epochs=2, batch_size=32, val_split=0.0, engine=engine, lr=1e-2)).fit(digit_image_npz)
    after = _conv_weights(Bundle.open(path))
    frozen = [n for n in before if n.endswith("@rest")]
    chosen = [n for n in before if n.endswith("@sel")]
    assert frozen and chosen
    for name in frozen:
        assert np.array_equal(after[name], before[name]), name  # bit for bit
    assert all(not np.allclose(after[n], before[n]) for n in chosen)
    # and the frozen half is the pretrained model's own channels: W·γ/√(σ²+ε) of the torch model, channels `rest`
    module = build(ExportOptions(out=None, backbone="tiny_cnn", head=HeadRequest(labels=LABELS))).module
    sd = module.state_dict()
    for layer in result.manifest.sparse.layers:
        if not layer.channels or len(layer.channels) == layer.total_channels:
            continue
        rest = np.setdiff1d(np.arange(layer.total_channels), layer.channels)
        bn = layer.name.rsplit(".", 2)[0] + ".1"
        scale = sd[bn + ".weight"] / torch.sqrt(sd[bn + ".running_var"] + 1e-5)
        expected = (sd[layer.name] * scale.reshape(-1, 1, 1, 1)).numpy()[rest]
        np.testing.assert_allclose(after[layer.name + "@rest"], expected, rtol=1e-5, atol=1e-6)


def _conv_weights(bundle: Bundle) -> dict[str, np.ndarray]:
    """Each split conv's effective (BN-folded) weight in the deployed inference model, by half."""
    from onnx.reference import ReferenceEvaluator

    model = onnx.load_from_string(inference_model(bundle))
    values = {}
    for node in model.graph.node:
        if node.op_type == "Conv" and node.name.endswith(("@sel", "@rest")):
            tag = "@sel" if node.name.endswith("@sel") else "@rest"
            values[bundle.manifest.sparse and _weight_name(node, bundle) + tag] = _evaluate(model, node.input[1],
                                                                                          ReferenceEvaluator)
    return values


def _weight_name(node, bundle: Bundle) -> str:
    return next(layer.name for layer in bundle.manifest.sparse.layers if node.name.startswith(layer.name))


def _evaluate(model: onnx.ModelProto, tensor: str, evaluator) -> np.ndarray:
    """A tensor of the model computed from its constants alone (a weight, folded or not)."""
    for init in model.graph.initializer:
        if init.name == tensor:
            return numpy_helper.to_array(init)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend([onnx.helper.make_empty_tensor_value_info(tensor)])
    feed = {i.name: np.zeros([d.dim_value or 1 for d in i.type.tensor_type.shape.dim], np.float32)
            for i in probe.graph.input}
    return evaluator(probe).run(None, feed)[0]


def test_model_factory_and_cli(tmp_path, calibration):
    spec = BackboneSpec(name="user", input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, feature_dim=0,
                        head="classifier", blocks=())
    result = export_bundle(ExportOptions(out=tmp_path / "user", model="user_models:small_net", user_spec=spec,
                                         head=HeadRequest(labels=LABELS), trainable="sparse", budget_mb=200,
                                         calibration=calibration))
    assert "features.0.weight" in result.manifest.trainable or "features.0.weight@sel" in result.manifest.trainable
    module = build(ExportOptions(out=None, model="user_models:small_net", user_spec=spec,
                                 head=HeadRequest(labels=LABELS))).module  # the export's seed: the same new head
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    bundle = Bundle.open(result.out)
    engine = open_engine(bundle, bundle.graphs(), "onnxruntime", training=False)
    engine.load(bundle.load_state())
    with torch.no_grad():
        np.testing.assert_allclose(engine.logits(x), module.eval()(torch_input(x)).numpy(), atol=1e-4)
    shown = run_cli("inspect", result.out)
    assert shown.returncode == 0 and "budget at batch 32" in shown.stdout and "/param" in shown.stdout


@pytest.mark.parametrize("extra, message", [
    ({"calibration": None}, "needs --calibration"),
    ({"budget_mb": None}, "needs a memory budget"),
    ({"budget_mb": RUNTIME_BASE_MB - 5}, "not even the head"),
])
def test_user_errors_are_one_clear_line(tmp_path, calibration, extra, message):
    options = {"budget": RUNTIME_BASE_MB + 3, "calibration": calibration, **extra}
    options["budget"] = options.pop("budget_mb", options["budget"])
    with pytest.raises(ConfigError, match=message):
        _export(tmp_path / "b", **options)
    assert not (tmp_path / "b").exists()  # nothing half-written


def test_cli_refuses_sparse_without_calibration(tmp_path):
    done = run_cli("export", "tiny_cnn", "--out", tmp_path / "b", "--classes", "3", "--trainable", "sparse",
                   "--budget-mb", str(RUNTIME_BASE_MB + 3))
    assert done.returncode != 0 and "--calibration" in done.stderr and "Traceback" not in done.stderr


def _scored_backbones() -> list[str]:
    """Image and feature-row backbones: what `sparse` scores (text and speech models take lora:R instead)."""
    from edgeadapt.models.registry import get_entry

    return [b for b in backbone_names() if get_entry(b).spec.layout in ("NCHW", "NC")]


@pytest.mark.parametrize("backbone", [pytest.param(b, marks=() if b.startswith("tiny") else pytest.mark.slow)
                                      for b in _scored_backbones()])
def test_every_backbone_exports_sparse_within_budget(tmp_path, backbone, calibration, digits):
    """Each zoo backbone at a budget between its head and its full fine-tuning: the export validates against torch
    (split convs included), the plan fits, and weights beyond the head and biases train."""
    rows = backbone == "tiny_mlp"
    extra = {} if rows else {"input_size": (32,)}
    head = export_bundle(ExportOptions(out=tmp_path / "head", backbone=backbone, head=HeadRequest(labels=LABELS),
                                       trainable="head", validate=False, **extra)).manifest
    full = export_bundle(ExportOptions(out=tmp_path / "full", backbone=backbone, head=HeadRequest(labels=LABELS),
                                       trainable="full", validate=False, **extra)).manifest
    low, high = planned_peak(head, 32, split=True), planned_peak(full, 32)
    budget = low + 0.5 * (high - low)
    result = _export(tmp_path / "sparse", budget, digits["train"] if rows else calibration, backbone, **extra)
    m = result.manifest
    assert planned_peak(m, 32, split=m.split is not None) <= budget
    assert head.trainable_params < m.trainable_params < full.trainable_params
    assert any(layer.params > 0 for layer in m.sparse.layers)
    step = onnx.load(str(result.out / m.portable.train_step))  # the graph's own flat state, not the manifest's
    assert next(i for i in step.graph.input if i.name == "params").type.tensor_type.shape.dim[0].dim_value == \
        m.trainable_params


@pytest.mark.parametrize("backbone", ["tiny_bert", "tiny_whisper"])
def test_sparse_on_text_and_speech_says_what_to_use_instead(tmp_path, calibration, backbone):
    with pytest.raises(ConfigError, match="lora:R") as caught:
        export_bundle(ExportOptions(out=tmp_path / "s", backbone=backbone, head=HeadRequest(labels=LABELS),
                                    trainable="sparse", budget_mb=500, calibration=calibration))
    assert "\n" not in str(caught.value) and not (tmp_path / "s").exists()


def test_a_budget_that_affords_only_the_head_trains_the_head(tmp_path, calibration):
    """At the head preset's own planned peak, sparse can buy nothing more: it is the head, never worse than it
    (and never an error)."""
    head = export_bundle(ExportOptions(out=tmp_path / "head", backbone="tiny_cnn", head=HeadRequest(labels=LABELS),
                                       validate=False)).manifest
    budget = planned_peak(head, 32, split=True) + 1e-3
    m = _export(tmp_path / "sparse", budget, calibration).manifest
    assert m.trainable == head.trainable and m.sparse.cut == "" and m.sparse.layers == []
    assert "the head alone" in " ".join(m.notes)
