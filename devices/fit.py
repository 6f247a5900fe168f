"""Fitting training into a device profile: refuse a batch over the memory budget, or pick the largest that fits.
A split bundle that trains split (`train --split auto|on`) is priced as the split run it will be."""

from __future__ import annotations

from pathlib import Path

from edgeadapt.devices.planner import largest_fitting_batch, planned_peak
from edgeadapt.devices.profiles import get_profile
from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.errors import ConfigError
from edgeadapt.runtime.training_target import wants_split


def batch_for_profile(bundle_path: Path, profile_name: str, batch_size: int, auto: bool,
                      threads: int | None, split_mode: str = "auto") -> tuple[int, int]:
    """(batch size, threads) that fit `profile_name`; raises ConfigError saying by how much a batch is over."""
    profile = get_profile(profile_name)
    bundle = Bundle.open(bundle_path)
    split = wants_split(bundle, split_mode)
    if auto:
        best, _ = largest_fitting_batch(bundle.manifest, profile.memory_budget_mb, split=split)
        if best == 0:
            needed = planned_peak(bundle.manifest, 1, split)
            raise ConfigError(f"even batch 1 needs {needed:.0f} MB, over {profile.name}'s budget of "
                              f"{profile.memory_budget_mb} MB; export a lighter preset (head, bias, last:K).")
        return best, threads or profile.threads
    needed = planned_peak(bundle.manifest, batch_size, split)
    if needed > profile.memory_budget_mb:
        over = needed - profile.memory_budget_mb
        raise ConfigError(f"batch {batch_size} needs ~{needed:.1f} MB, {over:.1f} MB over {profile.name}'s "
                          f"budget of {profile.memory_budget_mb} MB; lower --batch-size or use --auto-batch.")
    return batch_size, threads or profile.threads
