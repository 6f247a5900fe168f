"""Split execution: the frozen prefix as an inference model, the suffix trained alone on its (cached) features,
with the same result as training the whole graph."""

import json
import shutil

import numpy as np
import pytest
from test_runtime import weights

from conftest import run_cli
from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.deploy import deploy
from edgeadapt.runtime.feature_cache import FeatureCache
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
        assert {"prefix.onnx", "suffix_training_model.onnx", "suffix_checkpoint"} <= set(manifest["files"])


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

    cache = FeatureCache(tmp_path, "space-a")
    first = cache.features(samples, compute)
    again = FeatureCache(tmp_path, "space-a").features(samples[::-1], compute)
    assert calls == [6] and np.array_equal(again, first[::-1])
    FeatureCache(tmp_path, "space-b").features(samples[:2], compute)  # another prefix: the old space goes
    assert calls == [6, 2] and not (tmp_path / "space-a").exists()
    small = FeatureCache(tmp_path, "space-c", max_bytes=64)
    assert np.array_equal(small.features(samples, compute), samples * 2.0) and small.notes


def test_augmentation_bypasses_the_cache(bundle_factory, tmp_path, digit_image_npz):
    bundle = _copy(bundle_factory, tmp_path, "b")
    summary = Trainer(bundle, TrainConfig(epochs=1, augment=True)).fit(digit_image_npz)
    assert any("cache bypassed" in note for note in summary.notes)


def test_deploy_stitches_prefix_and_adapted_suffix(bundle_factory, tmp_path, digit_image_npz):
    import onnx

    bundle = _copy(bundle_factory, tmp_path, "b")
    Trainer(bundle, TrainConfig(epochs=2, lr=3e-3)).fit(digit_image_npz)
    result = deploy(bundle, "onnx", tmp_path / "model.onnx")
    assert result.max_abs_diff <= 1e-4 and result.same_predictions
    assert len(onnx.load(str(result.path)).graph.input) == 1


def test_openvino_prefix_trains_like_onnxruntime(bundle_factory, tmp_path, digit_image_npz):
    ort, ov = _copy(bundle_factory, tmp_path, "ort"), _copy(bundle_factory, tmp_path, "ov")
    Trainer(ort, TrainConfig(epochs=2, seed=1)).fit(digit_image_npz)
    Trainer(ov, TrainConfig(epochs=2, seed=1, prefix_device="openvino-cpu")).fit(digit_image_npz)
    a, b = weights(ort), weights(ov)
    assert max(float(np.abs(a[n] - b[n]).max()) for n in a) <= 1e-4
    result = run_cli("train", ov, digit_image_npz, "--prefix-device", "openvino-npu", "--quiet")
    assert_one_line_error(result, "OpenVINO device NPU is not present")


def test_int8_prefix(bundle_factory, tmp_path, digit_image_npz):
    bundle = _copy(bundle_factory, tmp_path, "b")
    result = run_cli("quantize-prefix", bundle, digit_image_npz, "--samples", "64")
    assert result.returncode == 0, result.stderr
    assert (bundle / "prefix_int8.onnx").is_file() and "features differ" in result.stdout
    trained = run_cli("train", bundle, digit_image_npz, "--prefix-int8", "--epochs", "1", "--quiet")
    assert trained.returncode == 0, trained.stderr
