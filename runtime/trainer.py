"""`Trainer(bundle).fit(data)`: on-device training with seeded order, LR schedules, validation, early stopping,
a time budget, atomic resumable checkpoints and recovery from a diverging loss.

An epoch commits in one rename: the state file holds the weights, optimizer state, progress, the best validation
parameters and the run's epoch log lines; `train_log.jsonl` is brought up to date from it after every commit (and
on `--resume`), so a crash anywhere leaves a state that resumes to the same result, and no epoch's line is lost."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgeadapt.runtime import training_target
from edgeadapt.runtime.adabn import SCOPES, adapt_bn_locked
from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.data import Dataset, batch_inputs, load_dataset, split
from edgeadapt.runtime.engines import Engine, open_engine, resolve_engine
from edgeadapt.runtime.errors import ConfigError, DataError, TrainingError
from edgeadapt.runtime.lock import bundle_lock
from edgeadapt.runtime.manifest import DEFAULT_EPOCHS, MAX_ACCUMULATION, default_accumulation, default_batch
from edgeadapt.runtime.metrics import RunningStats, evaluate_arrays
from edgeadapt.runtime.schedule import SCHEDULES, learning_rate
from edgeadapt.runtime.state import Progress, TrainState, digest, resumable
from edgeadapt.runtime.training_target import TrainingTarget


@dataclass(frozen=True)
class TrainConfig:
    epochs: int | None = None  # None: the bundle's (manifest hyperparameters), else DEFAULT_EPOCHS
    batch_size: int | None = None  # None: the bundle's (e.g. chosen by `--trainable auto`), else DEFAULT_BATCH
    accumulate: int | None = None  # micro-batches per update (effective batch = batch_size × accumulate); None:
    #                                the bundle's (`--trainable auto` may choose it), else 1
    lr: float | None = None  # None: the bundle's default (the head's rate; its groups scale it)
    seed: int = 0
    schedule: str = "cosine"
    warmup: float = 0.05  # fraction of all steps
    val_split: float = 0.1
    patience: int | None = None  # early stopping: epochs without validation improvement
    max_minutes: float | None = None
    augment: bool = False
    engine: str = "auto"  # auto | onnxruntime | openvino | ort-training
    device: str = "cpu"
    threads: int | None = None
    checkpoint_every: int = 20  # steps
    resume: bool = False
    max_bad_fraction: float = 0.1
    split: str = "auto"  # auto: train only the suffix when the bundle is split; on; off
    prefix_device: str = "onnxruntime-cpu"
    prefix_int8: bool = False  # use prefix_int8.onnx (see `edgeadapt quantize-prefix`)
    cache_mb: int = 2048
    proximal_mu: float = 0.0  # FedProx: pull towards the run's starting parameters (see `_pull_to_anchor`)
    adabn: str = ""  # "all" | "prefix": re-estimate BN statistics on the training data first (new runs only)

    def for_bundle(self, manifest) -> "TrainConfig":
        """Unset epochs and batch size from the bundle; precedence: flag > manifest > default."""
        given = manifest.hyperparameters
        return dataclasses.replace(self, epochs=self.epochs or int(given.get("epochs", DEFAULT_EPOCHS)),
                                   batch_size=self.batch_size or default_batch(manifest),
                                   accumulate=self.accumulate or default_accumulation(manifest),
                                   engine=resolve_engine(self.engine, self.device))

    def check(self) -> None:
        if (self.epochs is not None and self.epochs < 1) or (self.batch_size is not None and self.batch_size < 1):
            raise ConfigError("--epochs and --batch-size must be at least 1.")
        if self.accumulate is not None and not 1 <= self.accumulate <= MAX_ACCUMULATION:
            raise ConfigError(f"--accumulate must be between 1 and {MAX_ACCUMULATION} micro-batches per update.")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown --schedule '{self.schedule}'; choose one of {', '.join(SCHEDULES)}.")
        if self.split not in ("auto", "on", "off"):
            raise ConfigError(f"unknown --split '{self.split}'; choose auto, on or off.")
        if not 0 <= self.val_split < 1:
            raise ConfigError("--val-split must be in [0, 1).")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError("--lr must be positive.")
        if self.adabn and self.adabn not in SCOPES:
            raise ConfigError(f"unknown AdaBN scope '{self.adabn}'; choose all or prefix.")
        if self.proximal_mu < 0:
            raise ConfigError("the proximal term's mu must be >= 0.")
        if self.proximal_mu and self.resume:
            raise ConfigError("a run with a proximal term starts from the global model; it cannot --resume.")

    def run_settings(self, train_size: int) -> dict:
        """What a resumed run must share with the interrupted one."""
        keys = ("epochs", "batch_size", "lr", "seed", "schedule", "warmup", "val_split", "augment", "split",
                "prefix_device", "prefix_int8", "engine", "accumulate")
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
    seconds: float = 0.0  # the whole fit: data loading and prefix features included
    loop_seconds: float = 0.0  # the training loop alone (what the progress bar shows)
    notes: list[str] = field(default_factory=list)
    engine: str = ""

    @property
    def final(self) -> EpochRecord | None:
        return self.records[-1] if self.records else None


class _Diverged(Exception):
    pass


class Trainer:
    """Trains a bundle's state with any engine, on the whole graph or a split bundle's suffix (one state file)."""

    def __init__(self, bundle: Bundle | str | Path, config: TrainConfig = TrainConfig(),
                 on_batch: Callable[[int, int, float, float | None], None] | None = None,
                 on_epoch: Callable[[EpochRecord], None] | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        config.check()
        self.config = config.for_bundle(self.bundle.manifest)
        if self.config.proximal_mu and self.config.engine == "ort-training":
            raise ConfigError("a proximal term (FedProx) needs an engine whose parameters the trainer can pull; the "
                              "ort-training engine keeps its own: use --engine onnxruntime or openvino.")
        self.on_batch, self.on_epoch = on_batch, on_epoch
        self._best: np.ndarray | None = None  # the run's best validation parameters, saved with every commit
        self.target: TrainingTarget | None = None
        self._anchor: np.ndarray | None = None  # FedProx's global parameters
        self._notes: list[str] = []  # what the summary should tell the user about this run

    @property
    def manifest(self):
        return self.bundle.manifest

    def fit(self, data: Dataset | str | Path) -> TrainSummary:
        started = time.monotonic()
        dataset = data if isinstance(data, Dataset) else load_dataset(data, self.bundle,
                                                                        self.config.max_bad_fraction)
        if self.manifest.loss == "cross_entropy" and len(np.unique(dataset.targets)) < 2:
            raise DataError("the data holds a single class; a classifier needs examples of at least 2 classes.")
        train, val = split(dataset, self.config.val_split, self.config.seed)
        with bundle_lock(self.bundle.lock_path):
            self._remove_stale_temporaries()
            engine = self._engine()  # its refusals (engine, device, artifacts, groups) come before anything changes
            adapted = None
            if self.config.adabn and not self.config.resume:  # a resumed run has its statistics already
                adapted = adapt_bn_locked(self.bundle, train, self.config.adabn, self.config.batch_size,
                                          self.config.threads)
            train, val, self.target = training_target.prepare(self.bundle, self.config, train, val)
            if adapted is not None:
                self.target.notes.insert(0, f"AdaBN ({adapted.scope}): {adapted.statistics} BN statistics "
                                            f"re-estimated on {adapted.samples} samples")
            summary = self._run(engine, train, val)
        summary.skipped_files = dataset.skipped
        summary.notes = self._notes + self.target.notes
        summary.engine = self.config.engine
        summary.seconds = time.monotonic() - started  # data loading and prefix features included
        return summary

    # ---- the run ----------------------------------------------------------------------------------------------

    def _remove_stale_temporaries(self) -> None:
        """Half-written files of a killed trainer (`.state.safetensors.tmp-PID`); safe to drop under the lock."""
        for leftover in self.bundle.path.glob(".*.tmp-*"):
            leftover.unlink(missing_ok=True)

    def _engine(self) -> Engine:
        graphs = self.bundle.graphs(split=training_target.wants_split(self.bundle, self.config.split),
                                    accumulating=self.config.accumulate > 1)
        return open_engine(self.bundle, graphs, self.config.engine, self.config.device, self.config.threads)

    def _save(self, engine: Engine, progress: Progress, with_optimizer: bool = True) -> None:
        state = engine.state()
        state.progress, state.best = progress, self._best
        if not with_optimizer:
            state.optimizer, state.best = {}, None
        self.bundle.save_state(state)

    def _load(self) -> TrainState:
        return self.bundle.load_state()

    def _start(self, engine: Engine, settings: dict) -> Progress:
        state = self._load()
        if state.statistics is not None:  # a resumed run must see the statistics it started with
            settings = {**settings, "statistics": digest(state.statistics)[:16]}
        if self.config.resume:
            progress = resumable(state.progress, settings)
            self._best = state.best
            self._write_log(progress)  # lines a crash (or a failed write) kept out of the log
        else:  # a new run: the latest trained parameters, a fresh optimizer
            previous = state.progress
            if previous is not None and not previous.finished and previous.step:
                self._notes.append(f"the previous run stopped unfinished at epoch {previous.epoch + 1}, step "
                                   f"{previous.step}; this new run starts from its parameters with a fresh optimizer "
                                   "(`--resume` would have continued it)")
            progress = Progress(self.bundle.bundle_id, json.dumps(settings, sort_keys=True),
                                run_id=secrets.token_hex(8))
            state = state.carried()
        if self.config.proximal_mu:
            self._anchor = state.params.copy()
        engine.load(state)
        self._save(engine, progress)
        return progress

    def _run(self, engine: Engine, train: Dataset, val: Dataset | None) -> TrainSummary:
        started = time.monotonic()
        progress = self._start(engine, self.config.run_settings(len(train)))
        summary = TrainSummary("completed", 0, 0, len(train), len(val) if val else 0, [], -1)
        deadline = started + self.config.max_minutes * 60 if self.config.max_minutes else None
        while True:
            try:
                summary.stopped = self._epochs(engine, progress, train, val, summary, deadline)
                break
            except _Diverged:
                engine, progress = self._recover(engine)
        summary.epochs_completed, summary.steps, summary.best_epoch = progress.epoch, progress.step, progress.best_epoch
        if summary.stopped != "time_limit":
            self._finish(engine, progress)
        summary.loop_seconds = time.monotonic() - started
        return summary

    def _finish(self, engine: Engine, progress: Progress) -> None:
        """The run's result (the best epoch's state with early stopping) becomes the bundle's state, finished."""
        progress.finished = 1
        if self.config.patience is not None and self._best is not None:
            engine.load(engine.state().carried(self._best))
        self._save(engine, progress, with_optimizer=False)

    def _recover(self, engine: Engine) -> tuple[Engine, Progress]:
        """A NaN/inf loss: back to the last good state with a 10× lower LR; a second time stops training."""
        state = self._load()
        progress = state.progress
        if progress.nan_events >= 1:
            raise TrainingError("the loss became NaN or infinite again after lowering the LR; the last good state is "
                                "kept in the bundle: lower --lr further or check the data for outliers.")
        progress.nan_events += 1
        progress.lr_scale *= 0.1
        engine.load(state)
        self._save(engine, progress)
        return engine, progress

    def _epochs(self, engine, progress, train, val, summary, deadline) -> str:
        cfg = self.config
        effective = cfg.batch_size * cfg.accumulate  # samples per update
        per_epoch = math.ceil(len(train) / effective)
        total = cfg.epochs * per_epoch
        base_lr = cfg.lr or self.manifest.hyperparameters["lr"]

        def current_lr() -> float:
            return learning_rate(base_lr * progress.lr_scale, progress.step, total, int(cfg.warmup * total),
                                 cfg.schedule)
        while progress.epoch < cfg.epochs:
            if cfg.patience is not None and progress.bad_epochs >= cfg.patience:
                return "early_stopping"  # a run resumed after the epoch that stopped it
            epoch_started, stats = time.monotonic(), RunningStats(self.manifest)
            order = np.random.default_rng([cfg.seed, progress.epoch]).permutation(len(train))
            lr = current_lr()  # also set when a resume lands after the epoch's last batch
            for batch in range(progress.batch, per_epoch):
                lr = current_lr()
                self._step(engine, train, order[batch * effective:(batch + 1) * effective],
                           (cfg.seed, progress.epoch, batch), lr, stats)
                progress.step, progress.batch = progress.step + 1, batch + 1
                if self.on_batch:
                    self.on_batch(progress.step, total, stats.loss, stats.accuracy)
                if progress.step % cfg.checkpoint_every == 0:
                    self._save(engine, progress)
                if deadline and time.monotonic() > deadline:
                    self._save(engine, progress)
                    return "time_limit"
            record = self._end_epoch(engine, progress, val, stats, lr, time.monotonic() - epoch_started)
            summary.records.append(record)
        if cfg.patience is not None and progress.bad_epochs >= cfg.patience:
            return "early_stopping"
        return "completed"

    def _step(self, engine, train, index, position, lr, stats) -> None:
        """One update from the effective batch `index`: micro-batches of `batch_size` accumulated, each weighted by
        its share of the samples, so the update is the whole batch's (BN statistics are frozen)."""
        rng = np.random.default_rng([*position, 1]) if self.config.augment and train.is_image else None
        micro = [index[i:i + self.config.batch_size] for i in range(0, len(index), self.config.batch_size)]
        for number, part in enumerate(micro, start=1):
            x = batch_inputs(train, part, self.manifest, rng)
            if self.target.per_batch is not None:
                x = self.target.per_batch(x)
            y = train.targets[part]
            share = len(part) / len(index)
            if number < len(micro):
                loss, logits = engine.accumulate(x, y, share)
            elif len(micro) > 1:
                loss, logits = engine.train_step(x, y, lr, share)
            else:
                loss, logits = engine.train_step(x, y, lr)
            if not math.isfinite(loss):
                raise _Diverged()
            stats.add(loss, logits, y)
        if self._anchor is not None:
            self._pull_to_anchor(engine, lr)

    def _pull_to_anchor(self, engine, lr: float) -> None:
        """FedProx's proximal term mu/2·|w - w_global|², applied decoupled from Adam like AdamW's weight decay:
        w -= lr·mu·(w - w_global) after each step (the step graph stays the same for every engine)."""
        state = engine.state()
        state.params -= lr * self.config.proximal_mu * (state.params - self._anchor)
        engine.load(state)

    def _end_epoch(self, engine, progress, val, stats, lr, seconds) -> EpochRecord:
        metrics = evaluate_arrays(engine, val, self.manifest, self.config.batch_size) if val else None
        progress.epoch, progress.batch = progress.epoch + 1, 0
        record = EpochRecord(progress.epoch, progress.step, lr, stats.loss, stats.accuracy,
                             metrics.loss if metrics else None, metrics.accuracy if metrics else None, seconds)
        if metrics is not None:
            score = metrics.accuracy if metrics.accuracy is not None else -metrics.loss
            if score > progress.best_metric:
                progress.best_metric, progress.best_epoch, progress.bad_epochs = score, progress.epoch, 0
                self._best = engine.state().params
            else:
                progress.bad_epochs += 1
        progress.records.append({"time": time.time(), **asdict(record), "engine": self.config.engine,
                                 "device": self.config.device, "split": self.target.split, "run": progress.run_id})
        self._save(engine, progress)  # the epoch's one commit: weights, best, progress and its log line
        self._write_log(progress)
        if self.on_epoch:
            self.on_epoch(record)
        return record

    def _write_log(self, progress: Progress) -> None:
        """Append the run's committed epoch lines that `train_log.jsonl` lacks (after a crash or a failed write)."""
        path = self.bundle.log_path
        try:
            present = _logged(path, progress.run_id)
            missing = [entry for entry in progress.records if entry["epoch"] not in present]
            if not missing:
                return
            torn = path.is_file() and path.stat().st_size and path.read_bytes()[-1:] != b"\n"
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with os.fdopen(fd, "a", encoding="utf-8") as fh:  # never through a link out of the bundle
                fh.write("\n" * bool(torn) + "".join(json.dumps(entry) + "\n" for entry in missing))
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise TrainingError(f"cannot append to {path} ({exc.strerror}); the state of this epoch is saved and "
                                "holds its log line: free space and continue with --resume.") from None


def _logged(path: Path, run_id: str) -> set[int]:
    """Epochs of run `run_id` that the log holds (a torn last line, from a crash mid-write, is not one)."""
    if path.is_symlink() or not path.is_file():
        return set()  # a link is not read (and the append that follows refuses it)
    epochs = set()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("run") == run_id:
            epochs.add(entry.get("epoch"))
    return epochs
