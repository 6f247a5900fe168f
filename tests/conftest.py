"""Shared fixtures: tiny bundles exported once per session, real data, and a way to run code with torch blocked."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgeadapt.toolchain.build import HeadRequest
from edgeadapt.toolchain.export import ExportOptions, export_bundle

DIGIT_LABELS = tuple(str(i) for i in range(10))
# This suite's device key (what the trainer authenticates its state with), not the user's ~/.config one; the CLI
# subprocesses inherit it.
os.environ["EDGEADAPT_DEVICE_KEY"] = str(Path(tempfile.mkdtemp(prefix="edgeadapt-tests-")) / "device.key")


@pytest.fixture(scope="session")
def bundle_factory(tmp_path_factory):
    """export(backbone, preset, **options) -> bundle path; each distinct export runs once per session."""
    made: dict = {}

    def export(backbone: str = "tiny_cnn", preset: str = "head", **kwargs) -> Path:
        key = (backbone, preset, tuple(sorted(kwargs.items())))
        if key not in made:
            out = tmp_path_factory.mktemp("bundles") / f"{backbone}-{preset.replace(':', '')}"
            head = kwargs.pop("head", HeadRequest(labels=DIGIT_LABELS))
            made[key] = export_bundle(ExportOptions(out=out, backbone=backbone, head=head, trainable=preset,
                                                    **kwargs)).out
        return made[key]

    return export


@pytest.fixture
def fresh_bundle(bundle_factory, tmp_path):
    """A private copy of a session bundle, for tests that train or damage it."""
    import shutil

    def copy(backbone: str = "tiny_mlp", preset: str = "full", **kwargs) -> Path:
        target = tmp_path / "bundle"
        shutil.copytree(bundle_factory(backbone, preset, **kwargs), target)
        return target

    return copy


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> dict[str, Path]:
    """scikit-learn's 8×8 digits as .npz (rows for tiny_mlp) and CSV, split into train and test."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    data = load_digits()
    x, y = (data.data / 16.0).astype(np.float32), data.target
    paths = {}
    for name, part in (("train", slice(0, 1200)), ("test", slice(1200, None))):
        paths[name] = root / f"{name}.npz"
        np.savez(paths[name], x=x[part], y=y[part].astype(str))
    paths["csv"] = root / "train.csv"
    rows = ["," .join(f"p{i}" for i in range(64)) + ",label"]
    rows += [",".join(f"{v:.4f}" for v in row) + f",{label}" for row, label in zip(x[:300], y[:300])]
    paths["csv"].write_text("\n".join(rows) + "\n")
    return paths


@pytest.fixture(scope="session")
def digit_images(tmp_path_factory) -> Path:
    """The digits as a folder of class subfolders of small grayscale PNGs."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digit_images")
    data = load_digits()
    for i, (image, label) in enumerate(zip(data.images[:200], data.target[:200])):
        folder = root / str(label)
        folder.mkdir(exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return root


def run_without_torch(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where `import torch` fails, as on a device."""
    prelude = "import sys\nsys.modules['torch'] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeadapt", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).parent)


@pytest.fixture
def digit_image_npz(tmp_path) -> Path:
    """300 of the digits as uint8 8×8 images in an .npz (the runtime resizes them to the model's input)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    path = tmp_path / "digit_images.npz"
    np.savez(path, x=(digits.images[:300] * 255 / 16).astype(np.uint8), y=digits.target[:300].astype(str))
    return path
