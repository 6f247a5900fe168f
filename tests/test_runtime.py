"""The device runtime on real data: training improves a model, resumes exactly after SIGKILL, recovers from a
diverging loss, refuses a second trainer, and evaluate/predict/deploy see the adapted model."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.data import load_dataset, split
from edgeadapt.runtime.deploy import deploy
from edgeadapt.runtime.errors import TrainingError
from edgeadapt.runtime.inference import evaluate, predict
from edgeadapt.runtime.lock import bundle_lock
from edgeadapt.runtime.trainer import TrainConfig, Trainer


def weights(bundle) -> dict[str, np.ndarray]:
    """The bundle's trained parameters, read from its state file."""

    opened = Bundle.open(bundle)
    params = opened.load_state().params
    return {p.name: params[p.offset:p.offset + p.size].reshape(p.shape) for p in opened.manifest.portable.layout}


def test_training_lifts_accuracy_and_evaluate_agrees_with_the_log(fresh_bundle, digits):
    bundle = fresh_bundle("tiny_mlp", "full")
    before = evaluate(bundle, digits["test"]).accuracy
    config = TrainConfig(epochs=8, batch_size=32, lr=3e-3, seed=1)
    summary = Trainer(bundle, config).fit(digits["train"])
    after = evaluate(bundle, digits["test"]).accuracy
    assert summary.stopped == "completed" and summary.epochs_completed == 8
    assert after > 0.6 and after > before + 0.4
    log = [json.loads(line) for line in (bundle / "train_log.jsonl").read_text().splitlines()]
    manifest = Bundle.open(bundle).manifest
    _, val = split(load_dataset(digits["train"], manifest), config.val_split, config.seed)
    assert evaluate(bundle, val).accuracy == pytest.approx(log[-1]["val_accuracy"], abs=1e-9)


def test_csv_and_image_folders_train(fresh_bundle, digits, digit_images, bundle_factory, tmp_path):
    import shutil

    mlp = fresh_bundle("tiny_mlp", "full")
    assert Trainer(mlp, TrainConfig(epochs=1)).fit(digits["csv"]).steps > 0
    image_bundle = tmp_path / "images_bundle"
    shutil.copytree(bundle_factory("tiny_cnn", "full", input_size=(16,)), image_bundle)
    data = load_dataset(digit_images, Bundle.open(image_bundle).manifest)
    assert data.samples.shape[1:] == (16, 16, 3) and len(data) == 200
    before = evaluate(image_bundle, digit_images).loss
    summary = Trainer(image_bundle, TrainConfig(epochs=6, batch_size=16, lr=3e-3, val_split=0)).fit(digit_images)
    assert summary.steps == 6 * 13 and evaluate(image_bundle, digit_images).loss < before


