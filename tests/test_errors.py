"""Errors a user can cause: one line (what, why, what to do), a non-zero exit, no traceback, nothing half-written."""

import json
import shutil

import pytest

from conftest import run_cli


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.slow  # CLI subprocesses; CI runs it
@pytest.mark.parametrize("args, fragments", [
    (["export", "mobilenet_v2x", "--classes", "3"], ["unknown backbone 'mobilenet_v2x'", "mobilenet_v2"]),
    (["export", "tiny_cnn", "--classes", "1"], ["at least 2 classes"]),
    (["export", "tiny_cnn", "--classes", "3", "--trainable", "features.9*"], ["matches no parameter", "close names"]),
    (["export", "tiny_cnn", "--classes", "3", "--trainable", "last:x"], ["whole number"]),
    (["export", "tiny_cnn", "--classes", "3", "--loss", "hinge"], ["unknown loss 'hinge'"]),
    (["export", "tiny_cnn"], ["exactly one of --classes"]),
    (["export", "resnet18", "--classes", "3", "--weights", "imagenet"], ["no downloadable ImageNet weights"]),
])
def test_export_errors(tmp_path, args, fragments):
    out = tmp_path / "bundle"
    result = run_cli(*args, "--out", out)
    assert_one_line_error(result, *fragments)
    assert not out.exists() and not list(tmp_path.glob(".bundle*")), "a failed export left files behind"


@pytest.mark.slow  # CLI subprocesses; CI runs it
def test_weight_file_with_wrong_hash(tmp_path):
    fake = tmp_path / "mobilenet_v2-b0353104.pth"
    fake.write_bytes(b"not the weights")
    result = run_cli("export", "mobilenet_v2", "--classes", "3", "--weights", fake, "--out", tmp_path / "b")
    assert_one_line_error(result, "sha256", "expected b03531047ffa")


@pytest.mark.slow  # CLI subprocesses; CI runs it
def test_existing_output_is_refused_unless_forced(bundle_factory, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(bundle_factory("tiny_cnn", "head"), out)
    before = (out / "manifest.json").read_text()
    assert_one_line_error(run_cli("export", "tiny_cnn", "--classes", "4", "--out", out), "not empty", "--force")
    assert (out / "manifest.json").read_text() == before
    result = run_cli("export", "tiny_cnn", "--classes", "4", "--out", out, "--force", "--no-validate")
    assert result.returncode == 0, result.stderr
    assert len(json.loads((out / "manifest.json").read_text())["labels"]) == 4


def _damaged(bundle_factory, tmp_path, damage):
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_factory("tiny_mlp", "full"), bundle)
    damage(bundle)
    return bundle


@pytest.mark.parametrize("damage, fragments", [
    (lambda b: (b / "train_step.onnx").write_bytes(b"x"), ["does not match the sha256"]),
    (lambda b: (b / "train_step.onnx").unlink(), ["misses train_step.onnx"]),
    (lambda b: (b / "manifest.json").write_text("{"), ["not valid JSON"]),
    (lambda b: (b / "forward.onnx").write_bytes((b / "forward.onnx").read_bytes()[:100]), ["forward.onnx", "sha256"]),
    (lambda b: (b / "state.safetensors").write_bytes((b / "state.safetensors").read_bytes()[:100]),
     ["state.safetensors", "corrupt"]),
    (lambda b: (b / "manifest.json").write_text(
        (b / "manifest.json").read_text().replace('"schema_version": 3', '"schema_version": 7')), ["schema_version 7"]),
    (lambda b: (b / "manifest.json").write_text(
        (b / "manifest.json").read_text().replace('"schema_version": 3', '"schema_version": 1')),
     ["schema-1 bundle", "re-export"]),
])
def test_damaged_bundles_are_refused(bundle_factory, tmp_path, digits, damage, fragments):
    bundle = _damaged(bundle_factory, tmp_path, damage)
    assert_one_line_error(run_cli("train", bundle, digits["train"], "--quiet"), *fragments)


def _npz(path, **arrays):
    import numpy as np

    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("make, fragments", [
    (lambda d: _npz(d / "nan.npz", x=__import__("numpy").full((4, 64), float("nan")), y=["1"] * 4), ["NaN"]),
    (lambda d: _npz(d / "shape.npz", x=__import__("numpy").zeros((4, 63), "float32"), y=["1"] * 4), ["shape"]),
    (lambda d: _npz(d / "label.npz", x=__import__("numpy").zeros((4, 64), "float32"), y=["1", "2", "cat", "3"]),
     ["label 'cat'"]),
    (lambda d: _npz(d / "empty.npz", x=__import__("numpy").zeros((0, 64), "float32"), y=[]), ["no usable sample"]),
    (lambda d: _npz(d / "one.npz", x=__import__("numpy").zeros((4, 64), "float32"), y=["1"] * 4), ["single class"]),
    (lambda d: d / "missing.npz", ["does not exist"]),
])
def test_bad_data_is_refused_and_checkpoint_untouched(bundle_factory, tmp_path, make, fragments):
    bundle = _damaged(bundle_factory, tmp_path, lambda b: None)
    before = (bundle / "state.safetensors").read_bytes()
    assert_one_line_error(run_cli("train", bundle, make(tmp_path), "--quiet"), *fragments)
    assert (bundle / "state.safetensors").read_bytes() == before


def test_unreadable_images_are_skipped_and_reported(bundle_factory, digit_images, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(digit_images, images)
    (images / "3" / "truncated.png").write_bytes((images / "3" / "0003.png").read_bytes()[:40])
    (images / "4" / "empty.png").write_bytes(b"")
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_factory("tiny_cnn", "full", input_size=(16,)), bundle)
    result = run_cli("train", bundle, images, "--epochs", "1", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "skipped 2 unreadable file(s)" in result.stdout


def test_cuda_absent_is_one_line(fresh_bundle, digits):
    assert_one_line_error(run_cli("train", fresh_bundle(), digits["train"], "--device", "cuda", "--quiet"),
                          "CUDAExecutionProvider")
