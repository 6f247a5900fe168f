"""The CLI as a new user meets it: each point a user tripped over on a fresh machine, checked through the command
line (what it prints, what it writes, what it leaves alone)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import DIGIT_LABELS, run_cli
from test_errors import assert_one_line_error

ROOT = Path(__file__).resolve().parents[1]


def _labels(tmp_path) -> Path:
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(DIGIT_LABELS) + "\n")
    return path


def test_export_says_each_stage_and_warns_about_random_weights(tmp_path):
    result = run_cli("export", "tiny_cnn", "--labels", _labels(tmp_path), "--input-size", "16", "--out",
                     tmp_path / "b")
    assert result.returncode == 0, result.stderr
    stages = [line for line in result.stdout.splitlines() if line.startswith("[")]
    assert any("building tiny_cnn" in s for s in stages) and any("validating against torch" in s for s in stages)
    assert "warning: random weights: tiny_cnn has no pretrained weights in the zoo" in result.stderr


def test_zoo_says_which_weights_an_export_takes_by_default():
    result = run_cli("zoo")
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 3}
    assert "imagenet (default)" in rows["mobilenet_v2"] and "random only" in rows["tiny_cnn"]


@pytest.mark.parametrize("trainable, fragments", [
    ("haed", ["did you mean 'head'"]),
    ("ful", ["did you mean 'full'"]),
    ("last:0", ["last:0 trains no block", "--trainable head"]),
])
def test_a_mistyped_preset_is_named(tmp_path, trainable, fragments):
    result = run_cli("export", "tiny_cnn", "--classes", "3", "--trainable", trainable, "--out", tmp_path / "b")
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "b").exists()


@pytest.fixture
def mlp_bundle(fresh_bundle):
    return fresh_bundle("tiny_mlp", "full")


def test_ctrl_c_says_what_was_kept_and_the_next_plain_run_says_it_is_new(mlp_bundle, digits):
    """SIGINT (what Ctrl-C sends) mid-training: exit 130, the message names the checkpoint kept and `--resume`;
    a plain `train` afterwards says it starts a new run instead of silently doing so."""
    process = subprocess.Popen([sys.executable, "-m", "edgeadapt", "train", str(mlp_bundle), str(digits["train"]),
                                "--epochs", "400", "--checkpoint-every", "5", "--quiet"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               # a terminal's default: a run started in the background inherits SIGINT ignored
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = mlp_bundle / "train_log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and log.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.2)  # at least one epoch committed
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted: the bundle keeps its last checkpoint (epoch" in err and "--resume" in err, err
    again = run_cli("train", mlp_bundle, digits["train"], "--epochs", "1", "--quiet")
    assert again.returncode == 0, again.stderr
    assert "note: the previous run stopped unfinished at epoch" in again.stdout
    assert "completed: 1 epoch," in again.stdout  # not "1 epochs"


def test_the_progress_bar_counts_epochs(mlp_bundle, digits):
    result = run_cli("train", mlp_bundle, digits["csv"], "--epochs", "2", "--batch-size", "64")
    assert result.returncode == 0, result.stderr
    assert "epoch 2/2" in result.stdout and "0/?" not in result.stdout


def test_train_help_describes_the_data_formats():
    text = " ".join(run_cli("train", "--help").stdout.split())
    assert "class subfolders of images" in text and ".npz with x" in text and ".csv" in text


def test_predict_takes_a_folder_of_unlabelled_images(fresh_bundle, tmp_path):
    from PIL import Image

    bundle = fresh_bundle("tiny_cnn", "head", input_size=(16,))
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(folder / f"{i}.png")
    result = run_cli("predict", bundle, folder, "--json")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)) == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_cli("predict", bundle, empty), "holds no image")


def test_inspect_shows_whole_numbers_as_such(bundle_factory):
    result = run_cli("inspect", bundle_factory("tiny_mlp", "full"))
    assert "batch_size 32," in result.stdout and "epochs 5," in result.stdout and "batch_size 32.0" not in result.stdout


def test_the_confusion_matrix_names_its_rows(mlp_bundle, digits):
    result = run_cli("evaluate", mlp_bundle, digits["test"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("confusion"))
    rows = lines[start + 2:start + 2 + len(DIGIT_LABELS)]
    assert [row.split()[1] for row in rows] == list(DIGIT_LABELS)
    assert all(len(row.split()) == 2 + len(DIGIT_LABELS) for row in rows)


def test_bench_says_where_the_plot_went_and_ignores_a_checkout_it_stands_in(bundle_factory, tmp_path):
    """Standing in a folder whose `edgeadapt/` is not the installed package (a source checkout under a plain
    `pip install .`) must not break bench's worker processes."""
    decoy = tmp_path / "checkout"
    (decoy / "edgeadapt").mkdir(parents=True)
    (decoy / "edgeadapt" / "__init__.py").write_text("raise ImportError('the checkout, not the install')\n")
    bundle = bundle_factory("tiny_mlp", "full")
    result = subprocess.run([sys.executable, "-c", "from edgeadapt.cli import main; main()", "bench", str(bundle),
                             "--batch-sizes", "4", "--steps", "1", "--warmup", "0", "--plot", str(tmp_path / "plots")],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = tmp_path / "plots.png"
    assert written.is_file() and f"plots written to {written}" in result.stdout
    decoyed = subprocess.run([sys.executable, "-m", "edgeadapt", "bench", str(bundle), "--batch-sizes", "4",
                              "--steps", "1", "--warmup", "0"], capture_output=True, text=True, timeout=600,
                             cwd=decoy)
    assert "the checkout, not the install" in decoyed.stderr  # the decoy shadows `-m` in the folder itself …
    from edgeadapt.devices.bench import run_case

    here = os.getcwd()
    try:
        os.chdir(decoy)
        case = run_case(bundle, 4, 1, steps=1, warmup=0, inference=False)  # … but not bench's workers
    finally:
        os.chdir(here)
    assert len(case["step_ms"]) == 1 and case["step_ms"][0] > 0


def test_openvino_deploys_without_writing_outside_the_given_files(bundle_factory, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    result = subprocess.run([sys.executable, "-m", "edgeadapt", "deploy", str(bundle_factory("tiny_mlp", "full")),
                             "--format", "openvino", "--out", str(tmp_path / "m.xml")], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "HOME": str(home)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert list(home.iterdir()) == []  # no ~/intel telemetry id
    assert (tmp_path / "m.xml").is_file()


def test_the_demo_folder_is_ignored_by_git():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(["git", "check-ignore", "-q", "edgeadapt-demo/bundle/state.safetensors"], cwd=ROOT)
    assert result.returncode == 0
