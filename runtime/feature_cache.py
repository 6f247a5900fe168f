"""Prefix outputs kept on disk and memory-mapped, so only the first epoch (or the first run) pays for the prefix.

Keys: each sample's content hash, within a namespace derived from the prefix model's sha256, the preprocessing
(the manifest's input spec) and the backend (an INT8 or NPU prefix gives other features). Policy: one namespace
per bundle folder is kept (creating one deletes the others); a namespace holds at most `max_bytes`; a dataset whose
features would exceed it is computed once per run and held in memory instead, with a note. Augmentation makes
cached features wrong, so the trainer bypasses the cache then (and says so)."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from edgeadapt.runtime.atomic import atomic_write, atomic_write_text

DEFAULT_MAX_BYTES = 2 * 1024**3


def namespace(prefix_sha256: str, input_spec, backend: str) -> str:
    material = json.dumps({"prefix": prefix_sha256, "input": asdict(input_spec), "backend": backend}, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:20]


def sample_keys(samples: np.ndarray) -> list[str]:
    return [hashlib.sha256(np.ascontiguousarray(s).tobytes()).hexdigest() for s in samples]


class FeatureCache:
    def __init__(self, root: Path, space: str, max_bytes: int = DEFAULT_MAX_BYTES):
        self.folder = Path(root) / space
        self.max_bytes = max_bytes
        self.notes: list[str] = []
        if Path(root).is_dir():
            for other in Path(root).iterdir():
                if other.is_dir() and other.name != space:
                    shutil.rmtree(other, ignore_errors=True)  # another prefix/preprocessing: invalid now
        self.folder.mkdir(parents=True, exist_ok=True)

    def _load(self) -> tuple[dict[str, int], np.ndarray | None]:
        index_file, data_file = self.folder / "index.json", self.folder / "features.npy"
        if not (index_file.is_file() and data_file.is_file()):
            return {}, None
        try:
            return json.loads(index_file.read_text()), np.load(data_file, mmap_mode="r")
        except (ValueError, OSError):
            return {}, None  # a damaged cache is only a cache: recompute

    def features(self, samples: np.ndarray, compute: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Features of `samples`, computing (with `compute`, on raw samples) only the ones not cached."""
        keys = sample_keys(samples)
        index, stored = self._load()
        first: dict[str, int] = {}
        for position, key in enumerate(keys):
            first.setdefault(key, position)
        missing = [key for key in first if key not in index]
        if missing:
            fresh = compute(samples[[first[key] for key in missing]])
            index, stored = self._store(index, stored, missing, fresh)
        if stored is None:  # over the size limit: served from memory for this run
            return self._memory[[self._memory_index[k] for k in keys]]
        return np.asarray(stored[[index[k] for k in keys]])

    def _store(self, index, stored, new_keys, fresh):
        existing = 0 if stored is None else len(stored)
        total_bytes = (existing + len(fresh)) * fresh[0].nbytes
        if total_bytes > self.max_bytes:
            self.notes.append(f"feature cache limit {self.max_bytes >> 20} MB reached: features held in memory")
            previous = np.asarray(stored) if stored is not None else fresh[:0]
            self._memory = np.concatenate([previous, fresh])
            self._memory_index = {**index, **{k: existing + i for i, k in enumerate(new_keys)}}
            return self._memory_index, None
        combined = fresh if stored is None else np.concatenate([np.asarray(stored), fresh])
        atomic_write(self.folder / "features.npy", lambda tmp: _save_array(tmp, combined))
        index = {**index, **{k: existing + i for i, k in enumerate(new_keys)}}
        atomic_write_text(self.folder / "index.json", json.dumps(index))
        return index, np.load(self.folder / "features.npy", mmap_mode="r")


def _save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:  # a handle: np.save would append ".npy" to a temp file's name
        np.save(fh, array)
