"""The engines train right: the portable training step on onnxruntime and OpenVINO follows torch in float64 (the
documented update, each tensor at its parameter group's rate and decay) for every zoo backbone and preset, from the
same state file; ONNX Runtime training's artifacts (the optional plugin) train like the portable step."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TorchSteps, expected_groups, torch_float64_steps, torch_input
from edgeadapt.models.registry import backbone_names
from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.engines import available, open_engine
from edgeadapt.toolchain.build import HeadRequest

PRESETS = ("head", "last:2", "bias", "full", "scratch")
STEPS = 20
TINY = ("tiny_cnn", "tiny_mlp", "tiny_bert", "tiny_whisper")
# pretrained weights available offline (ImageNet; sentence-transformers; Whisper)
PRETRAINED = ("mobilenet_v2", "efficientnet_lite0", "minilm_l6", "whisper_tiny_encoder")


def small_input(backbone: str):
    """32 px for image backbones, 32 tokens for text, 64 frames (0.64 s) for speech; rows keep their width."""
    from edgeadapt.models.registry import get_entry

    spec = get_entry(backbone).spec
    return {"NCHW": (32,), "NT": (32,), "NCT": (spec.input_size[0], 64)}.get(spec.layout)


def fixed_batch(bundle, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Real images (scikit-learn's digits), resized and normalised as the bundle's input, with their labels; for
    text bundles real sentences through the bundle's tokenizer, for speech synthesised voiced sounds."""
    from sklearn.datasets import load_digits

    from edgeadapt.runtime.data import preprocess
    from edgeadapt.runtime.samples import SENTENCES

    manifest = getattr(bundle, "manifest", bundle)
    if manifest.input.kind == "tokens":
        texts = [SENTENCES[i % len(SENTENCES)] for i in range(size)]
        return bundle.tokenizer().encode_batch(texts), np.arange(size) % len(manifest.labels)
    if manifest.input.kind == "audio":
        return bundle.examples(size, seed=1), np.arange(size) % len(manifest.labels)
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
    x, y = fixed_batch(bundle)
    losses = [opened.train_step(x, y, lr)[0] for _ in range(steps)]
    return np.array(losses), opened.state().params


