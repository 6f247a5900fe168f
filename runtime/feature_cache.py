"""Prefix outputs kept on disk, so only the first epoch (or the first run) pays for the prefix.

Keys: each sample's content hash, within a namespace derived from the prefix model's sha256, the preprocessing
(the manifest's input spec) and the backend (an INT8 or NPU prefix gives other features). Policy: one namespace
per bundle folder is kept (creating one deletes the others); a namespace holds at most `max_bytes`; a dataset whose
features would exceed it is computed once per run and held in memory instead, with a note. Augmentation makes
cached features wrong, so the trainer bypasses the cache then (and says so). The cache is read once into memory
after its authentication is checked (never memory-mapped: the checked bytes are the bytes used)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from edgeadapt.runtime.atomic import atomic_write, atomic_write_text
from edgeadapt.runtime.bundle import read_plain
from edgeadapt.runtime.errors import BundleError

DEFAULT_MAX_BYTES = 2 * 1024**3


def namespace(prefix_sha256: str, input_spec, backend: str) -> str:
    material = json.dumps({"prefix": prefix_sha256, "input": asdict(input_spec), "backend": backend}, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:20]


def sample_keys(samples: np.ndarray) -> list[str]:
    return [hashlib.sha256(np.ascontiguousarray(s).tobytes()).hexdigest() for s in samples]


class FeatureCache:
    """`seal` (signing.DeviceSeal) authenticates what this device cached: an index whose MAC, over the namespace,
    the index and the features' sha256, does not verify — damaged, planted or from another device — is only a
    cache, and is recomputed."""

    def __init__(self, root: Path, space: str, max_bytes: int = DEFAULT_MAX_BYTES, seal=None):
        self.folder = Path(root) / space
        self.space, self.seal = space, seal
        self.max_bytes = max_bytes
        self.notes: list[str] = []
        if Path(root).is_dir() and not Path(root).is_symlink():
            for other in Path(root).iterdir():
                if other.is_dir() and other.name != space:
                    shutil.rmtree(other, ignore_errors=True)  # another prefix/preprocessing: invalid now
        elif Path(root).is_symlink() or Path(root).exists():
            Path(root).unlink()  # not a folder edgeadapt made: never follow it
        if self.folder.is_symlink() or (self.folder.exists() and not self.folder.is_dir()):
            self.folder.unlink()
        self.folder.mkdir(parents=True, exist_ok=True)

    def _tag(self, index_text: str, features_sha256: str) -> str | None:
        return None if self.seal is None else self.seal.tag("feature_cache", self.space.encode(), b"\0",
                                                            index_text.encode(), b"\0", features_sha256.encode())

    def _load(self) -> tuple[dict[str, int], np.ndarray | None]:
        index_file, data_file = self.folder / "index.json", self.folder / "features.npy"
        if not (index_file.is_file() and data_file.is_file()):
            return {}, None
        try:
            record = json.loads(read_plain(self.folder, index_file.name, 1 << 30))
            data = read_plain(self.folder, data_file.name, self.max_bytes + (1 << 20))
            if self.seal is None or not self.seal.valid(
                    "feature_cache", record["mac"], self.space.encode(), b"\0", record["index"].encode(), b"\0",
                    hashlib.sha256(data).hexdigest().encode()):
                raise ValueError("not authenticated by this device")
            stored = _array_view(data)
            index = json.loads(record["index"])
            if not isinstance(index, dict) or not all(isinstance(v, int) and 0 <= v < len(stored)
                                                      for v in index.values()):
                raise ValueError("an index entry is out of range")
        except (ValueError, OSError, KeyError, TypeError, AttributeError, BundleError):
            self.notes.append("feature cache unreadable or not authenticated: recomputed")
            return {}, None  # a damaged cache is only a cache: recompute
        return index, stored
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
            stored, index = self._memory, self._memory_index
        rows = [index[k] for k in keys]
        if rows == list(range(len(stored))):  # the whole store in its order (a first run): no copy of it
            return stored
        return stored[rows]

    def _store(self, index, stored, new_keys, fresh):
        existing = 0 if stored is None else len(stored)
        total_bytes = (existing + len(fresh)) * fresh[0].nbytes
        if total_bytes > self.max_bytes:
            self.notes.append(f"feature cache limit {self.max_bytes >> 20} MB reached: features held in memory")
            previous = np.asarray(stored) if stored is not None else fresh[:0]
            self._memory = np.concatenate([previous, fresh])
            self._memory_index = {**index, **{k: existing + i for i, k in enumerate(new_keys)}}
            return self._memory_index, None
        combined = fresh if stored is None else np.concatenate([stored, fresh])
        digest = hashlib.sha256()

        def write(tmp: Path) -> None:  # streamed in numpy's chunks: no second copy of the features in memory
            with open(tmp, "xb") as fh:
                np.save(_Hashing(fh, digest), combined)

        atomic_write(self.folder / "features.npy", write)
        index = {**index, **{k: existing + i for i, k in enumerate(new_keys)}}
        index_text = json.dumps(index)
        record = {"index": index_text, "mac": self._tag(index_text, digest.hexdigest())}
        atomic_write_text(self.folder / "index.json", json.dumps(record))
        return index, combined


class _Hashing:
    """A file object that also feeds what is written to a hash."""

    def __init__(self, fh, digest):
        self.fh, self.digest = fh, digest

    def write(self, chunk) -> int:
        self.digest.update(chunk)
        return self.fh.write(chunk)


def _array_view(data: bytes) -> np.ndarray:
    """The .npy array in `data` as a read-only view of those (authenticated) bytes, not a second copy; ValueError
    for anything but a plain C-ordered array that fills the file exactly."""
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"npy format {version}")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(stream)
    count = int(np.prod(shape))
    if fortran_order or dtype.hasobject or len(data) - stream.tell() != count * dtype.itemsize:
        raise ValueError("not a plain array of its stated size")
    return np.frombuffer(data, dtype, count, stream.tell()).reshape(shape)

