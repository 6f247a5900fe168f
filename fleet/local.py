"""One fleet member's side without Flower: its bundle, its own data (a train part and a held-out part), and the
three things a round asks of it — take the global trainable parameters, train on them with the same `Trainer` as
`edgeadapt train` (state file, checkpoints, lock), measure accuracy on the held-out part. Split bundles go through
the feature cache, so the frozen prefix runs once per sample, in the first round only."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from edgeadapt.runtime import training_target
from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.data import Dataset, load_dataset, split
from edgeadapt.runtime.engines import open_engine
from edgeadapt.runtime.errors import ConfigError
from edgeadapt.runtime.lock import bundle_lock
from edgeadapt.runtime.metrics import evaluate_arrays
from edgeadapt.runtime.state import flatten, named_parameters
from edgeadapt.runtime.trainer import TrainConfig, Trainer

PREPARED = ".fleet.npz"  # samples already decoded and resized for the bundle (simulation workspaces)
HELD_OUT = 0.2  # each member's own held-out share of its data, for its before/after-personalizing accuracy


def save_prepared(data: Dataset, path: Path) -> None:
    np.savez(path, samples=data.samples, targets=data.targets, is_image=np.asarray(data.is_image))


def load_data(path: str | Path, bundle: Bundle) -> Dataset:
    """DATA as `edgeadapt train` reads it, or a prepared share of a simulation (`*.fleet.npz`)."""
    if str(path).endswith(PREPARED):
        with np.load(path) as archive:
            return Dataset(archive["samples"], archive["targets"], bool(archive["is_image"]))
    return load_dataset(path, bundle)


def fingerprint(bundle: Bundle) -> dict[str, str]:
    """What must agree between server and clients: the training step (bundle id) and the meaning of the
    trainable arrays (signature: names, shapes, labels, input)."""
    manifest = bundle.manifest
    material = {"layout": [(p.name, list(p.shape)) for p in manifest.portable.layout], "labels": manifest.labels,
                "input": asdict(manifest.input), "loss": manifest.loss}
    signature = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]
    return {"bundle-id": bundle.bundle_id, "signature": signature}


def check_fingerprint(bundle: Bundle, expected: dict) -> None:
    """Refuse, in one line, a global model meant for another bundle."""
    mine = fingerprint(bundle)
    for key, value in mine.items():
        if expected.get(key) != value:
            raise ConfigError(f"this client's bundle {bundle.path} has {key} {value} but the server's has "
                              f"{expected.get(key)}; give the client a copy of the server's bundle.")


def trainable_arrays(bundle: Bundle) -> dict[str, np.ndarray]:
    """The bundle's current trainable tensors by name: what travels in a round (frozen ones never do)."""
    state = bundle.load_state()
    return named_parameters(state.params, bundle.manifest.portable.layout)  # views of a freshly read vector


def write_arrays(bundle: Bundle, arrays: dict[str, np.ndarray]) -> None:
    """Make `arrays` the bundle's trainable state (fresh optimizer, no progress), under the trainer's lock."""
    params = flatten(arrays, bundle.manifest.portable.layout, lambda p: ConfigError(
        f"the global model lacks {p.name} of shape {p.shape}; server and client bundles differ: give the client a "
        "copy of the server's bundle."))
    with bundle_lock(bundle.lock_path):  # the device's own BN statistics (AdaBN) stay
        current = bundle.load_state()
        bundle.save_state(current.carried(params))


@dataclass
class Member:
    """A fleet member: a bundle of its own and its data, split once (seeded) into train and held-out parts."""

    bundle: Bundle
    train: Dataset
    held_out: Dataset | None
    config: TrainConfig

    @classmethod
    def open(cls, bundle: Bundle | str | Path, data: Dataset | str | Path, config: TrainConfig = TrainConfig(),
             held_out: float = HELD_OUT) -> "Member":
        bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        dataset = data if isinstance(data, Dataset) else load_data(data, bundle)
        train, kept = split(dataset, held_out, seed=0)
        config = replace(config, val_split=0.0).for_bundle(bundle.manifest)
        config.check()
        if config.accumulate > 1:
            bundle.graphs(accumulating=True)  # refused here, in one line, if the bundle has no accumulating step
        return cls(bundle, train, kept, config)

    def train_on(self, arrays: dict[str, np.ndarray], epochs: int, seed: int = 0, proximal_mu: float = 0.0,
                 **settings) -> dict[str, np.ndarray]:
        """Start from `arrays`, train `epochs` epochs on the member's train part; the trained arrays."""
        write_arrays(self.bundle, arrays)
        config = replace(self.config, epochs=epochs, seed=seed, proximal_mu=proximal_mu, resume=False, **settings)
        Trainer(self.bundle, config).fit(self.train)
        return trainable_arrays(self.bundle)

    def personalize(self, arrays: dict[str, np.ndarray], epochs: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Fine-tune the global model on the member's data: a constant LR (a warm-up and a decay over one epoch
        would waste most of its few steps on a model that is already trained)."""
        return self.train_on(arrays, epochs, seed, schedule="constant", warmup=0.0)

    def accuracy(self) -> float:
        """Accuracy of the bundle's current state on the member's held-out part."""
        if self.held_out is None:
            raise ConfigError(f"{self.bundle.path}: too little data to hold some out for evaluation; give at least "
                              f"{int(round(1 / HELD_OUT))} samples.")
        return accuracy_of(self.bundle, self.held_out, self.config)


def accuracy_of(bundle: Bundle, data: Dataset, config: TrainConfig) -> float:
    """Accuracy of the bundle's current state on `data`; a split bundle runs its suffix on cached prefix features."""
    if bundle.manifest.loss != "cross_entropy":
        raise ConfigError("fleet runs report accuracy: they need a classification bundle (cross-entropy loss).")
    with bundle_lock(bundle.lock_path):
        inputs, _, target = training_target.prepare(bundle, config, data, None)
    engine = open_engine(bundle, target.graphs, config.engine, config.device, config.threads, training=False)
    engine.load(bundle.load_state())
    return float(evaluate_arrays(engine, inputs, bundle.manifest, config.batch_size or 64).accuracy)
