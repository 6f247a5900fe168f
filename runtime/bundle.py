"""A bundle on disk: the manifest, the graphs it hashes, and the trained state. The one place that names a
bundle's files (whole-graph and split-suffix graphs alike)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeadapt.runtime.errors import BundleError
from edgeadapt.runtime.manifest import CHECKPOINT, EVAL_MODEL, OPTIMIZER_MODEL, TRAINING_MODEL, Manifest, sha256_file
from edgeadapt.runtime.state import BEST_STATE_FILE, STATE_FILE, read_safetensors

ORT_GRAPHS = (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL)
TRAIN_LOG = "train_log.jsonl"
LOCK_FILE = "train.lock"
FEATURE_CACHE = "feature_cache"
INT8_PREFIX = "prefix_int8.onnx"


@dataclass(frozen=True)
class GraphFiles:
    """The graphs one training target runs: the portable step and forward graph, and ORT training's artifacts."""

    input_name: str
    train_step: Path
    forward: Path
    ort_training: Path
    ort_eval: Path
    ort_optimizer: Path
    ort_checkpoint: Path


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    @classmethod
    def open(cls, path: str | Path, verify: bool = True, trusted_key: str | Path | None = None) -> "Bundle":
        """Read the manifest and check every exported file against its sha256 (the state file changes with
        training: it is checked when it is still the exported one, and structurally otherwise). With a
        `trusted_key`, the manifest must carry a valid signature by it."""
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"bundle {path} does not exist or is not a folder; create it with `edgeadapt export`.")
        if trusted_key is not None:
            from edgeadapt.runtime.signing import verify_bundle

            verify_bundle(path, Path(trusted_key))
        bundle = cls(path, Manifest.read(path))
        if verify:
            bundle.verify()
        return bundle

    def graphs(self, split: bool = False) -> GraphFiles:
        """Whole-graph files, or (split) the suffix's, which take the boundary tensor as input."""
        prefix = self.manifest.split.suffix_prefix if split else ""
        portable = self.manifest.portable
        return GraphFiles(self.manifest.split.boundary if split else self.manifest.input.name,
                          self.path / f"{prefix}{portable.train_step}", self.path / f"{prefix}{portable.forward}",
                          *(self.path / f"{prefix}{name}" for name in (*ORT_GRAPHS, CHECKPOINT)))

    def exported_files(self) -> list[str]:
        return sorted(self.manifest.files)

    def verify(self) -> None:
        for name in self.exported_files():
            file = self.path / name
            if not file.is_file():
                raise BundleError(f"bundle {self.path} misses {name}; re-export it or copy the whole bundle again.")
            if sha256_file(file) == self.manifest.files[name]:
                continue
            if name != STATE_FILE:
                raise BundleError(f"{file} does not match the sha256 in manifest.json: it was modified or corrupted; "
                                  "re-export the bundle or copy it again.")
            read_safetensors(file)  # a trained state: it must at least be a readable state file

    @property
    def state_path(self) -> Path:
        return self.path / STATE_FILE

    @property
    def best_state_path(self) -> Path:
        return self.path / BEST_STATE_FILE

    @property
    def log_path(self) -> Path:
        return self.path / TRAIN_LOG

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def prefix_path(self) -> Path:
        return self.path / self.manifest.split.prefix_model

    @property
    def int8_prefix_path(self) -> Path:
        return self.path / INT8_PREFIX

    @property
    def cache_path(self) -> Path:
        return self.path / FEATURE_CACHE

    @property
    def bundle_id(self) -> str:
        """Ties state files to this bundle's training step."""
        return self.manifest.files[self.manifest.portable.train_step][:16]
