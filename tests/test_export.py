"""Export is driven by the registry: every backbone and preset exports, and the bundle it writes computes what the
torch model computes — outputs and gradients, compared here, in the test, by running both."""

import json

import numpy as np
import onnx
import pytest
import torch
from test_engines import PRETRAINED, fixed_batch

from conftest import expected_groups, torch_input
from edgeadapt.models.registry import backbone_names, get_entry
from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.engines import open_engine
from edgeadapt.toolchain.build import HeadRequest
from edgeadapt.toolchain.export import ExportOptions, build

PRESETS = ["head", "full", "last:2", "bias", "scratch"]
SMALL_INPUT = {"mobilenet_v2": (64,), "mobilenet_v3_small": (64,), "resnet18": (64,), "efficientnet_lite0": (64,),
               "minilm_l6": (32,), "whisper_tiny_encoder": (80, 64)}
LABELS = tuple(str(i) for i in range(10))


def _bundle(bundle_factory, backbone, preset, **options):
    return bundle_factory(backbone, preset, input_size=SMALL_INPUT.get(backbone), **options)


def _torch_model(backbone: str, preset: str):
    """The torch model the export started from (same seed, same head, same calibrated BN statistics)."""
    options = ExportOptions(out=None, backbone=backbone, head=HeadRequest(labels=LABELS), trainable=preset,
                            input_size=SMALL_INPUT.get(backbone))
    return build(options).module.eval()


def _engine(bundle_path, name="onnxruntime"):
    bundle = Bundle.open(bundle_path)
    engine = open_engine(bundle, bundle.graphs(), name)
    engine.load(bundle.load_state())
    return bundle, engine


@pytest.mark.parametrize("backbone", [pytest.param(b, marks=() if b.startswith("tiny") else pytest.mark.slow)
                                      for b in backbone_names()])
def test_every_backbone_exports_and_matches_torch(bundle_factory, backbone):
    bundle, engine = _engine(_bundle(bundle_factory, backbone, "full", optimizer="sgd"))
    x, y = fixed_batch(bundle)
    model = _torch_model(backbone, "full").double()
    logits = model(torch_input(x, torch.float64))
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y).long())
    loss.backward()
    assert np.abs(engine.eval_step(x, y)[1] - logits.detach().numpy()).max() < 1e-4
    before = engine.state().params.astype(np.float64)
    groups = expected_groups(model, get_entry(backbone).spec.head, backbone in PRETRAINED, "sgd")
    lr = 10.0 if backbone in PRETRAINED else 1.0  # SGD: the update is lr · rate · gradient, about the gradient
    step_loss, _ = engine.train_step(x, y, lr)
    gradient = (before - engine.state().params) / lr
    assert abs(step_loss - loss.item()) / loss.item() < 1e-4
    grads = dict(model.named_parameters())
    # a floor of 1e-6 of the largest gradient: attention's key bias has a gradient that is zero in exact arithmetic
    floor = 1e-6 * max(float(np.linalg.norm(p.grad.numpy())) for p in grads.values() if p.grad is not None)
    for p in bundle.manifest.portable.layout:
        reference = grads[p.name].grad.numpy().ravel() * groups[p.name][0]
        error = np.linalg.norm(gradient[p.offset:p.offset + p.size] - reference) / \
            max(np.linalg.norm(reference), floor, 1e-9)
        assert error < 5e-2, (p.name, error)  # random-init ReLU nets: a kink can flip (see validate.py)


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
    step = onnx.load(str(bundle / "train_step.onnx"))
    frozen_in_graph = {i.name for i in step.graph.initializer}
    statistics = {p["name"] for p in manifest["portable"]["statistics"]}  # fed as `bn_stats`, never initializers
    assert set(manifest["frozen"]) <= frozen_in_graph and not set(manifest["trainable"]) & frozen_in_graph
    assert set(manifest["buffers"]) <= frozen_in_graph | statistics
    params = dict(get_entry(backbone).factory(10).named_parameters())
    assert set(manifest["trainable"]) | set(manifest["frozen"]) == set(params)
    assert manifest["trainable_params"] + manifest["frozen_params"] == sum(p.numel() for p in params.values())
    assert [p["name"] for p in manifest["portable"]["layout"]] == manifest["trainable"]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("backbone", ["tiny_cnn", "tiny_mlp"])
def test_portable_step_uses_standard_onnx_only(bundle_factory, backbone, preset):
    bundle = _bundle(bundle_factory, backbone, preset)
    for name in ("train_step.onnx", "forward.onnx"):
        model = onnx.load(str(bundle / name))
        onnx.checker.check_model(model, full_check=True)
        assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
        assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
        assert model.ir_version <= 10
        trainable = set(json.loads((bundle / "manifest.json").read_text())["trainable"])
        assert not trainable & {i.name for i in model.graph.initializer}  # trainable state is an input


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("backbone", ["tiny_cnn", "tiny_mlp"])
def test_training_lowers_the_loss_and_eval_sees_it(bundle_factory, backbone, preset):
    bundle, engine = _engine(_bundle(bundle_factory, backbone, preset))
    x, y = fixed_batch(bundle)
    losses = [engine.train_step(x, y, 1e-2)[0] for _ in range(20)]
    assert losses[-1] < losses[0]
    eval_loss, _ = engine.eval_step(x, y)
    last_loss, _ = engine.train_step(x, y, 0.0)  # lr 0: the step's forward pass at the current parameters
    assert abs(last_loss - eval_loss) <= 1e-4 * max(1.0, abs(eval_loss))


