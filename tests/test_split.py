"""Split execution: the frozen prefix as an inference model, the suffix trained alone on its (cached) features,
with the same result as training the whole graph."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_runtime import weights

from conftest import run_cli
from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.deploy import deploy
from edgeadapt.runtime.feature_cache import FeatureCache
from edgeadapt.runtime.signing import DeviceSeal
from edgeadapt.runtime.trainer import TrainConfig, Trainer
from test_errors import assert_one_line_error


@pytest.mark.parametrize("preset, boundary_dims", [("head", [-1, 16]), ("last:2", [-1, 8, 8, 8]),
                                                   ("full", None), ("bias", None)])
def test_split_only_when_the_frozen_part_is_a_prefix(bundle_factory, preset, boundary_dims):
    manifest = json.loads((bundle_factory("tiny_cnn", preset, input_size=(16,)) / "manifest.json").read_text())
    split = manifest["split"]
    assert (split is None) == (boundary_dims is None)
    if split:
        assert split["boundary_shape"] == boundary_dims
        assert {"prefix.onnx", "suffix_train_step.onnx", "suffix_forward.onnx"} <= set(manifest["files"])


def test_a_part_is_cut_with_what_it_reads_and_refused_where_it_reads_more():
    """x → Relu → a → Mul(a, w) → b → Add(b, x) → y: the part from a to b holds Mul and its weight; the part from a
    to y would also read x, which does not cross, so it is refused rather than written without it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper, shape_inference

    from edgeadapt.toolchain.split import _extract

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Mul", ["a", "w"], ["b"]),
                               helper.make_node("Add", ["b", "x"], ["y"])], "g", [x], [y],
                              [numpy_helper.from_array(np.ones(3, np.float32), "w"),
                               numpy_helper.from_array(np.ones(3, np.float32), "unused")])
    model = shape_inference.infer_shapes(helper.make_model(graph))
    part = _extract(model, ["a"], ["b"])
    assert [n.op_type for n in part.graph.node] == ["Mul"] and [t.name for t in part.graph.initializer] == ["w"]
    onnx.checker.check_model(part)
    with pytest.raises(ValueError, match="'x'"):
        _extract(model, ["a"], ["y"])


def _copy(bundle_factory, tmp_path, name, preset="head"):
    target = tmp_path / name
    shutil.copytree(bundle_factory("tiny_cnn", preset, input_size=(16,)), target)
    return target


@pytest.mark.parametrize("preset", ["head", "last:2"])
def test_split_training_equals_whole_graph_training(bundle_factory, tmp_path, digit_image_npz, preset):
    split, whole = _copy(bundle_factory, tmp_path, "split", preset), _copy(bundle_factory, tmp_path, "whole", preset)
    config = dict(epochs=3, batch_size=32, lr=3e-3, seed=2)
    Trainer(split, TrainConfig(split="on", **config)).fit(digit_image_npz)
    Trainer(whole, TrainConfig(split="off", **config)).fit(digit_image_npz)
    a, b = weights(split), weights(whole)
    trainable = Bundle.open(split).manifest.trainable
    assert max(float(np.abs(a[n] - b[n]).max()) for n in trainable) <= 1e-5
    assert max(float(np.abs(a[n] - b[n]).max()) for n in a) <= 1e-5


def test_feature_cache_reuses_and_invalidates(tmp_path):
    samples = np.arange(24, dtype=np.uint8).reshape(6, 4)
    calls = []

    def compute(batch):
        calls.append(len(batch))
        return batch.astype(np.float32) * 2

    seal = DeviceSeal(tmp_path, "bundle-id")
    cache = FeatureCache(tmp_path, "space-a", seal=seal)
    first = cache.features(samples, compute)
    again = FeatureCache(tmp_path, "space-a", seal=seal).features(samples[::-1], compute)
    assert calls == [6] and np.array_equal(again, first[::-1])
    FeatureCache(tmp_path, "space-b", seal=seal).features(samples[:2], compute)  # another prefix: the old space goes
    assert calls == [6, 2] and not (tmp_path / "space-a").exists()
    FeatureCache(tmp_path, "space-b", seal=DeviceSeal(tmp_path, "other-bundle")).features(samples[:2], compute)
    assert calls == [6, 2, 2]  # another bundle's (or device's) cache is not trusted: recomputed
    small = FeatureCache(tmp_path, "space-c", max_bytes=64, seal=seal)
    assert np.array_equal(small.features(samples, compute), samples * 2.0) and small.notes