def _train_in_subprocess(bundle, data, kill_at_step=None, resume=False, split="auto", engine="auto"):
    code = f"""
import os, signal, sys
sys.modules['torch'] = None
from edgeadapt.runtime.trainer import Trainer, TrainConfig
def on_batch(step, total, loss, acc):
    if step == {kill_at_step!r}:
        os.kill(os.getpid(), signal.SIGKILL)
config = TrainConfig(epochs=4, batch_size=64, lr=3e-3, seed=3, checkpoint_every=3, augment=True, resume={resume},
                     split={split!r}, engine={engine!r})
Trainer({str(bundle)!r}, config, on_batch=on_batch).fit({str(data)!r})
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_sigkill_then_resume_gives_identical_weights(fresh_bundle, digits, tmp_path):
    import shutil

    bundle = fresh_bundle("tiny_mlp", "full")
    reference = tmp_path / "reference"
    shutil.copytree(bundle, reference)
    assert _train_in_subprocess(reference, digits["train"]).returncode == 0
    killed = _train_in_subprocess(bundle, digits["train"], kill_at_step=40)
    assert killed.returncode == -signal.SIGKILL
    resumed = _train_in_subprocess(bundle, digits["train"], resume=True)
    assert resumed.returncode == 0, resumed.stderr
    expected, actual = weights(reference), weights(bundle)
    assert all(np.array_equal(expected[n], actual[n]) for n in expected)


def test_resume_refuses_changed_settings(fresh_bundle, digits):
    bundle = fresh_bundle("tiny_mlp", "full")
    Trainer(bundle, TrainConfig(epochs=3, max_minutes=1e-9)).fit(digits["train"])
    with pytest.raises(TrainingError, match="batch_size changed"):
        Trainer(bundle, TrainConfig(epochs=3, batch_size=8, resume=True)).fit(digits["train"])
    assert Trainer(bundle, TrainConfig(epochs=3, resume=True)).fit(digits["train"]).stopped == "completed"


def test_time_limit_stops_resumably(fresh_bundle, digits):
    bundle = fresh_bundle("tiny_mlp", "full")
    summary = Trainer(bundle, TrainConfig(epochs=50, max_minutes=1e-9)).fit(digits["train"])
    assert summary.stopped == "time_limit" and summary.steps == 1


def test_diverging_loss_restores_last_good_state_then_stops(fresh_bundle, digits, tmp_path):
    bundle = fresh_bundle("tiny_mlp", "full")
    manifest = Bundle.open(bundle).manifest
    data = load_dataset(digits["train"], manifest)
    data.samples[5] = np.inf  # one poisoned sample makes the loss NaN whenever its batch comes
    with pytest.raises(TrainingError, match="NaN or infinite again"):
        Trainer(bundle, TrainConfig(epochs=2, val_split=0)).fit(data)
    state = weights(bundle)
    assert all(np.isfinite(v).all() for v in state.values())


def test_second_trainer_is_refused_and_stale_lock_is_taken_over(fresh_bundle, digits):
    bundle = fresh_bundle("tiny_mlp", "full")
    lock = bundle / "train.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock.write_text(str(sleeper.pid))
        with pytest.raises(TrainingError, match=f"process {sleeper.pid}"):
            Trainer(bundle, TrainConfig(epochs=1)).fit(digits["train"])
    finally:
        sleeper.kill()
        sleeper.wait()
    assert Trainer(bundle, TrainConfig(epochs=1)).fit(digits["train"]).steps > 0  # the lock's owner is gone
    assert not lock.exists()
    with bundle_lock(lock):
        assert lock.read_text() == str(os.getpid())


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_deployed_model_computes_the_trained_model(fresh_bundle, digits, tmp_path, fmt):
    bundle = fresh_bundle("tiny_mlp", "full")
    Trainer(bundle, TrainConfig(epochs=1)).fit(digits["train"])
    result = deploy(bundle, fmt, tmp_path / "out")
    x = np.load(digits["test"])["x"][:16]
    if fmt == "onnx":
        import onnxruntime

        actual = onnxruntime.InferenceSession(str(result.path)).run(None, {"input": x})[0]
    else:
        import openvino

        compiled = openvino.Core().compile_model(str(result.path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        actual = compiled(x)[0]
    trained = weights(bundle)  # the state file's parameters, through numpy: Linear, ReLU, Linear, ReLU, Linear
    h = np.maximum(x @ trained["features.0.weight"].T + trained["features.0.bias"], 0)
    h = np.maximum(h @ trained["features.2.weight"].T + trained["features.2.bias"], 0)
    expected = h @ trained["classifier.weight"].T + trained["classifier.bias"]
    assert np.abs(actual - expected).max() < 1e-4


def test_predict_returns_top_k_with_labels(fresh_bundle, digits):
    bundle = fresh_bundle("tiny_mlp", "full")
    Trainer(bundle, TrainConfig(epochs=5, lr=3e-3)).fit(digits["train"])
    predictions = predict(bundle, [digits["test"]], top_k=3)
    assert len(predictions) == 597 and len(predictions[0].top) == 3
    scores = [t["score"] for t in predictions[0].top]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
    truth = np.load(digits["test"])["y"]
    hits = np.mean([p.top[0]["label"] == t for p, t in zip(predictions, truth)])
    assert hits > 0.5


def test_openvino_predictions_match_onnxruntime(fresh_bundle, digits):
    bundle = fresh_bundle("tiny_mlp", "full")
    Trainer(bundle, TrainConfig(epochs=2)).fit(digits["train"])
    ort = predict(bundle, [digits["test"]], top_k=1)
    ov = predict(bundle, [digits["test"]], top_k=1, engine="openvino")
    assert [p.top[0]["index"] for p in ort] == [p.top[0]["index"] for p in ov]
    assert max(abs(a.top[0]["score"] - b.top[0]["score"]) for a, b in zip(ort, ov)) <= 1e-4


def test_absent_openvino_device_is_one_line(fresh_bundle, digits):
    from conftest import run_cli
    from test_errors import assert_one_line_error

    result = run_cli("predict", fresh_bundle(), digits["test"], "--engine", "openvino", "--device", "npu")
    assert_one_line_error(result, "OpenVINO device NPU is not present")


def test_resume_right_after_an_epochs_last_batch(fresh_bundle, digits):
    """A stop after the last batch of an epoch, before its end-of-epoch save (found by the crash torture)."""
    bundle = fresh_bundle("tiny_mlp", "full")
    config = dict(epochs=3, batch_size=4096, val_split=0.1)  # one batch per epoch
    first = Trainer(bundle, TrainConfig(max_minutes=1e-9, **config)).fit(digits["train"])
    assert first.stopped == "time_limit" and first.steps == 1
    resumed = Trainer(bundle, TrainConfig(resume=True, **config)).fit(digits["train"])
    assert resumed.stopped == "completed" and resumed.epochs_completed == 3


def test_inspect_shows_nested_values_as_readable_lines(fresh_bundle):
    from conftest import run_cli

    result = run_cli("inspect", fresh_bundle("tiny_mlp", "full"))
    assert result.returncode == 0, result.stderr
    assert "{" not in result.stdout and "total_mb" in result.stdout  # nested values as lines, no raw dicts
    for field in ("validation", "memory plan, batch 32", "portable step", "engines here", "state.safetensors"):
        assert field in result.stdout


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_heap_goes_back_to_the_system():
    """What the engines call after building a session: 80 MB of small C allocations, freed, stay resident until
    release_freed() hands them back (RSS read from /proc, in a process of its own)."""
    script = """
import ctypes, ctypes.util
from edgeadapt.runtime.heap import release_freed
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def rss():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024
blocks = [libc.malloc(2000) for _ in range(40_000)]
for block in blocks:
    ctypes.memset(block, 1, 2000)
for block in blocks[:-1]:  # the last one keeps the heap's top from shrinking on its own
    libc.free(block)
freed = rss()
release_freed()
print(freed - rss())
"""
    returned = float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                    check=True).stdout)
    assert returned > 60, returned
