"""The bad-input matrix: every case ends in one clear line and a non-zero exit (or, where skipping is the policy,
a report of what was skipped), never a traceback, and nothing saved before changes."""

import hashlib
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.data import load_dataset
from test_errors import assert_one_line_error


def snapshot(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def image_bundle(bundle_factory, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(bundle_factory("tiny_cnn", "full", input_size=(16,)), target)
    return target


@pytest.fixture
def row_bundle(bundle_factory, tmp_path):
    target = tmp_path / "rows"
    shutil.copytree(bundle_factory("tiny_mlp", "full"), target)
    return target


def _folder(root, extra: dict[str, Image.Image] | None = None, per_class: int = 10):
    """Two classes of small RGB images, plus `extra` images (name -> image) in class '1'."""
    rng = np.random.default_rng(0)
    for label in ("1", "2"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    for name, image in (extra or {}).items():
        image.save(root / "1" / name)
    return root


CONVERTED = {
    "grayscale.png": lambda: Image.new("L", (20, 20), 128),
    "palette.png": lambda: Image.new("RGB", (20, 20), (200, 10, 10)).convert("P"),
    "rgba.png": lambda: Image.new("RGBA", (20, 20), (1, 2, 3, 100)),
    "cmyk.jpg": lambda: Image.new("CMYK", (20, 20), (10, 20, 30, 0)),
    "sixteen_bit.png": lambda: Image.fromarray(np.full((20, 20), 40000, np.uint16)),
    "one_bit.png": lambda: Image.new("1", (20, 20), 1),
}


@pytest.mark.parametrize("name", list(CONVERTED))
def test_image_modes_are_converted(image_bundle, tmp_path, name):
    folder = _folder(tmp_path / "data", {name: CONVERTED[name]()})
    data = load_dataset(folder, Bundle.open(image_bundle).manifest)
    assert len(data) == 21 and not data.skipped and data.samples.shape[1:] == (16, 16, 3)
    if name == "sixteen_bit.png":  # 40000/65535 of full scale, not clipped to white
        index = data.names.index(str(folder / "1" / name))
        assert 150 <= data.samples[index].mean() <= 160


SKIPPED = {
    "zero_bytes.png": lambda p: p.write_bytes(b""),
    "truncated.png": lambda p: p.write_bytes(_png_bytes()[:60]),
    "not_an_image.jpg": lambda p: p.write_text("hello, I am text"),
    "bomb.png": lambda p: Image.new("1", (12000, 12000)).save(p),
}


def _png_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (30, 30), (5, 5, 5)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name", list(SKIPPED))
def test_unreadable_images_are_skipped_and_reported(image_bundle, tmp_path, name):
    folder = _folder(tmp_path / "data")
    SKIPPED[name](folder / "1" / name)
    before = snapshot(image_bundle)
    data = load_dataset(folder, Bundle.open(image_bundle).manifest)
    assert len(data) == 20 and [s[0] for s in data.skipped] == [str(folder / "1" / name)]
    if name == "bomb.png":
        assert "DecompressionBomb" in data.skipped[0][1]
    result = run_cli("train", image_bundle, folder, "--epochs", "1", "--quiet")
    assert result.returncode == 0 and "skipped 1 unreadable file(s)" in result.stdout
    assert snapshot(image_bundle)["train_step.onnx"] == before["train_step.onnx"]


def test_too_many_unreadable_images_fail(image_bundle, tmp_path):
    folder = _folder(tmp_path / "data", per_class=2)
    for i in range(3):
        (folder / "1" / f"bad{i}.png").write_bytes(b"")
    before = snapshot(image_bundle)
    assert_one_line_error(run_cli("train", image_bundle, folder, "--quiet"), "cannot be read", "limit 10%")
    assert snapshot(image_bundle) == before


def _npz(path, x, y):
    np.savez(path, x=x, y=np.asarray(y))
    return path


def _csv(path, rows):
    path.write_text("\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return path


def _rows(n=6, width=64, label=lambda i: i % 3):
    return [[0.5] * width + [label(i)] for i in range(n)]


DATA_CASES = {
    "npz_nan": (lambda d: _npz(d / "a.npz", np.full((6, 64), np.nan, np.float32), ["1", "2"] * 3), "NaN"),
    "npz_inf": (lambda d: _npz(d / "a.npz", np.full((6, 64), np.inf, np.float32), ["1", "2"] * 3), "infinite"),
    "npz_wrong_shape": (lambda d: _npz(d / "a.npz", np.zeros((6, 8, 8), np.float32), ["1", "2"] * 3), "shape"),
    "npz_wrong_dtype": (lambda d: _npz(d / "a.npz", np.array([["a"] * 64] * 6), ["1", "2"] * 3), "dtype"),
    "npz_object_pickle": (lambda d: _npz(d / "a.npz", np.array([None] * 6, dtype=object), ["1"] * 6), "pickles"),
    "npz_missing_y": (lambda d: (np.savez(d / "a.npz", x=np.zeros((6, 64))), d / "a.npz")[1], "x and y"),
    "npz_length_mismatch": (lambda d: _npz(d / "a.npz", np.zeros((6, 64), np.float32), ["1", "2"]), "must match"),
    "npz_unknown_label": (lambda d: _npz(d / "a.npz", np.zeros((6, 64), np.float32), ["1", "2", "dog"] * 2),
                          "label 'dog'"),
    "npz_not_a_zip": (lambda d: (d.joinpath("a.npz").write_bytes(b"garbage"), d / "a.npz")[1], "not a readable"),
    "csv_nan": (lambda d: _csv(d / "a.csv", [[float("nan")] * 64 + [1]] + _rows()), "NaN"),
    "csv_inf": (lambda d: _csv(d / "a.csv", [["inf"] * 64 + [1]] + _rows()), "infinite"),
    "csv_wrong_columns": (lambda d: _csv(d / "a.csv", _rows(width=63)), "columns"),
    "csv_text_feature": (lambda d: _csv(d / "a.csv", _rows() + [["x"] * 64 + [1]]), "non-numeric"),
    "csv_unknown_label": (lambda d: _csv(d / "a.csv", _rows(label=lambda i: "cat" if i == 4 else i % 3)),
                          "label 'cat'"),
    "csv_empty": (lambda d: _csv(d / "a.csv", [["p"] * 64 + ["label"]]), "no usable sample"),
    "single_class": (lambda d: _csv(d / "a.csv", _rows(label=lambda i: 1)), "single class"),
    "wrong_extension": (lambda d: (d.joinpath("a.txt").write_text("1,2"), d / "a.txt")[1], "not a folder"),
    "image_folder_for_rows": (lambda d: _folder(d / "imgs"), "rows"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_matrix(row_bundle, tmp_path, case):
    make, fragment = DATA_CASES[case]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data = make(data_dir)
    before = snapshot(row_bundle)
    assert_one_line_error(run_cli("train", row_bundle, data, "--quiet"), fragment)
    assert snapshot(row_bundle) == before


BUNDLE_CASES = {
    "truncated_forward_graph": (lambda b: _truncate(b / "forward.onnx"), "sha256"),
    "truncated_state": (lambda b: _truncate(b / "state.safetensors"), "corrupt"),
    "swapped_state": (lambda b: (b / "state.safetensors").write_bytes((b / "state.safetensors").read_bytes()[::-1]),
                      "corrupt"),
    "truncated_step": (lambda b: _truncate(b / "train_step.onnx"), "sha256"),
    "manifest_not_json": (lambda b: (b / "manifest.json").write_text("{'a': 1"), "not valid JSON"),
    "manifest_not_object": (lambda b: (b / "manifest.json").write_text("[1, 2]"), "JSON object"),
    "manifest_unknown_schema": (lambda b: _edit(b, '"schema_version": 3', '"schema_version": 4'), "schema_version 4"),
    "manifest_missing_field": (lambda b: _edit(b, '"loss": "cross_entropy",', ""), "misses the field 'loss'"),
    "manifest_wrong_type": (lambda b: _edit(b, '"opset": 17', '"opset": "17"'), "opset must be int"),
    "manifest_missing": (lambda b: (b / "manifest.json").unlink(), "not an edgeadapt bundle"),
    "graph_missing": (lambda b: (b / "forward.onnx").unlink(), "misses forward.onnx"),
}


def _truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _edit(bundle, old, new):
    text = (bundle / "manifest.json").read_text()
    assert old in text
    (bundle / "manifest.json").write_text(text.replace(old, new))


@pytest.mark.slow  # CLI subprocesses; CI runs it
@pytest.mark.parametrize("case", list(BUNDLE_CASES))
def test_bad_bundle_matrix(row_bundle, digits, case):
    damage, fragment = BUNDLE_CASES[case]
    damage(row_bundle)
    before = snapshot(row_bundle)
    for command in (["train", row_bundle, digits["csv"], "--quiet"], ["evaluate", row_bundle, digits["csv"]],
                    ["deploy", row_bundle, "--out", row_bundle.parent / "m.onnx"]):
        assert_one_line_error(run_cli(*command), fragment)
    assert snapshot(row_bundle) == before
