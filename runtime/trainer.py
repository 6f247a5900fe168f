"""`Trainer(bundle).fit(data)`: on-device training with seeded order, LR schedules, validation, early stopping,
a time budget, atomic resumable checkpoints and recovery from a diverging loss."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgeadapt.runtime import checkpoints, split_training
from edgeadapt.runtime.bundle import LOCK_FILE, Bundle
from edgeadapt.runtime.data import Dataset, batch_inputs, load_dataset, split
from edgeadapt.runtime.engine import Engine
from edgeadapt.runtime.errors import ConfigError, DataError, TrainingError
from edgeadapt.runtime.lock import bundle_lock
from edgeadapt.runtime.metrics import RunningStats, evaluate_arrays
from edgeadapt.runtime.schedule import SCHEDULES, learning_rate


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 32
    lr: float | None = None  # None: the bundle's default for its preset
    seed: int = 0
    schedule: str = "cosine"
    warmup: float = 0.05  # fraction of all steps
    val_split: float = 0.1
    patience: int | None = None  # early stopping: epochs without validation improvement
    max_minutes: float | None = None
    augment: bool = False
    device: str = "cpu"
    threads: int | None = None
    checkpoint_every: int = 20  # steps
    resume: bool = False
    max_bad_fraction: float = 0.1
    split: str = "auto"  # auto: train only the suffix when the bundle is split; on; off
    prefix_device: str = "onnxruntime-cpu"
    prefix_int8: bool = False  # use prefix_int8.onnx (see `edgeadapt quantize-prefix`)
    cache_mb: int = 2048

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("--epochs and --batch-size must be at least 1.")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown --schedule '{self.schedule}'; choose one of {', '.join(SCHEDULES)}.")
        if self.split not in ("auto", "on", "off"):
            raise ConfigError(f"unknown --split '{self.split}'; choose auto, on or off.")
        if not 0 <= self.val_split < 1:
            raise ConfigError("--val-split must be in [0, 1).")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError("--lr must be positive.")

    def run_settings(self, train_size: int) -> dict:
        """What a resumed run must share with the interrupted one."""
        keys = ("epochs", "batch_size", "lr", "seed", "schedule", "warmup", "val_split", "augment", "split",
                "prefix_device", "prefix_int8")
        return {**{k: getattr(self, k) for k in keys}, "train_size": train_size}


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    step: int
    lr: float
    train_loss: float
    train_accuracy: float | None
    val_loss: float | None
    val_accuracy: float | None
    seconds: float


@dataclass
class TrainSummary:
    stopped: str  # completed | early_stopping | time_limit
    epochs_completed: int
    steps: int
    train_samples: int
    val_samples: int
    skipped_files: list[tuple[str, str]]
    best_epoch: int
    records: list[EpochRecord] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def final(self) -> EpochRecord | None:
        return self.records[-1] if self.records else None


class _Diverged(Exception):
    pass


class Trainer:
    def __init__(self, bundle: Bundle | str | Path, config: TrainConfig = TrainConfig(),
                 on_batch: Callable[[int, int, float, float | None], None] | None = None,
                 on_epoch: Callable[[EpochRecord], None] | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        self.config = config
        self.on_batch, self.on_epoch = on_batch, on_epoch
        self.split_run = None
        config.check()

    @property
    def manifest(self):
        return self.bundle.manifest

    def fit(self, data: Dataset | str | Path) -> TrainSummary:
        started = time.monotonic()
        dataset = data if isinstance(data, Dataset) else load_dataset(data, self.manifest,
                                                                        self.config.max_bad_fraction)
        if self.manifest.loss == "cross_entropy" and len(np.unique(dataset.targets)) < 2:
            raise DataError("the data holds a single class; a classifier needs examples of at least 2 classes.")
        train, val = split(dataset, self.config.val_split, self.config.seed)
        cfg = self.config
        with bundle_lock(self.bundle.path / LOCK_FILE):
            self._remove_stale_temporaries()
            train, val, self.split_run = split_training.prepare(self.bundle, cfg, train, val)
            summary = self._run(train, val)
        summary.skipped_files = dataset.skipped
        summary.notes = self.split_run.notes if self.split_run else []
        summary.seconds = time.monotonic() - started  # data loading and prefix features included
        return summary

    @property
    def _checkpoint(self) -> Path:
        return self.split_run.checkpoint if self.split_run else self.bundle.checkpoint

    @property
    def _best(self) -> Path:
        return self.split_run.best if self.split_run else self.bundle.best_checkpoint

    # ---- the run ----------------------------------------------------------------------------------------------

    def _remove_stale_temporaries(self) -> None:
        """Half-written files of a killed trainer (`.checkpoint.tmp-PID`); safe to drop while we hold the lock."""
        for leftover in self.bundle.path.glob(".*.tmp-*"):
            leftover.unlink(missing_ok=True)
        for leftover in self.bundle.path.glob(".*.fresh-*"):
            leftover.unlink(missing_ok=True)

    def _engine(self, checkpoint: Path) -> Engine:
        graphs = self.split_run.graphs if self.split_run else ""
        return Engine(self.bundle.path, checkpoint, self.config.device, self.config.threads, graphs=graphs)

    def _start(self, settings: dict) -> tuple[Engine, checkpoints.Progress]:
        path = self._checkpoint
        if self.config.resume:
            return self._engine(path), checkpoints.resumable(path, self.bundle.bundle_id, settings)
        checkpoints.read_progress(path, self.bundle.bundle_id)  # refuses a checkpoint of another bundle
        fresh = path.with_name(f".{path.name}.fresh-{os.getpid()}")
        try:
            Engine.without_optimizer_state(path, fresh)
            engine = self._engine(fresh)
        finally:
            fresh.unlink(missing_ok=True)
        progress = checkpoints.Progress(self.bundle.bundle_id, json.dumps(settings, sort_keys=True))
        checkpoints.save(engine, path, progress)
        return engine, progress

    def _run(self, train: Dataset, val: Dataset | None) -> TrainSummary:
        started = time.monotonic()
        engine, progress = self._start(self.config.run_settings(len(train)))
        summary = TrainSummary("completed", 0, 0, len(train), len(val) if val else 0, [], -1)
        deadline = started + self.config.max_minutes * 60 if self.config.max_minutes else None
        while True:
            try:
                summary.stopped = self._epochs(engine, progress, train, val, summary, deadline)
                break
            except _Diverged:
                engine, progress = self._recover()
        summary.epochs_completed, summary.steps, summary.best_epoch = progress.epoch, progress.step, progress.best_epoch
        if summary.stopped != "time_limit":
            restore_best = self.config.patience is not None and self._best.is_file()
            checkpoints.finalize(self._best if restore_best else self._checkpoint, self._checkpoint, progress)
            if self.split_run:
                checkpoints.merge_into(self._checkpoint, self.bundle.checkpoint, progress)
        summary.seconds = time.monotonic() - started
        return summary

    def _recover(self) -> tuple[Engine, checkpoints.Progress]:
        """A NaN/inf loss: back to the last good checkpoint with a 10× lower LR; a second time stops training."""
        progress = checkpoints.read_progress(self._checkpoint, self.bundle.bundle_id)
        if progress.nan_events >= 1:
            raise TrainingError("the loss became NaN or infinite again after lowering the LR; the last good state is "
                                "kept in the bundle's checkpoint: lower --lr further or check the data for outliers.")
        progress.nan_events += 1
        progress.lr_scale *= 0.1
        engine = self._engine(self._checkpoint)
        checkpoints.save(engine, self._checkpoint, progress)
        return engine, progress

    def _epochs(self, engine, progress, train, val, summary, deadline) -> str:
        cfg, path = self.config, self._checkpoint
        per_epoch = math.ceil(len(train) / cfg.batch_size)
        total = cfg.epochs * per_epoch
        base_lr = cfg.lr or self.manifest.hyperparameters["lr"]

        def current_lr() -> float:
            return learning_rate(base_lr * progress.lr_scale, progress.step, total, int(cfg.warmup * total),
                                 cfg.schedule)
        while progress.epoch < cfg.epochs:
            epoch_started, stats = time.monotonic(), RunningStats(self.manifest)
            order = np.random.default_rng([cfg.seed, progress.epoch]).permutation(len(train))
            lr = current_lr()  # also set when a resume lands after the epoch's last batch
            for batch in range(progress.batch, per_epoch):
                lr = current_lr()
                self._step(engine, train, order[batch * cfg.batch_size:(batch + 1) * cfg.batch_size],
                           (cfg.seed, progress.epoch, batch), lr, stats)
                progress.step, progress.batch = progress.step + 1, batch + 1
                if self.on_batch:
                    self.on_batch(progress.step, total, stats.loss, stats.accuracy)
                if progress.step % cfg.checkpoint_every == 0:
                    checkpoints.save(engine, path, progress)
                if deadline and time.monotonic() > deadline:
                    checkpoints.save(engine, path, progress)
                    return "time_limit"
            record = self._end_epoch(engine, progress, val, stats, lr, time.monotonic() - epoch_started)
            summary.records.append(record)
            if cfg.patience is not None and progress.bad_epochs >= cfg.patience:
                return "early_stopping"
        return "completed"

    def _step(self, engine, train, index, position, lr, stats) -> None:
        rng = np.random.default_rng([*position, 1]) if self.config.augment and train.is_image else None
        x = batch_inputs(train, index, self.manifest, rng)
        if self.split_run and self.split_run.per_batch:
            x = self.split_run.runner(x)
        y = train.targets[index]
        engine.set_learning_rate(lr)
        loss, logits = engine.train_batch(x, y)
        if not math.isfinite(loss):
            engine.discard_gradients()
            raise _Diverged()
        engine.apply_update()
        stats.add(loss, logits, y)

    def _end_epoch(self, engine, progress, val, stats, lr, seconds) -> EpochRecord:
        metrics = evaluate_arrays(engine, val, self.manifest, self.config.batch_size) if val else None
        progress.epoch, progress.batch = progress.epoch + 1, 0
        record = EpochRecord(progress.epoch, progress.step, lr, stats.loss, stats.accuracy,
                             metrics.loss if metrics else None, metrics.accuracy if metrics else None, seconds)
        improved = False
        if metrics is not None:
            score = metrics.accuracy if metrics.accuracy is not None else -metrics.loss
            improved = score > progress.best_metric
            if improved:
                progress.best_metric, progress.best_epoch, progress.bad_epochs = score, progress.epoch, 0
            else:
                progress.bad_epochs += 1
        checkpoints.save(engine, self._checkpoint, progress)
        if improved:
            checkpoints.keep_copy(self._checkpoint, self._best)
        self._log(record)
        if self.on_epoch:
            self.on_epoch(record)
        return record

    def _log(self, record: EpochRecord) -> None:
        line = json.dumps({"time": time.time(), **asdict(record)}) + "\n"
        try:
            with open(self.bundle.log_path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise TrainingError(f"cannot append to {self.bundle.log_path} ({exc.strerror}); the checkpoint of this "
                                "epoch is saved: free space and continue with --resume.") from None
