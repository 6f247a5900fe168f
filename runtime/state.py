"""The one owner of trained state: `state.safetensors` in the bundle is the single source of truth for the
trainable parameters, the optimizer state and the training progress, whatever engine trained it and whether the
run was whole-graph or split. Named tensors, no pickle; written atomically (temp file, fsync, rename), so a power
cut leaves the old or the new state, never a mix.

Tensors: `params/<name>` for every trainable parameter (the manifest's layout), `optimizer/<key>` for the engine's
optimizer state (AdamW moments as `optimizer/adam_m`, …; ONNX Runtime training's own checkpoint as bytes).
Metadata: `edgeadapt.progress` (JSON) and `edgeadapt.bundle_id`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeadapt.runtime.atomic import atomic_copy, atomic_write
from edgeadapt.runtime.errors import BundleError, TrainingError
from edgeadapt.runtime.manifest import Manifest

STATE_FILE, BEST_STATE_FILE = "state.safetensors", "state.best.safetensors"
STATISTICS_INPUT = "bn_stats"  # the graphs' input for the BN running statistics
_DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32, "U8": np.uint8}
_NAMES = {np.dtype(v).str: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 << 20


@dataclass
class Progress:
    """Where a run stands; everything `--resume` needs besides weights and optimizer state."""

    bundle_id: str
    run_config: str  # JSON of the settings a resumed run must share
    epoch: int = 0
    batch: int = 0  # next batch within `epoch`
    step: int = 0
    lr_scale: float = 1.0
    best_metric: float = float("-inf")
    best_epoch: int = -1
    bad_epochs: int = 0
    nan_events: int = 0
    finished: int = 0


@dataclass
class TrainState:
    """Trainable parameters as one flat float32 vector (manifest layout), the optimizer state, the progress."""

    params: np.ndarray
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)
    progress: Progress | None = None
    statistics: np.ndarray | None = None  # BN running statistics (manifest layout): frozen in training, AdaBN's

    def carried(self, params: np.ndarray | None = None) -> "TrainState":
        """A fresh state (no optimizer, no progress) with `params` (default: these) and these statistics."""
        return TrainState(self.params if params is None else params, statistics=self.statistics)


# ---- safetensors, in numpy ------------------------------------------------------------------------------------

def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    header, offset, blobs = {"__metadata__": metadata}, 0, []
    for name, array in tensors.items():
        array = np.asarray(array, order="C")  # (ascontiguousarray would turn a scalar into shape (1,))
        size = array.nbytes
        header[name] = {"dtype": _NAMES[array.dtype.str], "shape": list(array.shape), "data_offsets": [offset,
                                                                                                     offset + size]}
        blobs.append(array)
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        for blob in blobs:
            fh.write(blob.tobytes() if blob.size else b"")


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and metadata; any malformed file is a BundleError (never a crash or a huge allocation)."""
    try:
        data = Path(path).read_bytes()
        (length,) = struct.unpack("<Q", data[:8])
        if length > min(_MAX_HEADER, len(data) - 8):
            raise ValueError("header length out of range")
        header = json.loads(data[8:8 + length])
        metadata = header.pop("__metadata__", {}) or {}
        body = memoryview(data)[8 + length:]
        tensors = {name: _tensor(body, info) for name, info in header.items()}
    except (OSError, ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as exc:
        raise BundleError(f"state file {path} cannot be read ({exc}); it is truncated or corrupt: restore "
                          f"{BEST_STATE_FILE} or re-export the bundle.") from None
    return tensors, metadata


def _tensor(body: memoryview, info: dict) -> np.ndarray:
    begin, end = info["data_offsets"]
    dtype = np.dtype(_DTYPES[info["dtype"]])
    shape = [int(d) for d in info["shape"]]
    if not 0 <= begin <= end <= len(body) or end - begin != dtype.itemsize * int(np.prod(shape)):
        raise ValueError("tensor data out of range")
    return np.frombuffer(body[begin:end], dtype).reshape(shape).copy()


# ---- TrainState <-> file ----------------------------------------------------------------------------------------

def named_parameters(params: np.ndarray, layout) -> dict[str, np.ndarray]:
    """The flat parameter vector as one (view) tensor per trainable parameter, by name."""
    return {p.name: params[p.offset:p.offset + p.size].reshape(p.shape) for p in layout}


def optimizer_vectors(state: TrainState, names: list[str]) -> tuple[dict[str, np.ndarray], int]:
    """The portable step's optimizer state (e.g. adam_m, adam_v) from `state` — zeros for a fresh optimizer — and
    its step count."""
    zeros = np.zeros_like(state.params)
    vectors = {name: np.ascontiguousarray(state.optimizer.get(name, zeros), np.float32) for name in names}
    return vectors, int(state.optimizer.get("step", np.zeros((), np.int64)))


def save_state(path: Path, state: TrainState, manifest: Manifest, bundle_id: str) -> None:
    """Atomically write `state` to `path`."""
    tensors = {f"params/{name}": value for name, value in
               named_parameters(state.params, manifest.portable.layout).items()}
    tensors.update({f"optimizer/{k}": v for k, v in state.optimizer.items()})
    if state.statistics is not None:
        tensors.update({f"statistics/{name}": value for name, value in
                        named_parameters(state.statistics, manifest.portable.statistics).items()})
    metadata = {"edgeadapt.bundle_id": bundle_id, "format": "pt"}
    if state.progress is not None:
        metadata["edgeadapt.progress"] = json.dumps(dataclasses.asdict(state.progress))
    atomic_write(path, lambda tmp: write_safetensors(tmp, tensors, metadata))


def load_state(path: Path, manifest: Manifest, bundle_id: str) -> TrainState:
    tensors, metadata = read_safetensors(path)
    owner = metadata.get("edgeadapt.bundle_id")
    if owner not in (None, bundle_id):
        raise BundleError(f"state file {path} belongs to another bundle; restore this bundle's state or re-export.")
    params = _gather(tensors, "params", manifest.portable.layout, path)
    statistics = _gather(tensors, "statistics", manifest.portable.statistics, path) \
        if manifest.portable.statistics else None
    optimizer = {k[len("optimizer/"):]: v for k, v in tensors.items() if k.startswith("optimizer/")}
    return TrainState(params, optimizer, _progress(metadata.get("edgeadapt.progress"), path), statistics)


def _gather(tensors: dict, group: str, layout, path: Path) -> np.ndarray:
    found = {p.name: tensors[f"{group}/{p.name}"] for p in layout
             if f"{group}/{p.name}" in tensors and tensors[f"{group}/{p.name}"].dtype == np.float32}
    return flatten(found, layout, lambda p: BundleError(
        f"state file {path} lacks {group} tensor {p.name} of shape {p.shape}; restore {BEST_STATE_FILE} or "
        "re-export the bundle."))


def flatten(values: dict, layout, error) -> np.ndarray:
    """Named tensors → one flat float32 vector in `layout`; `error(p)` is raised for a missing or misshapen one."""
    flat = np.empty(sum(p.size for p in layout), np.float32)
    for p in layout:
        value = values.get(p.name)
        if value is None or list(np.shape(value)) != list(p.shape):
            raise error(p)
        flat[p.offset:p.offset + p.size] = np.asarray(value, np.float32).ravel()
    return flat


def digest(vector: np.ndarray) -> str:
    """The sha256 of a flat float32 state vector (the BN statistics' identity)."""
    return hashlib.sha256(np.ascontiguousarray(vector, np.float32).tobytes()).hexdigest()


def _progress(text: str | None, path: Path) -> Progress | None:
    if text is None:
        return None
    try:
        return Progress(**json.loads(text))
    except (TypeError, ValueError):
        raise BundleError(f"state file {path} has unreadable progress; restore {BEST_STATE_FILE} or "
                          "re-export the bundle.") from None


def read_progress(path: Path, manifest: Manifest, bundle_id: str) -> Progress | None:
    return load_state(path, manifest, bundle_id).progress if Path(path).is_file() else None


def resumable(progress: Progress | None, run_config: dict) -> Progress:
    if progress is None or progress.finished:
        raise TrainingError("nothing to resume: the bundle has no unfinished run; start one without --resume.")
    stored = json.loads(progress.run_config)
    changed = [k for k in run_config if stored.get(k) != run_config[k]]
    if changed:
        raise TrainingError(f"--resume needs the interrupted run's settings, but {', '.join(changed)} changed "
                            f"(was {', '.join(f'{k}={stored.get(k)}' for k in changed)}); use them or start anew.")
    return progress


def keep_copy(source: Path, target: Path) -> None:
    atomic_copy(source, target)
