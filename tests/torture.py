"""Crash torture: start `edgeadapt train`, SIGKILL it at a random moment — or at an exact commit point of an epoch
(just before or just after the state file's rename, just after the log append) —, check what it left, resume, and
compare the final weights (and the log) with an uninterrupted run of the same seed. A test harness, not part of the
device package: used by tests (small N) and benchmarks/crash_torture.py (N >= 100)."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.errors import EdgeAdaptError


@dataclass
class Tally:
    kills: int = 0
    during_checkpoint_write: int = 0
    before_first_checkpoint: int = 0
    after_finish: int = 0
    corrupt_checkpoints: int = 0
    lost_epochs: int = 0
    resume_failures: int = 0
    weight_mismatches: int = 0
    notes: list[str] = field(default_factory=list)


def train_command(bundle: Path, data: Path, options: list[str], resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "edgeadapt", "train", str(bundle), str(data), "--quiet", *options] + \
        (["--resume"] if resume else [])


def weights(bundle: Path) -> np.ndarray:
    """The bundle's trained parameters (one flat vector)."""
    opened = Bundle.open(bundle)
    return opened.load_state().params


def _logged_epochs(bundle: Path) -> int:
    log = bundle / "train_log.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return max((json.loads(line)["epoch"] for line in lines if line.strip()), default=0)


def _inspect_after_kill(work: Path, tally: Tally) -> bool:
    """Check the killed bundle; return True if a run is left to resume."""
    if list(work.glob(".state.safetensors.tmp-*")):
        tally.during_checkpoint_write += 1
    try:
        bundle = Bundle.open(work)
        progress = bundle.load_state().progress
    except EdgeAdaptError as exc:
        tally.corrupt_checkpoints += 1
        tally.notes.append(str(exc))
        return False
    if progress is None:
        tally.before_first_checkpoint += 1
        return False
    if _logged_epochs(work) > progress.epoch:
        tally.lost_epochs += _logged_epochs(work) - progress.epoch
    if progress.finished:
        tally.after_finish += 1
    return not progress.finished


def _describe(work: Path) -> str:
    bundle = Bundle.open(work)
    progress = bundle.load_state().progress
    where = "no progress" if progress is None else \
        f"epoch {progress.epoch} batch {progress.batch} step {progress.step} finished {progress.finished}"
    return f"{where}; logged epochs {_logged_epochs(work)}; files {sorted(p.name for p in work.iterdir())}"


def _wait_for_training(process: subprocess.Popen, checkpoint: Path, limit: float = 120.0) -> float:
    """Seconds until the trainer first rewrites the state file (start-up done), or until it exits."""
    started, first = time.monotonic(), checkpoint.stat().st_mtime_ns
    while process.poll() is None and checkpoint.stat().st_mtime_ns == first and time.monotonic() - started < limit:
        time.sleep(0.005)
    return time.monotonic() - started