@pytest.mark.ort_training
def test_ort_format_adds_mobile_models(bundle_factory):
    bundle = bundle_factory("tiny_cnn", "head", ort_format=True)
    names = {p.name for p in bundle.iterdir()}
    assert {"training_model.ort", "eval_model.ort", "optimizer_model.ort"} <= names
    assert "required_operators.config" in names


def test_custom_model_factory(tmp_path):
    from edgeadapt.models.registry import BackboneSpec
    from edgeadapt.toolchain.export import export_bundle

    spec = BackboneSpec(name="user", input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, feature_dim=0,
                        head="classifier", blocks=())
    options = ExportOptions(out=tmp_path / "user", model="user_models:small_net", head=HeadRequest(num_classes=3),
                            trainable="head", user_spec=spec)
    result = export_bundle(options)
    assert result.manifest.trainable == ["classifier.weight", "classifier.bias"]
    model = build(options).module.eval()  # the same seeded factory and head
    _, engine = _engine(result.out)
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch_input(x)).numpy()
    assert np.abs(engine.eval_step(x, np.zeros(4, np.int64))[1] - expected).max() < 1e-4


@pytest.fixture(scope="module")
def mobilenet_onnx(tmp_path_factory):
    """A user's own ONNX file: torch's default export of MobileNetV2 with BN nodes kept and a fixed batch of 1."""
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
    return path, model


def _source_logits(path, x, feature=None):
    import onnxruntime

    model = onnx.load(str(path))
    if feature:
        model.graph.output.append(onnx.helper.make_tensor_value_info(feature, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([feature or model.graph.output[0].name], {"image": x[i:i + 1]})[0]
                           for i in range(len(x))])


@pytest.mark.slow
@pytest.mark.parametrize("mode, preset", [("keep", "full"), ("keep", "head"), ("feature", "bias")])
def test_onnx_source(mobilenet_onnx, tmp_path, mode, preset):
    from edgeadapt.toolchain.export import export_bundle

    path, _ = mobilenet_onnx
    feature = "/GlobalAveragePool_output_0"
    head = {"keep": dict(head=HeadRequest(keep_head=True), head_params=("classifier.1.weight", "classifier.1.bias")),
            "feature": dict(head=HeadRequest(num_classes=3), feature_output=feature)}[mode]
    result = export_bundle(ExportOptions(out=tmp_path / "b", onnx=path, trainable=preset, **head))
    for name in ("train_step.onnx", "training_model.onnx"):
        assert not any("BatchNorm" in n.op_type for n in onnx.load(str(tmp_path / "b" / name)).graph.node)
    bundle, engine = _engine(result.out)
    x = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    y = np.arange(4) % len(result.manifest.labels)
    if mode == "keep":
        expected = _source_logits(path, x)
    else:  # the new head on the source's features, with the exported head weights
        state = bundle.load_state().params
        w, b = (state[p.offset:p.offset + p.size].reshape(p.shape) for p in bundle.manifest.portable.layout
                if p.name.startswith("head"))
        expected = _source_logits(path, x, feature).reshape(4, -1) @ w.T + b
    first, logits = engine.eval_step(x, y)
    assert np.abs(logits - expected).max() < 1e-4
    for _ in range(10):
        engine.train_step(x, y, 1e-3)
    assert engine.eval_step(x, y)[0] < first


@pytest.mark.parametrize("policy", ["fold", "affine"])
def test_bn_on_a_conv_with_two_consumers_is_not_folded_into_it(tmp_path, policy):
    from edgeadapt.models.registry import BackboneSpec
    from edgeadapt.toolchain.export import export_bundle

    spec = BackboneSpec(name="user", input_size=(3, 16, 16), mean=(0.5,) * 3, std=(0.5,) * 3, feature_dim=0,
                        head="classifier", blocks=())
    options = ExportOptions(out=tmp_path / "b", model="user_models:conv_shared_with_bn",
                            head=HeadRequest(keep_head=True), trainable="full", user_spec=spec, bn=policy)
    result = export_bundle(options)
    graph = onnx.load(str(result.out / "forward.onnx"))
    assert not any(n.op_type == "BatchNormalization" for n in graph.graph.node)
    model = build(options).module.eval()
    bundle, engine = _engine(result.out)
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch_input(x)).numpy()
    assert np.abs(engine.eval_step(x, np.zeros(4, np.int64))[1] - expected).max() < 1e-4


