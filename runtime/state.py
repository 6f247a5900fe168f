"""The one owner of trained state: `state.safetensors` in the bundle is the single source of truth for the
trainable parameters, the optimizer state and the training progress, whatever engine trained it and whether the
run was whole-graph or split. Named tensors, no pickle; written atomically (temp file, fsync, rename), so a power
cut leaves the old or the new state, never a mix.

Tensors: `params/<name>` for every trainable parameter (the manifest's layout), `optimizer/<key>` for the engine's
optimizer state (AdamW moments as `optimizer/adam_m`, …; ONNX Runtime training's own checkpoint as bytes),
`statistics/<name>` for the BN running statistics, `best/<name>` for the run's best validation parameters.
Metadata: `edgeadapt.progress` (JSON, with this run's epoch log lines), `edgeadapt.bundle_id`, and the device's
authentication `edgeadapt.device_mac` (absent in the exported state, which the manifest's hash covers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeadapt.runtime.atomic import atomic_write
from edgeadapt.runtime.errors import BundleError, TrainingError
from edgeadapt.runtime.manifest import Manifest

STATE_FILE = "state.safetensors"
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
    run_id: str = ""  # ties this run's train_log.jsonl lines to it
    records: list = field(default_factory=list)  # this run's epoch log lines, committed with the state


@dataclass
class TrainState:
    """Trainable parameters as one flat float32 vector (manifest layout), the optimizer state, the progress."""

    params: np.ndarray
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)
    progress: Progress | None = None
    statistics: np.ndarray | None = None  # BN running statistics (manifest layout): frozen in training, AdaBN's
    best: np.ndarray | None = None  # the run's best validation parameters (early stopping), saved with the state

    def carried(self, params: np.ndarray | None = None) -> "TrainState":
        """A fresh state (no optimizer, no progress) with `params` (default: these) and these statistics."""
        return TrainState(self.params if params is None else params, statistics=self.statistics)


# ---- safetensors, in numpy ------------------------------------------------------------------------------------
# A device-written state file carries `edgeadapt.device_mac` in its metadata: the device's HMAC over the file as it
# would be without that entry (see signing.DeviceSeal), so the file and its authentication change in one rename.

MAC_KEY = "edgeadapt.device_mac"


def _header(tensors: dict[str, dict], metadata: dict[str, str]) -> bytes:
    text = json.dumps({"__metadata__": metadata, **tensors}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _layout(tensors: dict[str, np.ndarray]) -> tuple[dict[str, dict], list[np.ndarray]]:
    info, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        array = np.asarray(array, order="C")  # (ascontiguousarray would turn a scalar into shape (1,))
        info[name] = {"dtype": _NAMES[array.dtype.str], "shape": list(array.shape),
                      "data_offsets": [offset, offset + array.nbytes]}
        blobs.append(array)
        offset += array.nbytes
    return info, blobs


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str], seal=None) -> None:
    """Write a safetensors file; with a `seal` (signing.DeviceSeal), authenticated by this device."""
    info, blobs = _layout(tensors)
    if seal is not None:
        body = [memoryview(b).cast("B") if b.size else b"" for b in blobs]
        metadata = {**metadata, MAC_KEY: seal.tag("state", _header(info, metadata), *body)}
    with open(path, "wb") as fh:
        fh.write(_header(info, metadata))
        for blob in blobs:
            fh.write(blob.tobytes() if blob.size else b"")


def decode_safetensors(data: bytes, source: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and metadata; any malformed file is a BundleError (never a crash or a huge allocation)."""
    try:
        header, metadata, body = _split(data)
        tensors = {name: _tensor(body, info) for name, info in header.items()}
    except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError, OverflowError) as exc:
        raise BundleError(f"state file {source} cannot be read ({exc}); it is truncated or corrupt: re-export the "
                          "bundle (or copy its state file again).") from None
    return tensors, metadata