def per_tensor_error(bundle: Bundle, params: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    return {p.name: float(np.linalg.norm(params[p.offset:p.offset + p.size] - reference[p.offset:p.offset + p.size])
                          / max(np.linalg.norm(reference[p.offset:p.offset + p.size]), 1e-12))
            for p in bundle.manifest.portable.layout}


def _export(bundle_factory, backbone: str, preset: str, optimizer: str) -> Bundle:
    return Bundle.open(bundle_factory(backbone, preset, input_size=small_input(backbone),
                                      validate=False, optimizer=optimizer, split=False,
                                      head=HeadRequest(num_classes=5)))


def _presets_of(name: str, presets) -> list[str]:
    """The presets a backbone takes: rows skip block presets; transformers add last:1 and LoRA (issue #20). The
    tiny models run every preset; a zoo backbone runs `full` (every tensor: every gradient rule its graph needs,
    which the partial presets use a subset of) and LoRA where it has targets — what differs between presets (which
    tensors train, their groups) does not depend on the backbone and is checked on the tiny models."""
    from edgeadapt.models.registry import get_entry

    lora = bool(get_entry(name).spec.lora_targets)
    if name == "tiny_mlp":
        return [p for p in presets if p in ("head", "full", "bias")]
    if name not in TINY and presets == PRESETS:
        return ["full", "lora:8"] if lora else ["full"]
    if lora and presets == PRESETS:
        return [*presets, "last:1", "lora:8"]
    return list(presets)


def _cases(presets=PRESETS):
    for name in backbone_names():
        for preset in _presets_of(name, presets):
            marks = () if name in TINY else (pytest.mark.slow,)
            yield pytest.param(name, preset, id=f"{name}-{preset}", marks=marks)


ENGINES = [e for e in ("onnxruntime", "openvino") if e in available()]


def _module(backbone: str, preset: str):
    """The torch model the export started from (same seed, head, weights and calibrated BN statistics)."""
    from edgeadapt.toolchain.export import ExportOptions, build

    options = ExportOptions(out=None, backbone=backbone, head=HeadRequest(num_classes=5), trainable=preset,
                            input_size=small_input(backbone))
    return build(options).module


def torch_reference(bundle: Bundle, backbone: str, preset: str, optimizer: str, lr: float, steps: int = STEPS,
                    dtype: str = "float64"):
    from edgeadapt.models.registry import get_entry

    module = _module(backbone, preset)
    pretrained = backbone in PRETRAINED and preset != "scratch"
    groups = expected_groups(module, get_entry(backbone).spec.head, pretrained, optimizer)
    x, y = fixed_batch(bundle)
    return torch_float64_steps(module, bundle.manifest.trainable, groups, optimizer, lr, x, y, steps, dtype)


def fp32_noise(bundle: Bundle, backbone: str, preset: str) -> dict[str, float]:
    """Per tensor, how far PyTorch's own fp32 gradient is from its float64 one on the fixed batch: the rounding
    floor that any fp32 implementation shares (a randomly initialised MobileNetV3 has gradients of norm ~3000 and
    a floor of ~1.6e-4)."""
    import torch

    x, y = fixed_batch(bundle)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        model = _module(backbone, preset).to(dtype).eval()
        torch.nn.functional.cross_entropy(model(torch_input(x, dtype)), torch.from_numpy(y).long()).backward()
        grads[dtype] = {n: p.grad.double().numpy() for n, p in model.named_parameters() if p.grad is not None}
    return {n: float(np.linalg.norm(grads[torch.float32][n] - grads[torch.float64][n]) /
                     max(np.linalg.norm(grads[torch.float64][n]), 1e-30)) for n in bundle.manifest.trainable}


@pytest.mark.parametrize("backbone,preset", list(_cases()))
def test_one_sgd_step_matches_torch_float64(bundle_factory, backbone, preset):
    """One SGD step (lr 1, or 10 where a pretrained backbone learns at 0.1×, so every tensor moves by about its
    gradient): the update is the gradient times the group's rate, tensor by tensor, for every backbone and preset:
    within 1e-4 of torch in float64 (OpenVINO: 5e-4), or within three times PyTorch's own fp32 rounding where that
    is larger. OpenVINO folds the BN statistics, a graph input since AdaBN, into the weights with its own
    arithmetic: weights an ulp apart, which a random-init MobileNetV3 amplifies to ~4e-4 against float64."""
    bundle = _export(bundle_factory, backbone, preset, "sgd")
    start = bundle.load_state().params.astype(np.float64)
    lr = 10.0 if backbone in PRETRAINED and preset != "scratch" else 1.0  # the backbone's 0.1× rate moves by g
    reference_loss, reference = torch_reference(bundle, backbone, preset, "sgd", lr, steps=1)
    noise = fp32_noise(bundle, backbone, preset)
    for engine in ENGINES:
        loss, params = trajectory(bundle, engine, lr, steps=1)
        assert abs(loss[0] - reference_loss[0]) <= 1e-4 * abs(reference_loss[0])
        errors = per_tensor_error(bundle, start - params, start - reference)
        floor = 5e-4 if engine == "openvino" else 1e-4  # OpenVINO folds the statistics with its own arithmetic
        # parameters live in fp32: a γ near 1 stores its new value to ~6e-8, a share of a small update
        stored = per_tensor_error(bundle, start - reference.astype(np.float32), start - reference)
        over = {n: e for n, e in errors.items() if e > max(floor, 3 * noise[n], 4 * stored[n])}
        assert not over, (engine, over, {n: noise[n] for n in over})


def _trajectory_cases():
    """Head on every backbone with real weights (a randomly initialised MobileNetV3 or ResNet-18 has features of
    norm ~1e3: SGD on its head saturates the softmax within steps, and rounding then decides; their gradients are
    checked above), and every preset on the tiny models."""
    cases = [case for case in _cases(("head",)) if case.values[0] in PRETRAINED or case.values[0] in TINY]
    for backbone in TINY:
        for preset in PRESETS if backbone == "tiny_cnn" else ("full", "bias"):
            cases.append(pytest.param(backbone, preset, id=f"{backbone}-{preset}"))
    return cases


def update_errors(bundle: Bundle, before: np.ndarray, after: np.ndarray, expected: np.ndarray,
                  skip: set[str] = frozenset()) -> dict[str, float]:
    """Per tensor, ‖after − expected‖ over what a right fp32 step may miss by: 1e-3 of the update, plus four times
    the rounding of the expected parameters to fp32 (a γ near 1 moved by 1e-5 is stored to ~6e-8), plus 1e-6 of
    the whole update (fp32's rounding of a gradient that is zero in exact arithmetic). `skip`: tensors whose
    AdamW update is the sign of rounding noise (a structurally zero gradient divided by its own root mean square)."""
    rounding = expected.astype(np.float32).astype(np.float64) - expected
    whole = 1e-6 * np.linalg.norm(expected - before)
    errors = {}
    for p in bundle.manifest.portable.layout:
        if p.name in skip:
            continue
        part = slice(p.offset, p.offset + p.size)
        allowed = 1e-3 * np.linalg.norm((expected - before)[part]) + 4 * np.linalg.norm(rounding[part]) + whole
        errors[p.name] = float(np.linalg.norm((after - expected)[part]) / max(allowed, 1e-30))
    return errors


@pytest.mark.parametrize("optimizer,lr", [("sgd", 1e-2), ("adamw", 1e-3)])
@pytest.mark.parametrize("backbone,preset", _trajectory_cases())
def test_twenty_steps_match_torch_float64(bundle_factory, backbone, preset, optimizer, lr):
    """20 steps on a fixed batch, each checked from the engine's own parameters against torch's float64 step (with
    torch's own optimizer moments): the loss to 1e-4, and every tensor's update to 1e-3 of its size beyond fp32's
    rounding of the parameters."""
    bundle = _export(bundle_factory, backbone, preset, optimizer)
    from edgeadapt.models.registry import get_entry

    module = _module(backbone, preset)
    head = get_entry(backbone).spec.head
    groups = expected_groups(module, head, backbone in PRETRAINED and preset != "scratch", optimizer)
    x, y = fixed_batch(bundle)
    for engine in ENGINES:
        reference = TorchSteps(module, bundle.manifest.trainable, groups, optimizer, lr, x, y,
                               head=head if preset == "head" else None)
        opened = open_engine(bundle, bundle.graphs(), engine)
        opened.load(bundle.load_state())
        for step in range(STEPS):
            before = opened.state().params.astype(np.float64)
            loss = opened.train_step(x, y, lr)[0]
            reference_loss, expected = reference.step(before)
            assert abs(loss - reference_loss) <= 1e-4 * abs(reference_loss), (engine, step)
            skip = reference.zero_gradients if optimizer == "adamw" else set()
            errors = update_errors(bundle, before, opened.state().params.astype(np.float64), expected, skip)
            worst = max(errors, key=errors.get)
            assert errors[worst] < 1, (engine, step, worst, errors[worst])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_each_parameter_group_updates_at_its_own_rate_and_decay(bundle_factory, optimizer):
    """A backbone/head ratio of 0.25 and a decay of 0.5 (large, so a wrong group shows): after one step each tensor
    moved as torch's float64 step with that tensor's own rate and decay predicts, and the backbone's update is a
    quarter of the head-rate update (biases and norms undecayed), on both portable engines."""
    bundle = Bundle.open(bundle_factory("tiny_cnn", "full", input_size=(32,), validate=False, optimizer=optimizer,
                                        split=False, head=HeadRequest(num_classes=5), backbone_lr_ratio=0.25,
                                        weight_decay=0.5))
    from edgeadapt.models.registry import get_entry
    from edgeadapt.toolchain.export import ExportOptions, build

    module = build(ExportOptions(out=None, backbone="tiny_cnn", head=HeadRequest(num_classes=5), trainable="full",
                                 input_size=(32,))).module
    x, y = fixed_batch(bundle)
    trainable = bundle.manifest.trainable
    grouped = expected_groups(module, get_entry("tiny_cnn").spec.head, False, optimizer, 0.5, ratio=0.25)
    assert {scale for scale, _ in grouped.values()} == {0.25, 1.0}
    uniform = {n: (1.0, 0.5 if optimizer == "adamw" and module.get_parameter(n).dim() > 1 else 0.0) for n in grouped}
    lr = 1e-2
    _, expected = torch_float64_steps(module, trainable, grouped, optimizer, lr, x, y, steps=1)
    _, at_head_rate = torch_float64_steps(module, trainable, uniform, optimizer, lr, x, y, steps=1)
    start = bundle.load_state().params.astype(np.float64)
    for engine in ENGINES:
        _, params = trajectory(bundle, engine, lr, steps=1)
        errors = update_errors(bundle, start, params.astype(np.float64), expected)
        assert max(errors.values()) < 1, (engine, max(errors, key=errors.get), max(errors.values()))
        for p in bundle.manifest.portable.layout:
            moved, head_rate = (np.linalg.norm((start - v)[p.offset:p.offset + p.size]) for v in (params, at_head_rate))
            assert moved == pytest.approx(head_rate * grouped[p.name][0], rel=1e-2), p.name


def test_states_given_to_or_taken_from_an_engine_stay_the_callers(bundle_factory):
    """An engine copies the state it loads and the state it gives: writing to either afterwards, or training on
    (onnxruntime writes each step into the set the step before read), changes neither the engine's steps nor a
    state taken earlier. Four AdamW steps with the caller's arrays overwritten match four untouched ones."""
    bundle = Bundle.open(bundle_factory("tiny_mlp", "full", validate=False, optimizer="adamw", split=False,
                                        head=HeadRequest(num_classes=5)))
    x, y = fixed_batch(bundle)
    for engine in ENGINES:
        reference_losses, reference = trajectory(bundle, engine, 1e-2, steps=4)
        opened = open_engine(bundle, bundle.graphs(), engine)
        given = bundle.load_state()
        opened.load(given)
        given.params[:] = 0.0
        for moment in given.optimizer.values():
            moment[...] = 0
        losses, taken = [], []
        for _ in range(4):
            losses.append(opened.train_step(x, y, 1e-2)[0])
            taken.append(opened.state())
            taken[-1].params[:] = np.nan  # a caller scribbling over what it was given
        earlier = opened.state().params.copy()
        first = opened.state()
        opened.train_step(x, y, 1e-2)
        assert np.array_equal(first.params, earlier), engine
        assert np.array_equal(np.array(losses), reference_losses) and np.array_equal(earlier, reference), engine


@pytest.mark.ort_training
@pytest.mark.parametrize("backbone,preset", [("tiny_cnn", "full"), ("tiny_mlp", "bias")])
def test_ort_training_artifacts_train_like_the_portable_step(bundle_factory, backbone, preset):
    """The plugin's artifacts, on a bundle of one group (what ORT's optimizer can apply): 20 AdamW steps agree with
    the portable step's; a bundle with groups is refused by that engine in one line."""
    from edgeadapt.runtime.errors import BackendError

    options = dict(input_size=None if backbone == "tiny_mlp" else (32,), validate=False, optimizer="adamw",
                   split=False, head=HeadRequest(num_classes=5))
    bundle = Bundle.open(bundle_factory(backbone, preset, backbone_lr_ratio=1.0, decay_norms=True, **options))
    reference_loss, reference = trajectory(bundle, "onnxruntime", 1e-3)
    losses, params = trajectory(bundle, "ort-training", 1e-3)
    assert np.max(np.abs(losses - reference_loss) / np.abs(reference_loss)) < 1e-4
    assert max(per_tensor_error(bundle, params, reference).values()) < 1e-4
    grouped = Bundle.open(bundle_factory(backbone, preset, **options))
    with pytest.raises(BackendError, match="parameter groups"):
        open_engine(grouped, grouped.graphs(), "ort-training", training=True)


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