@pytest.mark.slow
@pytest.mark.rule("S3")
def test_onnx_source_with_external_data_gives_a_bundle_that_holds_all_its_data(mobilenet_onnx, tmp_path):
    """A host model whose weights sit in a side file: the bundle's graphs hold the weights themselves."""
    from edgeadapt.runtime.onnx_wire import graph_interface
    from edgeadapt.toolchain.export import export_bundle

    path, _ = mobilenet_onnx
    source = tmp_path / "src" / "model.onnx"
    source.parent.mkdir()
    onnx.save(onnx.load(str(path)), str(source), save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    assert graph_interface(source.read_bytes()).external_data
    result = export_bundle(ExportOptions(out=tmp_path / "b", onnx=source, trainable="head",
                                         head=HeadRequest(num_classes=3), feature_output="/GlobalAveragePool_output_0"))
    graphs = [f for f in result.out.iterdir() if f.suffix == ".onnx"]
    assert graphs and not any(graph_interface(f.read_bytes()).external_data for f in graphs)
    assert "weights.bin" not in result.manifest.files and (result.out / "forward.onnx").stat().st_size > 1e6


@pytest.mark.slow  # CLI subprocesses
@pytest.mark.ort_training
def test_a_model_ort_training_cannot_differentiate_exports_with_a_note_and_trains(tmp_path, digit_image_npz):
    """HardSwish on the trainable path: ONNX Runtime training's generator fails, the plugin's artifacts are left out
    with the reason in the manifest, and the bundle (validated against torch) trains on the portable step."""
    from conftest import run_cli

    out = tmp_path / "b"
    result = run_cli("export", "--model", "user_models:net_with_hardswish", "--classes", "3", "--trainable", "full",
                     "--input-size", "32", "--out", out)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    note = next(n for n in manifest["notes"] if n.startswith("no ort-training artifacts"))
    assert "HardSwish" in note and "no gradient" in note
    assert not [p for p in out.iterdir() if p.name.startswith(("training_model", "eval_model", "checkpoint"))]
    assert "validated against torch" in result.stdout
    x = np.random.default_rng(0).integers(0, 255, (60, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.array(["0", "1", "2"] * 20))
    trained = run_cli("train", out, tmp_path / "d.npz", "--epochs", "1", "--quiet")
    assert trained.returncode == 0, trained.stderr


@pytest.mark.parametrize("backbone,preset", [("tiny_cnn", "full"), ("tiny_cnn", "head"), ("tiny_bert", "lora:2")])
def test_no_graph_node_touches_more_tensors_than_webgpu_binds(bundle_factory, backbone, preset):
    """onnxruntime-web's WebGPU provider binds at most 10 storage buffers per node: every node of every graph of a
    bundle reads and writes at most MAX_NODE_TENSORS tensors that are not constants (the flat state is sliced and
    the gradients joined in a tree)."""
    import onnx

    from edgeadapt.toolchain.graph_builder import MAX_NODE_TENSORS

    bundle = bundle_factory(backbone, preset, input_size=(16,) if backbone == "tiny_cnn" else None)
    for graph in sorted(bundle.glob("*.onnx")):
        if graph.name.endswith(("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx")):
            continue  # ONNX Runtime training's own artifacts (not for app runtimes)
        model = onnx.load(graph)
        constants = {i.name for i in model.graph.initializer} | \
            {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
        widest = max(len([i for i in n.input if i and i not in constants]) + len(n.output) for n in model.graph.node)
        assert widest <= MAX_NODE_TENSORS, (graph.name, widest)


@pytest.mark.parametrize("backbone,preset", [("tiny_cnn", "full"), ("tiny_whisper", "full"), ("tiny_bert", "lora:2")])
def test_shape_inference_without_the_weights_infers_what_onnx_infers(bundle_factory, monkeypatch, backbone, preset):
    """The export's shape inference leaves large weights out of onnx's inference (their types enter as inputs): every
    graph of a bundle gets the same value_info and outputs as `onnx.shape_inference.infer_shapes`, weights intact.
    The tiny models stand for backbones: with the size limit lowered to 64 elements their weights are left out."""
    import onnx

    from edgeadapt.toolchain import graph_builder

    monkeypatch.setattr(graph_builder, "SHAPE_ARITHMETIC_ELEMENTS", 64)
    bundle = bundle_factory(backbone, preset, input_size=(16,) if backbone == "tiny_cnn" else None)
    left_out = 0
    for graph in sorted(bundle.glob("*.onnx")):
        model = onnx.load(graph)
        del model.graph.value_info[:]
        left_out += sum(np.prod(t.dims) > 64 for t in model.graph.initializer)
        ours, theirs = graph_builder.with_inferred_types(model), onnx.shape_inference.infer_shapes(model)
        for field in ("value_info", "output", "input", "initializer", "node"):
            assert [v.SerializeToString() for v in getattr(ours.graph, field)] == \
                [v.SerializeToString() for v in getattr(theirs.graph, field)], (graph.name, field)
    assert left_out > 0  # the test saw weights left out of the inference