def _split(data: bytes) -> tuple[dict, dict, memoryview]:
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(_MAX_HEADER, len(data) - 8):
        raise ValueError("header length out of range")
    header = json.loads(data[8:8 + length])
    if not isinstance(header, dict):
        raise ValueError("the header is not an object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("the metadata is not a map of strings")
    return header, metadata, memoryview(data)[8 + length:]


def device_authenticated(data: bytes, seal) -> bool:
    """Whether the state file `data` carries a valid HMAC by this device (`seal`, a signing.DeviceSeal)."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + length])
        metadata = header.get("__metadata__") or {}
        tag = metadata.pop(MAC_KEY, None)
        canonical = _header({k: v for k, v in header.items() if k != "__metadata__"}, metadata)
    except (ValueError, TypeError, AttributeError, struct.error, UnicodeDecodeError):
        return False
    return seal.valid("state", tag, canonical, memoryview(data)[8 + length:])


def _tensor(body: memoryview, info: dict) -> np.ndarray:
    begin, end = info["data_offsets"]
    dtype = np.dtype(_DTYPES[info["dtype"]])
    shape = [int(d) for d in info["shape"]]
    if any(d < 0 for d in shape) or not 0 <= begin <= end <= len(body) or \
            end - begin != dtype.itemsize * math.prod(shape):
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


def save_state(path: Path, state: TrainState, manifest: Manifest, bundle_id: str, seal=None) -> None:
    """Atomically write `state` (its best parameters too: one rename commits both) to `path`; with a `seal`,
    authenticated by this device."""
    layout = manifest.portable.layout
    tensors = {f"params/{name}": value for name, value in named_parameters(state.params, layout).items()}
    tensors.update({f"optimizer/{k}": v for k, v in state.optimizer.items()})
    if state.statistics is not None:
        tensors.update({f"statistics/{name}": value for name, value in
                        named_parameters(state.statistics, manifest.portable.statistics).items()})
    if state.best is not None:
        tensors.update({f"best/{name}": value for name, value in named_parameters(state.best, layout).items()})
    metadata = {"edgeadapt.bundle_id": bundle_id, "format": "pt"}
    if state.progress is not None:
        metadata["edgeadapt.progress"] = json.dumps(dataclasses.asdict(state.progress))
    atomic_write(path, lambda tmp: write_safetensors(tmp, tensors, metadata, seal))


def decode_state(data: bytes, manifest: Manifest, bundle_id: str, source: str) -> TrainState:
    """A TrainState from the bytes of a state file of this bundle's layout (BundleError when it is not one)."""
    tensors, metadata = decode_safetensors(data, source)
    owner = metadata.get("edgeadapt.bundle_id")
    if owner not in (None, bundle_id):
        raise BundleError(f"state file {source} belongs to another bundle; copy this bundle's state file again or "
                          "re-export.")
    params = _gather(tensors, "params", manifest.portable.layout, source)
    statistics = _gather(tensors, "statistics", manifest.portable.statistics, source) \
        if manifest.portable.statistics else None
    best = _gather(tensors, "best", manifest.portable.layout, source) \
        if any(k.startswith("best/") for k in tensors) else None
    optimizer = {k[len("optimizer/"):]: v for k, v in tensors.items() if k.startswith("optimizer/")}
    return TrainState(params, optimizer, _progress(metadata.get("edgeadapt.progress"), source), statistics, best)


def _gather(tensors: dict, group: str, layout, path: str) -> np.ndarray:
    found = {p.name: tensors[f"{group}/{p.name}"] for p in layout
             if f"{group}/{p.name}" in tensors and tensors[f"{group}/{p.name}"].dtype == np.float32}
    return flatten(found, layout, lambda p: BundleError(
        f"state file {path} lacks {group} tensor {p.name} of shape {p.shape}; copy the bundle's state file again "
        "or re-export the bundle."))


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


def _progress(text: str | None, source: str) -> Progress | None:
    if text is None:
        return None
    try:
        values = json.loads(text)
        progress = Progress(**values)
    except (TypeError, ValueError):
        raise BundleError(f"state file {source} has unreadable progress; start a new run (without --resume) or "
                          "re-export the bundle.") from None
    return progress


RECORDED_SINCE = {"accumulate": 1}  # settings that runs of older releases did not record, with the value they had


def resumable(progress: Progress | None, run_config: dict) -> Progress:
    if progress is None or progress.finished:
        raise TrainingError("nothing to resume: the bundle has no unfinished run; start one without --resume.")
    stored = {**RECORDED_SINCE, **json.loads(progress.run_config)}
    changed = [k for k in run_config if stored.get(k) != run_config[k]]
    if changed:
        raise TrainingError(f"--resume needs the interrupted run's settings, but {', '.join(changed)} changed "
                            f"(was {', '.join(f'{k}={stored.get(k)}' for k in changed)}); use them or start anew.")
    return progress

