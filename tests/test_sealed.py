"""The sealed bundle, tried as an attacker and as an unlucky user would. Every refusal is one line with exit 2 and
leaves every bundle file's sha256 as it was; where a case points at a file outside the bundle, that file is a FIFO
whose opening this test would see, and it must never be opened."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from onnx import TensorProto, helper

from conftest import run_cli
from edgeadapt.runtime.bundle import Bundle

# ---- helpers ---------------------------------------------------------------------------------------------------

def cli(*args) -> tuple[int, str, str]:
    """The `edgeadapt` command in this process (fast): exit code, stdout, stderr."""
    from edgeadapt.cli import main

    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["edgeadapt", *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def refused(result, *fragments) -> str:
    code, out, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, out, err)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def edit_manifest(bundle: Path, change) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def rehash(bundle: Path, name: str) -> None:
    """What an attacker without the signing key does after editing a file: update its hash and size."""
    def change(m):
        m["files"][name] = hashlib.sha256((bundle / name).read_bytes()).hexdigest()
        m.setdefault("sizes", {})[name] = (bundle / name).stat().st_size
    edit_manifest(bundle, change)


def edit_graph(bundle: Path, name: str, change) -> None:
    model = onnx.load(str(bundle / name), load_external_data=False)
    change(model)
    (bundle / name).write_bytes(model.SerializeToString())
    rehash(bundle, name)


class Watched:
    """A FIFO outside the bundle: `opened` turns true the moment any process opens it for reading."""

    def __init__(self, path: Path):
        self.path, self.opened, self._done = path, False, False
        os.mkfifo(path)
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self._thread.start()

    def _wait(self):
        fd = os.open(self.path, os.O_WRONLY)  # blocks until a reader opens it
        if not self._done:
            self.opened = True
            with contextlib.suppress(OSError):
                os.write(fd, b"\0" * 4096)
        os.close(fd)

    def close(self) -> bool:
        self._done = True
        with contextlib.suppress(OSError):
            os.close(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK))  # release the writer
        self._thread.join(5)
        return self.opened


ONE_GROUP = {"backbone_lr_ratio": 1.0, "decay_norms": True}


@pytest.fixture
def mlp(fresh_bundle):
    return fresh_bundle("tiny_mlp", "full")


@pytest.fixture
def split_bundle(fresh_bundle):
    return fresh_bundle("tiny_cnn", "head", input_size=(16,))


@pytest.fixture
def outside(tmp_path):
    watched = Watched(tmp_path / "outside")
    yield watched
    assert not watched.close(), "a file outside the bundle was opened"


# ---- 1. nothing outside the bundle is read ----------------------------------------------------------------------

def _external(location: str):
    def change(model):
        if not model.graph.initializer:  # ORT training's graphs take their weights from the checkpoint
            model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(4, np.float32), "planted"))
        init = model.graph.initializer[0]
        init.ClearField("raw_data")
        del init.float_data[:]
        init.data_location = TensorProto.EXTERNAL
        entry = init.external_data.add()
        entry.key, entry.value = "location", location
    return change


@pytest.mark.rule("S3")
@pytest.mark.rule("S2")
@pytest.mark.parametrize("graph, command", [
    ("forward.onnx", ["predict", "{b}", "{test}"]),
    ("forward.onnx", ["evaluate", "{b}", "{test}"]),
    ("forward.onnx", ["deploy", "{b}", "--format", "onnx", "--out", "{tmp}/m.onnx"]),
    ("train_step.onnx", ["train", "{b}", "{train}", "--epochs", "1", "--quiet"]),
    pytest.param("eval_model.onnx", ["train", "{b}", "{train}", "--epochs", "1", "--quiet", "--engine", "ort-training"],
                 marks=pytest.mark.ort_training),
])
@pytest.mark.parametrize("absolute", [True, False])
def test_external_data_is_refused_and_never_followed(fresh_bundle, digits, tmp_path, outside, graph, command, absolute):
    # ORT training's optimizer applies one rate and decay to all tensors: its bundles are exported as one group
    mlp = fresh_bundle("tiny_mlp", "full", **(ONE_GROUP if graph == "eval_model.onnx" else {}))
    location = str(outside.path) if absolute else os.path.relpath(outside.path, mlp)
    edit_graph(mlp, graph, _external(location))
    before = snapshot(mlp)
    args = [a.format(b=mlp, test=digits["test"], train=digits["train"], tmp=tmp_path) for a in command]
    refused(cli(*args), "external files")
    assert snapshot(mlp) == before and not (tmp_path / "m.onnx").exists()


@pytest.mark.rule("S3")
@pytest.mark.parametrize("backbone, preset", [("tiny_cnn", "head"), ("tiny_bert", "lora:2")])
def test_the_wire_reader_sees_each_graph_as_onnx_does_and_refuses_a_cut_one(bundle_factory, backbone, preset):
    """What the device's own protobuf reader (runtime/onnx_wire.py, no `onnx` package) says a graph reads and runs
    equals what the `onnx` package parses, for every graph of an image and a text bundle; a graph cut anywhere
    inside its GraphProto is malformed, never read as a smaller graph."""
    from edgeadapt.runtime.onnx_wire import graph_interface

    bundle = bundle_factory(backbone, preset, input_size=(16,))
    graphs = sorted(bundle.glob("*.onnx"))
    assert len(graphs) >= 4
    for path in graphs:
        data = path.read_bytes()
        model, seen = onnx.load_from_string(data), graph_interface(data)
        dims = lambda value: tuple(d.dim_value if d.HasField("dim_value") else -1  # noqa: E731
                                   for d in value.type.tensor_type.shape.dim)
        assert {v.name: dims(v) for v in model.graph.input} == {n: d for n, (_, d) in seen.inputs.items()}, path
        assert {v.name: dims(v) for v in model.graph.output} == {n: d for n, (_, d) in seen.outputs.items()}, path
        assert seen.initializers == {i.name for i in model.graph.initializer}, path
        assert seen.domains == {n.domain for n in model.graph.node} | {o.domain for o in model.opset_import}, path
        assert not seen.external_data
        graph = model.graph.SerializeToString()
        start = data.find(graph)  # the graph field's content
        assert start > 0, path
        for cut in np.linspace(start + 1, start + len(graph) - 1, 25).astype(int):
            with pytest.raises(ValueError):
                graph_interface(data[:cut])


@pytest.mark.rule("S1")
@pytest.mark.parametrize("field, value", [
    ("portable.forward", "../outside"), ("portable.forward", "{outside}"), ("portable.train_step", "../outside"),
    ("portable.statistics_graph", "{outside}"), ("portable.state_file", "../outside"),
    ("files", "../../etc/passwd"), ("files", "{outside}"), ("files", "sub/forward.onnx"), ("files", ".hidden"),
])
def test_manifest_file_names_must_be_plain_names_inside(mlp, digits, outside, field, value):
    value = value.format(outside=outside.path)

    def change(m):
        if field == "files":
            m["files"][value] = "0" * 64
        else:
            section, key = field.split(".")
            m[section][key] = value
    edit_manifest(mlp, change)
    before = snapshot(mlp)
    refused(cli("predict", mlp, digits["test"]), "not a plain name")
    refused(cli("train", mlp, digits["train"], "--quiet"), "not a plain name")
    assert snapshot(mlp) == before


@pytest.mark.rule("S1")
@pytest.mark.parametrize("field", ["prefix_model", "suffix_prefix"])
def test_split_file_names_must_be_plain_names_inside(split_bundle, digit_image_npz, outside, field):
    edit_manifest(split_bundle, lambda m: m["split"].__setitem__(field, str(outside.path)))
    before = snapshot(split_bundle)
    refused(cli("train", split_bundle, digit_image_npz, "--quiet"), "not a plain name")
    assert snapshot(split_bundle) == before


@pytest.mark.rule("S2")
@pytest.mark.parametrize("name", ["forward.onnx", "state.safetensors", "manifest.json"])
def test_links_out_of_the_bundle_are_never_followed(mlp, digits, outside, name):
    (mlp / name).unlink()
    (mlp / name).symlink_to(outside.path)
    refused(cli("predict", mlp, digits["test"]), "plain files only")


@pytest.mark.rule("S2")
def test_a_fifo_inside_the_bundle_does_not_hang(mlp, digits):
    (mlp / "forward.onnx").unlink()
    os.mkfifo(mlp / "forward.onnx")
    refused(cli("predict", mlp, digits["test"]), "not a regular file")


@pytest.mark.rule("S1")
def test_a_read_graph_must_be_listed_and_hashed(mlp, digits):
    edit_manifest(mlp, lambda m: m["files"].pop("forward.onnx"))
    refused(cli("predict", mlp, digits["test"]), "not listed")


@pytest.mark.rule("S9")
def test_a_modified_graph_is_refused_without_a_trusted_key_too(mlp, digits):
    data = bytearray((mlp / "forward.onnx").read_bytes())
    data[-1] ^= 1  # same size, other bytes
    (mlp / "forward.onnx").write_bytes(bytes(data))
    before = snapshot(mlp)
    refused(cli("predict", mlp, digits["test"]), "does not match the sha256")
    assert snapshot(mlp) == before


# ---- 2. nothing unverified is trusted --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def signed_template(tmp_path_factory):
    root = tmp_path_factory.mktemp("signed")
    assert cli("keygen", root / "key")[0] == 0
    assert cli("export", "tiny_mlp", "--classes", "10", "--trainable", "full", "--sign", root / "key", "--out",
               root / "bundle", "--no-validate")[0] == 0
    return root


@pytest.fixture
def signed(signed_template, tmp_path):
    shutil.copytree(signed_template / "bundle", tmp_path / "signed")
    return tmp_path / "signed", signed_template / "key.pub"


def _foreign_state(bundle: Path) -> None:
    """Another state of the same layout (all zeros: every input maps to one class), written by no device."""
    from edgeadapt.runtime.state import write_safetensors

    opened = Bundle.open(bundle)
    tensors = {f"params/{p.name}": np.zeros(p.shape, np.float32) for p in opened.manifest.portable.layout}
    write_safetensors(bundle / "state.safetensors", tensors, {"edgeadapt.bundle_id": opened.bundle_id})


@pytest.mark.rule("S8")
@pytest.mark.rule("S9")
@pytest.mark.parametrize("command", [["predict", "{b}", "{test}"], ["evaluate", "{b}", "{test}"],
                                     ["train", "{b}", "{train}", "--quiet"], ["deploy", "{b}", "--out", "{tmp}/m/"],
                                     ["inspect", "{b}"]])
def test_signed_bundle_refuses_state_nobody_signed_or_trained(signed, digits, tmp_path, command):
    bundle, public = signed
    _foreign_state(bundle)
    before = snapshot(bundle)
    args = [a.format(b=bundle, test=digits["test"], train=digits["train"], tmp=tmp_path) for a in command]
    if command[0] == "inspect":
        assert cli(*args)[0] == 0  # without a trusted key: a state of the right layout is usable
        return
    refused(cli(*args, "--trusted-key", public), "neither the exported state nor one this device trained")
    assert snapshot(bundle) == before and not (tmp_path / "m").exists()


@pytest.mark.rule("S6")
@pytest.mark.rule("S7")
def test_signed_bundle_trains_on_and_its_device_state_is_trusted(signed, digits, tmp_path):
    bundle, public = signed
    assert cli("train", bundle, digits["csv"], "--epochs", "1", "--quiet", "--trusted-key", public)[0] == 0
    assert cli("train", bundle, digits["csv"], "--epochs", "1", "--quiet", "--trusted-key", public)[0] == 0
    assert cli("evaluate", bundle, digits["test"], "--trusted-key", public)[0] == 0


@pytest.mark.rule("S7")
@pytest.mark.rule("S8")
def test_state_trained_by_another_device_is_refused_under_a_trusted_key(signed, digits, tmp_path, monkeypatch):
    bundle, public = signed
    monkeypatch.setenv("EDGEADAPT_DEVICE_KEY", str(tmp_path / "other-device.key"))
    assert cli("train", bundle, digits["csv"], "--epochs", "1", "--quiet")[0] == 0
    monkeypatch.undo()
    refused(cli("predict", bundle, digits["test"], "--trusted-key", public), "no valid device authentication")


@pytest.mark.rule("S7")
def test_a_device_key_inside_the_bundle_is_refused(mlp, digits, monkeypatch):
    monkeypatch.setenv("EDGEADAPT_DEVICE_KEY", str(mlp / "device.key"))
    before = snapshot(mlp)
    refused(cli("train", mlp, digits["csv"], "--epochs", "1", "--quiet"), "lies inside the bundle")
    assert snapshot(mlp) == before


@pytest.mark.rule("S6")
def test_tampered_signature_or_manifest_is_refused(signed, digits):
    bundle, public = signed
    (bundle / "manifest.sig").write_text("AAAA\n")
    refused(cli("predict", bundle, digits["test"], "--trusted-key", public), "does not match")


@pytest.mark.rule("S8")
def test_planted_int8_prefix_is_refused_under_a_trusted_key(tmp_path, digit_image_npz):
    assert cli("keygen", tmp_path / "key")[0] == 0
    bundle = tmp_path / "b"
    assert cli("export", "tiny_cnn", "--classes", "10", "--input-size", "16", "--sign", tmp_path / "key", "--out",
               bundle, "--no-validate")[0] == 0
    shutil.copy(bundle / "prefix.onnx", bundle / "prefix_int8.onnx")  # not computed (nor authenticated) here
    before = snapshot(bundle)
    refused(cli("train", bundle, digit_image_npz, "--prefix-int8", "--quiet", "--trusted-key",
                tmp_path / "key.pub"), "not computed on this device")
    assert snapshot(bundle) == before


@pytest.mark.rule("S8")
def test_planted_feature_cache_is_never_used(split_bundle, digit_image_npz, tmp_path):
    """Features an attacker wrote (an index without this device's authentication) are recomputed, not used."""
    reference = tmp_path / "reference"
    shutil.copytree(split_bundle, reference)
    assert cli("train", split_bundle, digit_image_npz, "--epochs", "1", "--quiet")[0] == 0
    for folder in (split_bundle / "feature_cache").iterdir():
        record = json.loads((folder / "index.json").read_text())
        features = np.load(folder / "features.npy")
        np.save(folder / "features.npy", np.zeros_like(features))  # poisoned features, same keys
        (folder / "index.json").write_text(json.dumps(record))
    assert cli("train", split_bundle, digit_image_npz, "--epochs", "1", "--quiet")[0] == 0
    assert cli("train", reference, digit_image_npz, "--epochs", "1", "--quiet")[0] == 0
    assert cli("train", reference, digit_image_npz, "--epochs", "1", "--quiet")[0] == 0
    assert (Bundle.open(split_bundle).load_state().params == Bundle.open(reference).load_state().params).all()


@pytest.mark.rule("S8")
def test_corrupt_feature_cache_index_is_only_a_cache(split_bundle, digit_image_npz):
    assert cli("train", split_bundle, digit_image_npz, "--epochs", "1", "--quiet")[0] == 0
    for index in (split_bundle / "feature_cache").glob("*/index.json"):
        index.write_text('{"index": "{\\"a\\": 99999}", "mac": "00"}')
    code, out, err = cli("train", split_bundle, digit_image_npz, "--epochs", "1")
    assert code == 0 and "recomputed" in out, out + err


@pytest.mark.rule("S5")
def test_planted_best_state_is_never_read(mlp, digits, tmp_path):
    """An early-stopped run ends on its own best parameters, whatever a state.best.safetensors beside it says."""
    reference = tmp_path / "reference"
    shutil.copytree(mlp, reference)
    _foreign_state(mlp)
    (mlp / "state.safetensors").rename(mlp / "state.best.safetensors")
    shutil.copy(reference / "state.safetensors", mlp / "state.safetensors")
    for bundle in (mlp, reference):
        assert cli("train", bundle, digits["train"], "--epochs", "3", "--patience", "1", "--quiet")[0] == 0
    assert (Bundle.open(mlp).load_state().params == Bundle.open(reference).load_state().params).all()


def test_every_sealed_bundle_rule_is_checked_by_a_test():
    """Each rule of COMPATIBILITY.md's sealed-bundle section is named by a test's `rule` mark."""
    root = Path(__file__).resolve().parents[1]
    documented = set(re.findall(r"\*\*(S\d+)\*\*", (root / "runtime" / "COMPATIBILITY.md").read_text()))
    marked = set()
    for test in (root / "tests").glob("test_*.py"):
        marked |= set(re.findall(r'mark\.rule\("(S\d+)"\)', test.read_text()))
    assert len(documented) >= 13 and documented == marked, (documented - marked, marked - documented)


# ---- 3. archives -----------------------------------------------------------------------------------------------

def _archive(path: Path, members: list[tuple[str, bytes | None, dict]]) -> Path:
    with tarfile.open(path, "w:gz", format=tarfile.GNU_FORMAT) as tar:
        for name, data, extra in members:
            info = tarfile.TarInfo(name)
            info.size = len(data) if data is not None else 0
            for key, value in extra.items():
                setattr(info, key, value)
            if data is None and info.isreg() and info.size:  # a header that claims data it never brings
                header = info.tobuf(tar.format, tar.encoding, tar.errors)  # (tarfile >= 3.13 refuses to write one)
                tar.fileobj.write(header)
                tar.offset += len(header)
                continue
            tar.addfile(info, io.BytesIO(data) if data is not None and info.isreg() else None)
    return path


def _members(bundle: Path) -> list[tuple[str, bytes, dict]]:
    names = ["manifest.json"] + sorted(json.loads((bundle / "manifest.json").read_text())["files"])
    return [(name, (bundle / name).read_bytes(), {}) for name in names]


@pytest.mark.rule("S10")
@pytest.mark.parametrize("mutate, fragment", [
    (lambda ms: ms + [ms[-1]], "twice"),
    (lambda ms: ms + [("train.lock", b"1", {})], "does not list"),
    (lambda ms: ms + [("state.best.safetensors", ms[-1][1], {})], "does not list"),
    (lambda ms: ms + [("prefix_int8.onnx", b"x", {})], "does not list"),
    (lambda ms: ms + [(f"e{i}", b"", {}) for i in range(20000)], "does not list"),
    (lambda ms: ms[1:] + ms[:1], "does not start with manifest.json"),
    (lambda ms: [m for m in ms if m[0] != "forward.onnx"], "lacks"),
    (lambda ms: ms[:1] + [(ms[1][0], ms[1][1] + b"x", {})] + ms[2:], "more than"),
    (lambda ms: ms[:1] + [(ms[1][0], b"y" * len(ms[1][1]), {})] + ms[2:], "sha256 differs"),
    (lambda ms: ms[:1] + [("forward.onnx", None, {"size": 1 << 30})], "more than"),
    (lambda ms: ms[:1] + [("forward.onnx", None, {"type": tarfile.GNUTYPE_SPARSE, "size": 0})], "sparse"),
    (lambda ms: ms[:1] + [("../escape", b"x", {})], "plain name"),
    (lambda ms: ms[:1] + [("forward.onnx", None, {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"})], "link"),
])
def test_unpack_accepts_exactly_the_manifest_files(mlp, tmp_path, mutate, fragment):
    archive = _archive(tmp_path / "evil.tar.gz", mutate(_members(mlp)))
    started = time.monotonic()
    refused(cli("unpack", archive, tmp_path / "out"), fragment)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*")) and not (tmp_path / "escape").exists()
    assert time.monotonic() - started < 20  # streamed and bounded: nothing is read whole


@pytest.mark.rule("S10")
@pytest.mark.rule("S11")
def test_unpack_round_trip_and_stale_staging_is_swept(mlp, tmp_path):
    assert cli("pack", mlp, tmp_path / "b.tar.gz")[0] == 0
    stale = tmp_path / f".copy.staging-{2**22 + 7}"  # a killed unpack's folder (no such pid)
    stale.mkdir()
    (stale / "state.safetensors").write_bytes(b"x")
    assert cli("unpack", tmp_path / "b.tar.gz", tmp_path / "copy")[0] == 0
    assert snapshot(tmp_path / "copy") == {k: v for k, v in snapshot(mlp).items() if k != "train_log.jsonl"}
    assert not stale.exists()


@pytest.mark.rule("S10")
@pytest.mark.ort_training  # what an app pack leaves out: ORT training's artifacts
def test_an_app_pack_leaves_out_only_ort_trainings_artifacts(split_bundle, tmp_path, digit_image_npz):
    from edgeadapt.runtime.manifest import ort_training_files

    manifest = Bundle.open(split_bundle).manifest
    left_out = set(ort_training_files(manifest))
    assert {"training_model.onnx", "checkpoint", "suffix_training_model.onnx", "suffix_checkpoint"} <= left_out
    assert cli("pack", split_bundle, tmp_path / "app.tar.gz", "--for", "app")[0] == 0
    assert cli("pack", split_bundle, tmp_path / "all.tar.gz")[0] == 0
    with tarfile.open(tmp_path / "app.tar.gz") as tar:
        assert tar.getnames() == ["manifest.json"] + sorted(set(manifest.files) - left_out)
    assert (tmp_path / "app.tar.gz").stat().st_size < (tmp_path / "all.tar.gz").stat().st_size
    refused(cli("pack", split_bundle, tmp_path / "x.tar.gz", "--for", "phone"), "--for device or --for app")
    assert not (tmp_path / "x.tar.gz").exists()

    assert cli("unpack", tmp_path / "app.tar.gz", tmp_path / "app")[0] == 0
    app = tmp_path / "app"
    assert not any((app / name).exists() for name in left_out)
    before = snapshot(app)
    refused(cli("train", app, digit_image_npz, "--engine", "ort-training", "--epochs", "1"), "packed for apps",
            "--engine onnxruntime")
    assert snapshot(app) == before
    assert cli("train", app, digit_image_npz, "--epochs", "1", "--quiet")[0] == 0
    # an app pack's bundle is still sealed: a planted artifact must match the signed manifest's hash
    (app / "suffix_training_model.onnx").write_bytes(b"planted")
    refused(cli("evaluate", app, digit_image_npz), "suffix_training_model.onnx", "sha256")


@pytest.mark.rule("S11")
def test_unpack_force_refuses_a_bundle_being_trained(mlp, tmp_path):
    assert cli("pack", mlp, tmp_path / "b.tar.gz")[0] == 0
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (mlp / "train.lock").write_text(str(trainer.pid))
        before = snapshot(mlp)
        refused(cli("unpack", tmp_path / "b.tar.gz", mlp, "--force"), f"being trained by process {trainer.pid}")
        assert snapshot(mlp) == before
    finally:
        trainer.kill()
        trainer.wait()


# ---- 4. crash windows ------------------------------------------------------------------------------------------

@pytest.mark.rule("S12")
def test_a_failed_log_write_loses_no_epoch(mlp, digits):
    (mlp / "train_log.jsonl").mkdir()  # appending fails after the epoch's state is committed
    refused(cli("train", mlp, digits["train"], "--epochs", "3", "--quiet"), "continue with --resume")
    (mlp / "train_log.jsonl").rmdir()
    assert cli("train", mlp, digits["train"], "--epochs", "3", "--quiet", "--resume")[0] == 0
    epochs = [json.loads(line)["epoch"] for line in (mlp / "train_log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


@pytest.mark.rule("S12")
def test_a_torn_log_line_is_not_joined_to_the_next(mlp, digits):
    (mlp / "train_log.jsonl").write_text('{"epoch": 1, "torn')
    assert cli("train", mlp, digits["train"], "--epochs", "2", "--quiet")[0] == 0
    lines = (mlp / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines[1:]] == [1, 2]


@pytest.mark.rule("S12")
def test_racing_trainers_never_both_get_the_lock(tmp_path):
    import multiprocessing

    from lock_worker import take_lock_and_report

    context = multiprocessing.get_context("spawn")
    for _ in range(3):
        barrier, results = context.Barrier(4), context.Queue()
        workers = [context.Process(target=take_lock_and_report, args=(str(tmp_path / "train.lock"), barrier,
                                                                          results)) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        outcomes = [results.get(timeout=5) for _ in workers]
        held = sorted((start, end) for kind, start, end, _ in outcomes if kind == "won")
        assert held and all(own_pid for *_, own_pid in outcomes)  # a winner's lock always holds its own pid
        assert all(later[0] >= earlier[1] for earlier, later in zip(held, held[1:])), held  # never two at once


@pytest.mark.rule("S12")
@pytest.mark.parametrize("content", ["-1", "12345678901234567890", "abc", ""])
def test_a_lock_without_a_valid_pid_is_one_line(mlp, digits, content):
    (mlp / "train.lock").write_text(content)
    before = snapshot(mlp)
    refused(cli("train", mlp, digits["train"], "--quiet"), "not a process id")
    assert snapshot(mlp) == before


@pytest.mark.rule("S12")
def test_readers_see_one_state_while_a_trainer_checkpoints(mlp, digits, tmp_path):
    trainer = subprocess.Popen([sys.executable, "-m", "edgeadapt", "train", str(mlp), str(digits["train"]), "--epochs",
                                "400", "--checkpoint-every", "1", "--quiet"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        while not (mlp / "train.lock").exists():
            time.sleep(0.05)
        for i in range(8):
            result = run_cli("deploy", mlp, "--out", tmp_path / f"m{i}.onnx")
            assert result.returncode == 0, result.stderr
            assert run_cli("evaluate", mlp, digits["test"]).returncode == 0
    finally:
        trainer.kill()
        trainer.wait()


# ---- 5. sizes bounded before allocating -------------------------------------------------------------------------

@pytest.mark.rule("S13")
def test_npz_image_bomb_is_refused_from_its_header(tmp_path, fresh_bundle):
    bundle = fresh_bundle("tiny_cnn", "full", input_size=(16,))
    np.savez_compressed(tmp_path / "bomb.npz", x=np.zeros((1, 20000, 20000), np.uint8), y=np.array(["1"]))
    code = ("import re, sys\nfrom edgeadapt.cli import main\nsys.argv=['edgeadapt','train',sys.argv[1],"
            "sys.argv[2],'--quiet']\ntry:\n    main()\nexcept SystemExit as e:\n"  # VmHWM: this process's own peak
            "    print(e.code, re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
    result = subprocess.run([sys.executable, "-c", code, str(bundle), str(tmp_path / "bomb.npz")],
                            capture_output=True, text=True, timeout=120)
    exit_code, peak_kb = result.stdout.split()
    assert exit_code == "2" and "decompression bomb" in result.stderr
    assert int(peak_kb) < 600_000  # the 400 MB array was never decoded


@pytest.mark.rule("S13")
@pytest.mark.parametrize("array, fragment", [
    (np.lib.format.open_memmap, "GiB decoded"),
    (lambda path: np.save(path, np.array([{"a": 1}], dtype=object)), "Python objects"),
])
def test_npz_arrays_are_bounded_and_pickle_free(mlp, tmp_path, array, fragment):
    npy = tmp_path / "x.npy"
    if array is np.lib.format.open_memmap:  # a header that promises 8 GiB, and a few bytes: only the header is read
        with open(npy, "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (1 << 31, 1)})
            fh.write(bytes(64))
    else:
        array(npy)
    np.save(tmp_path / "y.npy", np.array(["1"]))
    import zipfile

    with zipfile.ZipFile(tmp_path / "d.npz", "w") as archive:  # stored: the header is what is read first
        archive.write(npy, "x.npy")
        archive.write(tmp_path / "y.npy", "y.npy")
    npy.unlink()
    refused(cli("train", mlp, tmp_path / "d.npz", "--quiet"), fragment)


@pytest.mark.rule("S13")
@pytest.mark.rule("S4")
@pytest.mark.parametrize("change, fragment", [
    (lambda m: m["input"].__setitem__("resize", [30000, 30000]), "over 8192"),
    (lambda m: m["input"].__setitem__("shape", [-1, 3, 30000, 30000]), "values per sample"),
    (lambda m: m["hyperparameters"].__setitem__("batch_size", 0.0), "batch_size"),
    (lambda m: m["hyperparameters"].__setitem__("batch_size", -5.0), "batch_size"),
    (lambda m: m["hyperparameters"].__setitem__("epochs", -1.0), "epochs"),
    (lambda m: m["hyperparameters"].__setitem__("lr", -1.0), "lr"),
    (lambda m: m["input"].__setitem__("std", [1e-45] * len(m["input"]["std"])), "std"),
    (lambda m: m.pop("output_name"), "output_name"),
    (lambda m: m.__setitem__("output_name", ""), "output_name"),
    (lambda m: m.__setitem__("labels", m["labels"] + ["extra"]), "outputs per sample"),
])
def test_manifest_values_no_export_writes_are_one_line(split_bundle, digit_image_npz, change, fragment):
    edit_manifest(split_bundle, change)
    before = snapshot(split_bundle)
    refused(cli("train", split_bundle, digit_image_npz, "--quiet"), fragment)
    refused(cli("predict", split_bundle, digit_image_npz), fragment)
    assert snapshot(split_bundle) == before


@pytest.mark.rule("S13")
def test_state_header_claiming_a_huge_tensor_is_one_line(mlp, digits):
    from edgeadapt.runtime.state import write_safetensors

    write_safetensors(mlp / "state.safetensors", {"params/x": np.zeros(1, np.float32)}, {})
    raw = (mlp / "state.safetensors").read_bytes().replace(b'"shape":[1]', b'"shape":[9999999999999]')
    (mlp / "state.safetensors").write_bytes(raw)
    refused(cli("predict", mlp, digits["test"]), "cannot be read")


# ---- 6. user-causable errors are one line, and change nothing ---------------------------------------------------

def _custom_op(model):
    node = model.graph.node[-1]
    node.domain = "com.evil"
    model.opset_import.append(helper.make_opsetid("com.evil", 1))


def _extra_input(model):
    model.graph.input.append(helper.make_tensor_value_info("secret", TensorProto.FLOAT, [1]))


def _float_labels(model):
    for value in model.graph.input:
        if value.name == "labels":
            value.type.tensor_type.elem_type = TensorProto.FLOAT


@pytest.mark.rule("S4")
@pytest.mark.parametrize("graph, change, fragment", [
    ("forward.onnx", _custom_op, "domain 'com.evil'"),
    ("train_step.onnx", _custom_op, "domain 'com.evil'"),
    ("forward.onnx", _extra_input, "needs the input 'secret'"),
    ("train_step.onnx", _extra_input, "needs the input 'secret'"),
    ("train_step.onnx", _float_labels, "float32 labels"),
])
def test_graphs_the_runtime_cannot_feed_are_one_line(mlp, digits, graph, change, fragment):
    edit_graph(mlp, graph, change)
    before = snapshot(mlp)
    refused(cli("train", mlp, digits["train"], "--quiet"), fragment)
    assert snapshot(mlp) == before


def test_csv_regression_target_that_is_not_a_number(bundle_factory, tmp_path):
    bundle = tmp_path / "reg"
    shutil.copytree(bundle_factory("tiny_mlp", "full", loss="mse", head=_regression_head()), bundle)
    (tmp_path / "r.csv").write_text("\n".join(",".join(["0.5"] * 64 + ["1.0", "high"]) for _ in range(4)) + "\n")
    before = snapshot(bundle)
    refused(cli("train", bundle, tmp_path / "r.csv", "--quiet"), "row 1 has a non-numeric target")
    assert snapshot(bundle) == before


def _regression_head():
    from edgeadapt.toolchain.build import HeadRequest

    return HeadRequest(labels=("y", "z"))  # two regression targets


def test_npz_with_a_0d_x(mlp, tmp_path):
    np.savez(tmp_path / "d.npz", x=np.float32(1.0), y=np.array("1"))
    refused(cli("train", mlp, tmp_path / "d.npz", "--quiet"), "one entry per sample")


def test_csv_with_a_bom_keeps_its_first_row(mlp, tmp_path):
    from edgeadapt.runtime.data import load_dataset

    rows = [",".join([f"{i / 10:.1f}"] * 64 + [str(i % 10)]) for i in range(5)]
    (tmp_path / "b.csv").write_bytes("\ufeff".encode() + "\n".join(rows).encode() + b"\n")
    assert len(load_dataset(tmp_path / "b.csv", Bundle.open(mlp).manifest)) == 5


# ---- 8. the right files, the right blame, nothing dropped silently -----------------------------------------------

@pytest.mark.parametrize("fmt, out, written", [
    ("onnx", "out/newdir/", "out/newdir/model.onnx"), ("onnx", "out/newdir", "out/newdir/model.onnx"),
    ("openvino", "out/ov/", "out/ov/model.xml"), ("openvino", "out/m.xml", "out/m.xml"),
])
def test_deploy_writes_where_asked(mlp, tmp_path, fmt, out, written):
    assert cli("deploy", mlp, "--format", fmt, "--out", f"{tmp_path}/{out}")[0] == 0
    assert (tmp_path / written).is_file()
    if fmt == "openvino":
        assert (tmp_path / written).with_suffix(".bin").is_file()


@pytest.mark.parametrize("fmt, out", [("onnx", "m.xml"), ("openvino", "m.onnx")])
def test_deploy_refuses_a_suffix_of_another_format(mlp, tmp_path, fmt, out):
    refused(cli("deploy", mlp, "--format", fmt, "--out", tmp_path / out), "does not end in")
    assert not (tmp_path / out).exists()


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("1", "2"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "imgs" / label /
                                                                                    f"{i}.png")
    (tmp_path / "imgs" / "1" / "broken.png").write_bytes(b"not a png")
    return tmp_path / "imgs"


def test_evaluate_reports_the_files_it_skipped(fresh_bundle, image_folder):
    bundle = fresh_bundle("tiny_cnn", "full", input_size=(16,))
    code, out, _ = cli("evaluate", bundle, image_folder)
    assert code == 0 and "n=24" in out and "skipped 1 unreadable" in out and "broken.png" in out
    code, out, _ = cli("evaluate", bundle, image_folder, "--json")
    assert [s["file"].endswith("broken.png") for s in json.loads(out)["skipped"]] == [True]


def test_predict_answers_for_the_good_files_and_names_the_bad_one(fresh_bundle, image_folder):
    bundle = fresh_bundle("tiny_cnn", "full", input_size=(16,))
    good = sorted((image_folder / "2").iterdir())[:2]
    code, out, _ = cli("predict", bundle, good[0], image_folder / "1" / "broken.png", good[1], "--json")
    answers = {Path(p["input"]).name: p for p in json.loads(out)}
    assert code == 0 and answers["broken.png"]["error"] and not answers["broken.png"]["top"]
    assert all(answers[g.name]["top"] for g in good)
    refused(cli("predict", bundle, image_folder / "1" / "broken.png"), "none of the 1 inputs")


@pytest.mark.ort_training
def test_overwritten_training_wheel_blames_the_install(mlp, digits):
    """onnxruntime's files over the training wheel's: the compiled core lacks training."""
    code = ("import sys\nimport edgeadapt.runtime.ort as o\no.onnxruntime_module()\n"
            "from onnxruntime.capi import _pybind_state as C\ndel C.CheckpointState\n"
            "from edgeadapt.runtime.engines import available\nprint(sorted(available()))\n"
            "from edgeadapt.cli import main\nsys.argv=['edgeadapt','train',sys.argv[1],sys.argv[2],'--engine',"
            "'ort-training','--quiet']\nmain()")
    result = subprocess.run([sys.executable, "-c", code, str(mlp), str(digits["train"])], capture_output=True,
                            text=True, timeout=120)
    assert "ort-training" not in result.stdout and result.returncode == 2
    assert "onnxruntime's files were written over it" in result.stderr and "corrupt" not in result.stderr


# ---- 9. FedProx is never silently lost -------------------------------------------------------------------------

def test_fedprox_on_ort_training_is_refused(mlp, digits):
    from edgeadapt.runtime.errors import ConfigError
    from edgeadapt.runtime.trainer import TrainConfig, Trainer

    before = snapshot(mlp)
    with pytest.raises(ConfigError, match="proximal term"):
        Trainer(mlp, TrainConfig(engine="ort-training", proximal_mu=0.1)).fit(digits["train"])
    assert snapshot(mlp) == before



def test_fedprox_on_ort_training_is_refused_by_the_fleet_in_one_line(mlp, digits):
    pytest.importorskip("flwr")
    before = snapshot(mlp)
    refused(cli("fleet", "simulate", mlp, digits["train"], "--strategy", "fedprox", "--engine", "ort-training",
                "--clients", "2", "--rounds", "1"), "proximal pull")
    assert snapshot(mlp) == before


@pytest.mark.rule("S2")
def test_links_planted_under_temp_names_are_never_written_through(mlp, digits, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    for name in (f".state.safetensors.tmp-{os.getpid()}", f".train.lock.pid-{os.getpid()}"):
        (mlp / name).symlink_to(victim)
    assert cli("train", mlp, digits["train"], "--epochs", "1", "--quiet")[0] == 0
    assert victim.read_text() == "keep me"


@pytest.mark.rule("S2")
def test_log_lock_and_cache_links_out_of_the_bundle_are_never_followed(mlp, bundle_factory, digits, digit_image_npz,
                                                                       tmp_path, outside):
    split_bundle = Path(shutil.copytree(bundle_factory("tiny_cnn", "head", input_size=(16,)), tmp_path / "split"))
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (mlp / "train_log.jsonl").symlink_to(victim)
    refused(cli("train", mlp, digits["train"], "--epochs", "1", "--quiet"), "cannot append")
    (mlp / "train_log.jsonl").unlink()
    (mlp / "train.lock").symlink_to(outside.path)
    refused(cli("train", mlp, digits["train"], "--epochs", "1", "--quiet"), "is a link")
    (split_bundle / "feature_cache").symlink_to(tmp_path, target_is_directory=True)
    assert cli("train", split_bundle, digit_image_npz, "--epochs", "1", "--quiet")[0] == 0
    assert victim.read_text() == "keep me" and (split_bundle / "feature_cache").is_dir()
    assert not (split_bundle / "feature_cache").is_symlink()
