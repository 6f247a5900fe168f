"""Fitting training into a device profile: refuse a batch over the memory budget, or pick the largest that fits —
and where that is smaller than the batch asked for, accumulate micro-batches up to it (`--accumulate`). A split
bundle that trains split (`train --split auto|on`) is priced as the split run it will be, on the engine that will
run it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from edgeadapt.devices.planner import largest_fitting_batch, planned_peak
from edgeadapt.devices.profiles import get_profile
from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.engines import resolve_engine
from edgeadapt.runtime.errors import ConfigError
from edgeadapt.runtime.training_target import wants_split


@dataclass(frozen=True)
class Fit:
    batch_size: int  # samples per micro-batch
    accumulate: int  # micro-batches per update
    threads: int

    def describe(self) -> str:
        batches = f"batch {self.batch_size}" if self.accumulate == 1 else \
            f"batch {self.batch_size} × {self.accumulate} accumulated (effective {self.batch_size * self.accumulate})"
        return f"{batches}, {self.threads} threads"


def batch_for_profile(bundle_path: Path, profile_name: str, batch_size: int, auto: bool,
                      threads: int | None, split_mode: str = "auto", accumulate: int = 1, engine: str = "auto",
                      device: str = "cpu") -> Fit:
    """The micro-batch, accumulation and threads that fit `profile_name` on `engine`; raises ConfigError saying by
    how much a batch is over. `auto`: the largest batch that fits; below `batch_size` × `accumulate` (the effective
    batch asked for), micro-batches of it accumulate to that."""
    profile = get_profile(profile_name)
    bundle = Bundle.open(bundle_path)
    split = wants_split(bundle, split_mode)
    threads = threads or profile.threads
    engine = resolve_engine(engine, device)
    if auto:
        wanted = batch_size * accumulate
        best, _ = largest_fitting_batch(bundle.manifest, profile.memory_budget_mb, split=split, engine=engine)
        if best >= wanted:
            return Fit(best, 1, threads)
        micro, _ = largest_fitting_batch(bundle.manifest, profile.memory_budget_mb, limit=wanted, split=split,
                                         accumulating=True, engine=engine)
        if micro == 0:
            needed = planned_peak(bundle.manifest, 1, split, accumulating=wanted > 1, engine=engine)
            raise ConfigError(f"even batch 1 needs {needed:.0f} MB, over {profile.name}'s budget of "
                              f"{profile.memory_budget_mb} MB; export a lighter preset (head, bias, last:K).")
        return Fit(micro, math.ceil(wanted / micro), threads)
    needed = planned_peak(bundle.manifest, batch_size, split, accumulating=accumulate > 1, engine=engine)
    if needed > profile.memory_budget_mb:
        over = needed - profile.memory_budget_mb
        raise ConfigError(f"batch {batch_size} needs ~{needed:.1f} MB, {over:.1f} MB over {profile.name}'s "
                          f"budget of {profile.memory_budget_mb} MB; lower --batch-size (--accumulate N keeps "
                          "the effective batch) or use --auto-batch.")
    return Fit(batch_size, accumulate, threads)
