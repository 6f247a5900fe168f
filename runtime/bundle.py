"""A bundle on disk: the manifest, the graphs it hashes, and the current checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeadapt.runtime.errors import BundleError
from edgeadapt.runtime.manifest import CHECKPOINT, EVAL_MODEL, OPTIMIZER_MODEL, TRAINING_MODEL, Manifest, sha256_file

GRAPHS = (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL)
BEST_CHECKPOINT = "checkpoint.best"
TRAIN_LOG = "train_log.jsonl"
LOCK_FILE = "train.lock"


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    @classmethod
    def open(cls, path: str | Path, verify: bool = True, trusted_key: str | Path | None = None) -> "Bundle":
        """Read the manifest and check every graph against its sha256 (the checkpoint changes with training:
        it is checked when it is still the exported one, and by ONNX Runtime's loader otherwise). With a
        `trusted_key`, the manifest must carry a valid signature by it."""
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"bundle {path} does not exist or is not a folder; create it with `edgeadapt export`.")
        if trusted_key is not None:
            from edgeadapt.runtime.signing import verify_bundle

            verify_bundle(path, Path(trusted_key))
        manifest = Manifest.read(path)
        bundle = cls(path, manifest)
        if verify:
            bundle.verify()
        return bundle

    def split_graphs(self) -> tuple[str, ...]:
        split = self.manifest.split
        if split is None:
            return ()
        return (split.prefix_model, *(split.suffix_prefix + g for g in GRAPHS))

    def verify(self) -> None:
        for name in (*GRAPHS, CHECKPOINT, *self.split_graphs()):
            file = self.path / name
            if not file.is_file():
                raise BundleError(f"bundle {self.path} misses {name}; re-export it or copy the whole bundle again.")
            expected = self.manifest.files.get(name)
            if expected is None:
                raise BundleError(f"{self.path}/manifest.json has no sha256 for {name}; re-export the bundle.")
            if sha256_file(file) == expected:
                continue
            if name in GRAPHS or name in self.split_graphs() or not self._trained(name):
                raise BundleError(f"{file} does not match the sha256 in manifest.json: it was modified or corrupted; "
                                  "re-export the bundle or copy it again.")

    def _trained(self, name: str) -> bool:
        """A checkpoint that differs from the exported one must carry this bundle's training progress."""
        from edgeadapt.runtime.checkpoints import read_progress

        return read_progress(self.path / name, self.bundle_id) is not None

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def best_checkpoint(self) -> Path:
        return self.path / BEST_CHECKPOINT

    @property
    def log_path(self) -> Path:
        return self.path / TRAIN_LOG

    @property
    def bundle_id(self) -> str:
        """Ties checkpoints to this bundle's training graph."""
        return self.manifest.files[TRAINING_MODEL][:16]
