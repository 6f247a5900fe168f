"""Reliability and security: random SIGKILLs, full disks and read-only folders, concurrent trainers, signed
bundles and safe archives. Nothing saved before a failure may change."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
from torture import torture

from conftest import run_cli
from test_errors import assert_one_line_error


def snapshot(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.slow  # CLI subprocesses; CI runs it
def test_random_sigkills_never_corrupt_or_change_the_result(bundle_factory, digit_image_npz, tmp_path):
    template = bundle_factory("tiny_cnn", "full", input_size=(16,))
    options = ["--epochs", "3", "--batch-size", "32", "--seed", "5", "--checkpoint-every", "2", "--augment"]
    tally = torture(template, digit_image_npz, options, trials=4, workdir=tmp_path, seed=1)
    assert tally.kills == 4
    assert (tally.corrupt_checkpoints, tally.lost_epochs, tally.resume_failures, tally.weight_mismatches) == \
        (0, 0, 0, 0), tally.notes


def _cli_with_failing_os(function: str, error: str, *args) -> subprocess.CompletedProcess:
    """Run the CLI with `os.<function>` failing as on a full disk or a read-only folder once training has begun."""
    code = f"""
import errno, os, sys
real = os.{function}
def failing(*a, **k):
    if any(".tmp-" in str(x) for x in a):
        raise OSError(errno.{error}, os.strerror(errno.{error}), str(a[0]))
    return real(*a, **k)
os.{function} = failing
sys.argv = ["edgeadapt", *{[str(a) for a in args]!r}]
from edgeadapt.cli import main
main()
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("error", ["ENOSPC", "EROFS", "EACCES"])
def test_failed_checkpoint_write_keeps_the_previous_state(fresh_bundle, digits, error):
    bundle = fresh_bundle()
    before = snapshot(bundle)
    result = _cli_with_failing_os("replace", error, "train", bundle, digits["train"], "--quiet")
    assert_one_line_error(result, "cannot write", "previous file is intact")
    assert snapshot(bundle) == before
    assert not list(bundle.glob(".*tmp*"))


def test_failed_deploy_write_leaves_nothing(fresh_bundle, tmp_path):
    bundle = fresh_bundle()
    result = _cli_with_failing_os("replace", "ENOSPC", "deploy", bundle, "--out", tmp_path / "model.onnx")
    assert_one_line_error(result, "cannot write")
    assert not (tmp_path / "model.onnx").exists() and not list(tmp_path.glob(".*tmp*"))


