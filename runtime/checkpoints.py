"""Training progress stored inside ORT checkpoints (as properties), so weights, optimizer state and position are
one file, replaced atomically: a power cut leaves either the old or the new checkpoint, never a mix."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from edgeadapt.runtime.atomic import atomic_copy, atomic_write
from edgeadapt.runtime.engine import Engine
from edgeadapt.runtime.errors import BundleError, TrainingError

PREFIX = "edgeadapt."


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

    def as_properties(self) -> dict:
        return {PREFIX + k: v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_properties(cls, props: dict) -> "Progress | None":
        values = {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}
        names = {f.name for f in dataclasses.fields(cls)}
        if not names <= set(values):
            return None
        return cls(**{k: values[k] for k in names})


def save(engine: Engine, path: Path, progress: Progress, include_optimizer: bool = True) -> None:
    """Atomically write weights (+ optimizer state) and progress to `path`."""
    engine.set_properties(progress.as_properties())
    atomic_write(path, lambda tmp: engine.save(tmp, include_optimizer))


def read_progress(path: Path, bundle_id: str) -> Progress | None:
    if not path.is_file():
        return None
    progress = Progress.from_properties(Engine.read_properties(path))
    if progress is not None and progress.bundle_id != bundle_id:
        raise BundleError(f"checkpoint {path} belongs to another bundle; restore this bundle's checkpoint or "
                          "re-export.")
    return progress


def resumable(path: Path, bundle_id: str, run_config: dict) -> Progress:
    progress = read_progress(path, bundle_id)
    if progress is None or progress.finished:
        raise TrainingError("nothing to resume: the bundle has no unfinished run; start one without --resume.")
    stored = json.loads(progress.run_config)
    changed = [k for k in run_config if stored.get(k) != run_config[k]]
    if changed:
        raise TrainingError(f"--resume needs the interrupted run's settings, but {', '.join(changed)} changed "
                            f"(was {', '.join(f'{k}={stored.get(k)}' for k in changed)}); use them or start anew.")
    return progress


def finalize(source: Path, target: Path, progress: Progress) -> None:
    """Write `source`'s weights to `target` as a finished run (no optimizer state: a new run starts fresh)."""
    progress = dataclasses.replace(progress, finished=1)
    atomic_write(target, lambda tmp: Engine.rewrite_properties(source, tmp, progress.as_properties()))


def merge_into(trained: Path, whole: Path, progress: Progress) -> None:
    """Copy a trained suffix's parameters into the whole-graph checkpoint, so evaluate, predict and deploy of the
    whole graph see the adapted model."""
    progress = dataclasses.replace(progress, finished=1)
    atomic_write(whole, lambda tmp: Engine.copy_parameters(trained, whole, tmp, progress.as_properties(),
                                                           whole.parent))


def keep_copy(source: Path, target: Path) -> None:
    atomic_copy(source, target)
