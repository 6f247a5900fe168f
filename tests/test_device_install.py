"""The device install, for real: a venv with the latest onnxruntime (and OpenVINO), without onnxruntime-training,
onnx or torch, takes a bundle exported here (MobileNetV2 ImageNet, presets head and full), trains, evaluates,
predicts, deploys to ONNX and OpenVINO, and resumes bit-exactly after a SIGKILL.

The venv is `.venv-device` beside the project (EDGEADAPT_DEVICE_VENV elsewhere), created on first use with
`pip install -e '.[openvino]'` — the device install the README gives."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_runtime import weights

from edgeadapt.toolchain.build import HeadRequest

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("EDGEADAPT_DEVICE_VENV", ROOT / ".venv-device"))
pytestmark = pytest.mark.slow


def _python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


@pytest.fixture(scope="session")
def device_python() -> Path:
    if not _python().is_file():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(_python()), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([str(_python()), "-m", "pip", "install", "-q", "-e", f"{ROOT}[openvino]"], check=True)
    listed = subprocess.run([str(_python()), "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                            check=True)
    installed = {p["name"].lower(): p["version"] for p in json.loads(listed.stdout)}
    assert not {"torch", "onnx", "onnxruntime-training", "onnxruntime-training-cpu"} & set(installed), installed
    assert installed["onnxruntime"].split(".")[:2] != ["1", "19"], "the device venv should have a current onnxruntime"
    return _python()


def _device(python: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([str(python), "-m", "edgeadapt", *map(str, args)], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.fixture(scope="module")
def device_data(tmp_path_factory) -> dict[str, Path]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * 255 / 16).astype(np.uint8)
    labels = np.array(["zero", "one", "two"])[digits.target % 3]
    root = tmp_path_factory.mktemp("device_data")
    paths = {"train": root / "train.npz", "test": root / "test.npz"}
    np.savez(paths["train"], x=images[:96], y=labels[:96])
    np.savez(paths["test"], x=images[1500:1564], y=labels[1500:1564])
    return paths


@pytest.mark.parametrize("preset", ["head", "full"])
def test_device_venv_trains_evaluates_predicts_deploys(device_python, device_data, bundle_factory, tmp_path, preset):
    exported = bundle_factory("mobilenet_v2", preset, weights="imagenet", input_size=(64,),
                              head=HeadRequest(labels=("zero", "one", "two")))
    bundle = tmp_path / "bundle"
    shutil.copytree(exported, bundle)
    versions = subprocess.run([str(device_python), "-c", "import sys, onnxruntime, importlib.util as u; "
                               "print(sys.version_info[:2], onnxruntime.__version__, u.find_spec('onnx'), "
                               "u.find_spec('torch'), u.find_spec('onnxruntime.training'))"],
                              capture_output=True, text=True, check=True).stdout
    assert versions.rstrip().endswith("None None None"), versions
    before = json.loads(_device(device_python, "evaluate", bundle, device_data["test"], "--json").stdout)
    trained = _device(device_python, "train", bundle, device_data["train"], "--epochs", "3", "--batch-size", "16",
                      "--quiet")
    assert "engine onnxruntime" in trained.stdout
    after = json.loads(_device(device_python, "evaluate", bundle, device_data["test"], "--json").stdout)
    assert after["loss"] < before["loss"]
    log = [json.loads(line) for line in (bundle / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["engine"] == "onnxruntime"
    predicted = json.loads(_device(device_python, "predict", bundle, device_data["test"], "--top-k", "1",
                                   "--json").stdout)
    _device(device_python, "deploy", bundle, "--format", "onnx", "--out", tmp_path / "model.onnx")
    _device(device_python, "deploy", bundle, "--format", "openvino", "--out", tmp_path / "model.xml")
    _check_deployed(bundle, tmp_path, device_data["test"], predicted)


def _check_deployed(bundle: Path, out: Path, data: Path, predicted: list) -> None:
    """Here (host side): the deployed ONNX and OpenVINO models give the device's predictions."""
    import onnxruntime
    import openvino

    from edgeadapt.runtime.bundle import Bundle
    from edgeadapt.runtime.data import load_dataset, preprocess

    opened = Bundle.open(bundle)
    samples = load_dataset(data, opened.manifest)
    x = preprocess(samples.samples, opened.manifest, True)
    onnx_logits = onnxruntime.InferenceSession(str(out / "model.onnx")).run(None, {"input": x})[0]
    compiled = openvino.Core().compile_model(str(out / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    ov_logits = np.asarray(compiled(x)[0])
    assert np.abs(onnx_logits - ov_logits).max() < 1e-3
    labels = [opened.manifest.labels[i] for i in onnx_logits.argmax(1)]
    assert labels == [p["top"][0]["label"] for p in predicted]


KILL_SCRIPT = """
import os, signal, sys
from edgeadapt.runtime.trainer import Trainer, TrainConfig
kill_at = int(sys.argv[3])
def on_batch(step, total, loss, acc):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
config = TrainConfig(epochs=2, batch_size=16, seed=3, checkpoint_every=2, resume=sys.argv[4] == "resume", split="off")
Trainer(sys.argv[1], config, on_batch=on_batch).fit(sys.argv[2])
"""


def test_device_venv_resumes_bit_exactly_after_sigkill(device_python, device_data, bundle_factory, tmp_path):
    exported = bundle_factory("mobilenet_v2", "head", weights="imagenet", input_size=(64,),
                              head=HeadRequest(labels=("zero", "one", "two")))
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    shutil.copytree(exported, reference)
    shutil.copytree(exported, killed)

    def run(bundle: Path, kill_at: int, mode: str) -> int:
        return subprocess.run([str(device_python), "-c", KILL_SCRIPT, str(bundle), str(device_data["train"]),
                               str(kill_at), mode], capture_output=True, text=True, timeout=600).returncode
    assert run(reference, -1, "new") == 0
    assert run(killed, 7, "new") != 0  # killed at step 7, two steps after its last checkpoint
    assert run(killed, -1, "resume") == 0
    expected, actual = weights(reference), weights(killed)
    assert all(np.array_equal(expected[name], actual[name]) for name in expected)
