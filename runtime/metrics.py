"""Loss, accuracy, per-class accuracy and confusion matrix, from logits — no framework needed."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgeadapt.runtime.data import batch_inputs
from edgeadapt.runtime.manifest import Manifest


def dummy_targets(manifest: Manifest, batch: int) -> np.ndarray:
    """Targets for graphs that take labels when only the logits are wanted."""
    if manifest.loss == "cross_entropy":
        return np.zeros(batch, np.int64)
    return np.zeros((batch, manifest.num_outputs), np.float32)


class RunningStats:
    """Sample-weighted mean loss and accuracy over the batches of one epoch."""

    def __init__(self, manifest: Manifest):
        self.classify = manifest.loss == "cross_entropy"
        self.count, self.loss_sum, self.correct = 0, 0.0, 0

    def add(self, loss: float, logits: np.ndarray, targets: np.ndarray) -> None:
        self.count += len(targets)
        self.loss_sum += loss * len(targets)
        if self.classify:
            self.correct += int((logits.argmax(1) == targets).sum())

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    @property
    def accuracy(self) -> float | None:
        return self.correct / max(self.count, 1) if self.classify else None


@dataclass(frozen=True)
class Metrics:
    n: int
    loss: float
    accuracy: float | None
    per_class: dict[str, float]
    confusion: list[list[int]]
    predictions: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason): unreadable inputs left out

    def as_dict(self, labels: list[str]) -> dict:
        return {"n": self.n, "loss": self.loss, "accuracy": self.accuracy, "per_class": self.per_class,
                "labels": labels, "confusion": self.confusion,
                "skipped": [{"file": file, "reason": reason} for file, reason in self.skipped]}


def classification_metrics(logits: np.ndarray, targets: np.ndarray, labels: list[str], loss: float) -> Metrics:
    predicted = logits.argmax(1)
    confusion = np.zeros((len(labels), len(labels)), np.int64)
    np.add.at(confusion, (targets, predicted), 1)
    per_class = {labels[i]: float(confusion[i, i] / confusion[i].sum()) for i in range(len(labels))
                 if confusion[i].sum()}
    return Metrics(len(targets), loss, float((predicted == targets).mean()), per_class, confusion.tolist(), predicted)


def evaluate_arrays(engine, data, manifest: Manifest, batch_size: int = 64) -> Metrics:
    """Run the eval graph over a dataset (no augmentation) and compute the metrics."""
    losses, outputs = [], []
    for start in range(0, len(data), batch_size):
        x = batch_inputs(data, slice(start, start + batch_size), manifest)
        loss, logits = engine.eval_step(x, data.targets[start:start + batch_size])
        losses.append(loss * len(x))
        outputs.append(logits)
    logits = np.concatenate(outputs)
    mean_loss = float(sum(losses) / len(data))
    if manifest.loss == "cross_entropy":
        return classification_metrics(logits, data.targets, manifest.labels, mean_loss)
    return Metrics(len(data), mean_loss, None, {}, [], logits)