def one_trial(template: Path, data: Path, options: list[str], reference: np.ndarray, train_seconds: float,
              rng: random.Random, work: Path, tally: Tally) -> None:
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(template, work)
    process = subprocess.Popen(train_command(work, data, options), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    _wait_for_training(process, work / "state.safetensors")
    time.sleep(rng.uniform(0.0, train_seconds))
    process.send_signal(signal.SIGKILL)
    process.wait()
    tally.kills += 1
    resumable = _inspect_after_kill(work, tally)
    if tally.corrupt_checkpoints:
        return
    state = _describe(work)
    if resumable or "no progress" in state:  # resume, or start anew when killed before any checkpoint
        finished = subprocess.run(train_command(work, data, options, resume=resumable), capture_output=True,
                                  text=True)
        if finished.returncode != 0:
            tally.resume_failures += 1
            tally.notes.append(finished.stderr.strip()[-200:])
            return
    actual = weights(work)
    if not np.array_equal(reference, actual):
        tally.weight_mismatches += 1
        tally.notes.append(f"weights differ after a kill that left: {state}")


def torture(template: Path, data: Path, options: list[str], trials: int, workdir: Path, seed: int = 0) -> Tally:
    """`trials` runs, each killed once at a uniformly random moment of an uninterrupted run's training phase."""
    reference_dir = workdir / "reference"
    shutil.rmtree(reference_dir, ignore_errors=True)
    shutil.copytree(template, reference_dir)
    process = subprocess.Popen(train_command(reference_dir, data, options), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    startup = _wait_for_training(process, reference_dir / "state.safetensors")
    started = time.monotonic()
    if process.wait() != 0:
        raise RuntimeError("the uninterrupted reference run failed")
    train_seconds = time.monotonic() - started + startup * 0.1
    reference = weights(reference_dir)
    tally, rng = Tally(), random.Random(seed)
    for _ in range(trials):
        one_trial(template, data, options, reference, train_seconds, rng, workdir / "work", tally)
    return tally




# ---- kills at every commit point ----------------------------------------------------------------------------------
# The trainer runs under a wrapper that counts commit events — each rename onto state.safetensors is two points
# (before, after), each log append one (after) — and SIGKILLs itself at point K. With K = 0 it only counts them.

_AT_POINT = """
import os, signal, sys
kill_at, seen = int(sys.argv[1]), [0]
def point():
    seen[0] += 1
    if seen[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if not str(dst).endswith("state.safetensors"):
        return real_replace(src, dst, *args, **kwargs)
    point()
    real_replace(src, dst, *args, **kwargs)
    point()
os.replace = replace
import edgeadapt.runtime.trainer as trainer
real_log = trainer.Trainer._write_log
def write_log(self, progress):
    real_log(self, progress)
    point()
trainer.Trainer._write_log = write_log
sys.argv = ["edgeadapt", *sys.argv[2:]]
from edgeadapt.cli import main
try:
    main()
finally:
    if kill_at == 0:
        sys.stderr.write(f"commit points: {seen[0]}\\n")
"""


def _at_point(point: int, bundle: Path, data: Path, options: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", _AT_POINT, str(point), *train_command(bundle, data, options)[3:]]
    return subprocess.run(command, capture_output=True, text=True)


def _final_log_epochs(bundle: Path) -> list[int]:
    """The epochs the log holds for the last run (one line each, in order, is what an uninterrupted run leaves)."""
    log = bundle / "train_log.jsonl"
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    last = entries[-1]["run"] if entries else None
    return [e["epoch"] for e in entries if e.get("run") == last]


def commit_points(template: Path, data: Path, options: list[str], workdir: Path) -> tuple[int, np.ndarray, list]:
    """An uninterrupted run that counts its commit points: (points, final weights, logged epochs)."""
    reference = workdir / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    shutil.copytree(template, reference)
    counted = _at_point(0, reference, data, options)
    if counted.returncode != 0:
        raise RuntimeError(f"the uninterrupted reference run failed: {counted.stderr[-300:]}")
    points = int(counted.stderr.rsplit("commit points:", 1)[1].split()[0])
    return points, weights(reference), _final_log_epochs(reference)


def torture_commit_points(template: Path, data: Path, options: list[str], workdir: Path,
                          points: list[int] | None = None) -> Tally:
    """Kill at each commit point (all of them by default), resume, compare weights and log with the reference."""
    total, reference, logged = commit_points(template, data, options, workdir)
    tally, work = Tally(), workdir / "work"
    for point in points or range(1, total + 1):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(template, work)
        killed = _at_point(point, work, data, options)
        tally.kills += killed.returncode == -signal.SIGKILL
        resumable = _inspect_after_kill(work, tally)
        if resumable or "no progress" in _describe(work):
            finished = subprocess.run(train_command(work, data, options, resume=resumable), capture_output=True,
                                      text=True)
            if finished.returncode != 0:
                tally.resume_failures += 1
                tally.notes.append(f"point {point}: {finished.stderr.strip()[-200:]}")
                continue
        if not np.array_equal(reference, weights(work)):
            tally.weight_mismatches += 1
            tally.notes.append(f"weights differ after a kill at commit point {point} of {total}")
        if _final_log_epochs(work) != logged:
            tally.lost_epochs += 1
            tally.notes.append(f"log {_final_log_epochs(work)} != {logged} after a kill at point {point}")
    return tally