def test_feature_cache_holds_its_features_once(tmp_path):
    """Caching 128 MB of features, and reading them back in a new process, peaks at about one copy of them above
    the process's footprint (it was two: the array, its serialised bytes and their copy)."""
    code = """
import re, sys, numpy as np
from pathlib import Path
from edgeadapt.runtime.feature_cache import FeatureCache
from edgeadapt.runtime.signing import DeviceSeal
def peak_mb():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
root, samples = Path(sys.argv[1]), np.arange(1024, dtype=np.float32).reshape(1024, 1)
cache = FeatureCache(root, "space", 1 << 30, DeviceSeal(root, "bundle-id"))
base = peak_mb()
features = cache.features(samples, lambda s: np.ones((len(s), 128, 256), np.float32))
print(features.nbytes / 2**20, peak_mb() - base, len(cache.notes))
"""
    for run in ("first", "cached"):
        result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                                timeout=120)
        size, grown, notes = map(float, result.stdout.split())
        assert size == 128 and notes == 0 and grown < 1.3 * size, (run, grown, result.stderr[-2000:])


def test_augmentation_bypasses_the_cache(bundle_factory, tmp_path, digit_image_npz):
    bundle = _copy(bundle_factory, tmp_path, "b")

    def cached() -> int:
        return sum(len(json.loads(json.loads(index.read_text())["index"]))
                   for index in (bundle / "feature_cache").glob("*/index.json"))
    summary = Trainer(bundle, TrainConfig(epochs=1, augment=True)).fit(digit_image_npz)
    assert cached() == summary.val_samples  # only the (never augmented) validation features
    summary = Trainer(bundle, TrainConfig(epochs=1)).fit(digit_image_npz)
    assert cached() == summary.train_samples + summary.val_samples


def test_deployed_split_bundle_computes_prefix_then_trained_suffix(bundle_factory, tmp_path, digit_image_npz):
    import onnx
    import onnxruntime

    from edgeadapt.runtime.data import load_dataset, preprocess
    from edgeadapt.runtime.engines import open_engine

    bundle = _copy(bundle_factory, tmp_path, "b", "last:2")
    Trainer(bundle, TrainConfig(epochs=2, lr=3e-3)).fit(digit_image_npz)
    result = deploy(bundle, "onnx", tmp_path / "model.onnx")
    assert len(onnx.load(str(result.path)).graph.input) == 1
    opened = Bundle.open(bundle)
    data = load_dataset(digit_image_npz, opened.manifest)
    x = preprocess(data.samples[:8], opened.manifest, True)
    state = opened.load_state()
    prefix = onnxruntime.InferenceSession(str(bundle / "prefix.onnx")).run(None, {"input": x,
                                                                                 "bn_stats": state.statistics})[0]
    suffix = open_engine(opened, opened.graphs(split=True), "onnxruntime", training=False)
    suffix.load(state)
    deployed = onnxruntime.InferenceSession(str(result.path)).run(None, {"input": x})[0]
    assert np.abs(deployed - suffix.eval_step(prefix, np.zeros(8, np.int64))[1]).max() < 1e-4


def _val_loss(bundle, data):
    from edgeadapt.runtime.inference import evaluate

    return evaluate(bundle, data).loss