def test_second_trainer_is_refused_while_one_runs(fresh_bundle, digits):
    bundle = fresh_bundle()
    first = subprocess.Popen([sys.executable, "-m", "edgeadapt", "train", str(bundle), str(digits["train"]),
                              "--epochs", "200", "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (bundle / "train.lock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        second = run_cli("train", bundle, digits["train"], "--quiet")
        assert_one_line_error(second, f"being trained by process {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = run_cli("train", bundle, digits["train"], "--epochs", "1", "--quiet")  # stale lock: owner is gone
    assert third.returncode == 0, third.stderr


@pytest.fixture
def keys(tmp_path):
    assert run_cli("keygen", tmp_path / "key").returncode == 0
    return tmp_path / "key", tmp_path / "key.pub"


def _signed_bundle(tmp_path, key, name="signed"):
    out = tmp_path / name
    result = run_cli("export", "tiny_mlp", "--classes", "10", "--trainable", "full", "--sign", key, "--out", out,
                     "--no-validate")
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow  # CLI subprocesses; CI runs it
def test_signed_bundle_trains_with_its_key(keys, tmp_path, digits):
    bundle = _signed_bundle(tmp_path, keys[0])
    assert (bundle / "manifest.sig").is_file()
    result = run_cli("train", bundle, digits["csv"], "--epochs", "1", "--quiet", "--trusted-key", keys[1])
    assert result.returncode == 0, result.stderr


@pytest.mark.slow  # CLI subprocesses; CI runs it
def test_tampered_unsigned_and_foreign_bundles_are_refused(keys, tmp_path, digits, bundle_factory):
    import shutil

    tampered = _signed_bundle(tmp_path, keys[0], "tampered")
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["hyperparameters"]["lr"] = 0.5  # a tampered default: still a valid manifest, no longer the signed one
    (tampered / "manifest.json").write_text(json.dumps(manifest, indent=2))
    assert_one_line_error(run_cli("train", tampered, digits["csv"], "--trusted-key", keys[1]), "does not match")
    unsigned = tmp_path / "unsigned"
    shutil.copytree(bundle_factory("tiny_mlp", "full"), unsigned)
    for command in (["train", unsigned, digits["csv"]], ["evaluate", unsigned, digits["csv"]],
                    ["predict", unsigned, digits["test"]], ["deploy", unsigned, "--out", tmp_path / "m.onnx"]):
        assert_one_line_error(run_cli(*command, "--trusted-key", keys[1]), "not signed")
    assert run_cli("keygen", tmp_path / "other").returncode == 0
    foreign = _signed_bundle(tmp_path, tmp_path / "other", "foreign")
    assert_one_line_error(run_cli("evaluate", foreign, digits["csv"], "--trusted-key", keys[1]), "does not match")


def test_pack_unpack_round_trip(bundle_factory, tmp_path):
    bundle = bundle_factory("tiny_mlp", "full")
    assert run_cli("pack", bundle, tmp_path / "b.tar.gz").returncode == 0
    result = run_cli("unpack", tmp_path / "b.tar.gz", tmp_path / "copy")
    assert result.returncode == 0, result.stderr
    assert snapshot(tmp_path / "copy") == snapshot(bundle)


def _evil_archive(path, member: tarfile.TarInfo, data: bytes = b"x"):
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(member, io.BytesIO(data) if member.isreg() else None)
    return path


@pytest.mark.parametrize("make", [
    lambda: tarfile.TarInfo("../escape"),
    lambda: tarfile.TarInfo("/etc/evil"),
    lambda: tarfile.TarInfo("sub/dir"),
    lambda: _link("checkpoint", "/etc/passwd", tarfile.SYMTYPE),
    lambda: _link("checkpoint", "manifest.json", tarfile.LNKTYPE),
])
def test_malicious_archives_are_refused(tmp_path, make):
    member = make()
    if member.isreg():
        member.size = 1
    archive = _evil_archive(tmp_path / "evil.tar.gz", member)
    assert_one_line_error(run_cli("unpack", archive, tmp_path / "out"), "do not use it")
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape").exists()


def _link(name, target, kind):
    member = tarfile.TarInfo(name)
    member.type, member.linkname = kind, target
    return member


def test_device_path_never_unpickles():
    """No pickle on the device path: np.load(allow_pickle=False) only, no pickle/torch.load imports in runtime/."""
    from pathlib import Path

    runtime = Path(__file__).resolve().parents[1] / "runtime"
    for source in runtime.rglob("*.py"):
        text = source.read_text()
        assert "import pickle" not in text and "allow_pickle=True" not in text and "torch.load" not in text
    assert os.environ.get("EDGEADAPT_DEBUG") is None


@pytest.mark.rule("S12")
@pytest.mark.slow  # CLI subprocesses; CI runs it
@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_kills_at_every_commit_point_resume_to_the_same_weights_and_log(fresh_bundle, digits, tmp_path, engine):
    """Just before and after each rename of the state file (checkpoints, epoch commits with the best state and
    the log lines, the final state) and just after each log append, on both portable engines."""
    from torture import torture_commit_points

    options = ["--epochs", "2", "--batch-size", "64", "--seed", "3", "--checkpoint-every", "8", "--patience", "2",
               "--engine", engine]
    tally = torture_commit_points(fresh_bundle(), digits["csv"], options, tmp_path)
    assert tally.kills >= 10
    assert (tally.corrupt_checkpoints, tally.lost_epochs, tally.resume_failures, tally.weight_mismatches) == \
        (0, 0, 0, 0), tally.notes