@pytest.mark.parametrize("sequence", [("off", "auto"), ("auto", "off"), ("auto", "kill", "resume", "off", "auto")])
def test_every_run_continues_from_the_last_trained_state(bundle_factory, tmp_path, digit_image_npz, sequence):
    """Any sequence of whole-graph, split, interrupted and resumed runs continues from the latest state: a run at
    lr≈0 changes nothing, so its start equals the previous run's end (issue: a split run once restored a stale
    suffix checkpoint over whole-graph training)."""
    from test_runtime import _train_in_subprocess

    bundle = _copy(bundle_factory, tmp_path, "b", "last:2")
    losses = [_val_loss(bundle, digit_image_npz)]
    for step in sequence:
        if step == "kill":
            killed = _train_in_subprocess(bundle, digit_image_npz, kill_at_step=5, split="auto")
            assert killed.returncode != 0
            continue
        if step == "resume":
            assert _train_in_subprocess(bundle, digit_image_npz, resume=True, split="auto").returncode == 0
        else:
            before = weights(bundle)
            Trainer(bundle, TrainConfig(epochs=1, lr=1e-9, split=step)).fit(digit_image_npz)
            after = weights(bundle)
            assert max(float(np.abs(before[n] - after[n]).max()) for n in before) < 1e-6  # started from the last state
            Trainer(bundle, TrainConfig(epochs=2, lr=1e-2, split=step, seed=len(losses))).fit(digit_image_npz)
        losses.append(_val_loss(bundle, digit_image_npz))
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))  # every run built on the last


def test_openvino_prefix_trains_like_onnxruntime(bundle_factory, tmp_path, digit_image_npz):
    ort, ov = _copy(bundle_factory, tmp_path, "ort"), _copy(bundle_factory, tmp_path, "ov")
    Trainer(ort, TrainConfig(epochs=2, seed=1)).fit(digit_image_npz)
    Trainer(ov, TrainConfig(epochs=2, seed=1, prefix_device="openvino-cpu")).fit(digit_image_npz)
    a, b = weights(ort), weights(ov)
    assert max(float(np.abs(a[n] - b[n]).max()) for n in a) <= 1e-4
    result = run_cli("train", ov, digit_image_npz, "--prefix-device", "openvino-npu", "--quiet")
    assert_one_line_error(result, "OpenVINO device NPU is not present")


@pytest.mark.slow  # CLI subprocesses; CI runs it
def test_int8_prefix(bundle_factory, tmp_path, digit_image_npz):
    import onnxruntime

    from edgeadapt.runtime.data import load_dataset, preprocess

    bundle = _copy(bundle_factory, tmp_path, "b")
    result = run_cli("quantize-prefix", bundle, digit_image_npz, "--samples", "64")
    assert result.returncode == 0, result.stderr
    opened = Bundle.open(bundle)
    x = preprocess(load_dataset(digit_image_npz, opened.manifest).samples[:64], opened.manifest, True)
    statistics = opened.load_state().statistics
    exact = onnxruntime.InferenceSession(str(bundle / "prefix.onnx")).run(None, {"input": x,
                                                                                "bn_stats": statistics})[0]
    int8 = onnxruntime.InferenceSession(str(bundle / "prefix_int8.onnx")).run(None, {"input": x})[0]  # baked in
    assert np.linalg.norm(int8 - exact) / np.linalg.norm(exact) < 0.25  # INT8 features stay close to float ones
    float_bundle = _copy(bundle_factory, tmp_path, "float")
    for target, extra in ((bundle, ["--prefix-int8"]), (float_bundle, [])):
        trained = run_cli("train", target, digit_image_npz, *extra, "--epochs", "3", "--lr", "3e-2", "--quiet")
        assert trained.returncode == 0, trained.stderr
    from edgeadapt.runtime.inference import evaluate

    int8_accuracy, float_accuracy = (evaluate(b, digit_image_npz).accuracy for b in (bundle, float_bundle))
    assert int8_accuracy > 0.2 and int8_accuracy >= float_accuracy - 0.1  # 10 classes
