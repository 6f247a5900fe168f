"""Fitting training into a device profile: refuse a batch over the memory budget, or pick the largest that fits."""

from __future__ import annotations

from pathlib import Path

from edgeadapt.devices.planner import largest_fitting_batch, plan_memory
from edgeadapt.devices.profiles import get_profile
from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.errors import ConfigError


def batch_for_profile(bundle_path: Path, profile_name: str, batch_size: int, auto: bool,
                      threads: int | None) -> tuple[int, int]:
    """(batch size, threads) that fit `profile_name`; raises ConfigError saying by how much a batch is over."""
    profile = get_profile(profile_name)
    bundle = Bundle.open(bundle_path)
    if auto:
        best, _ = largest_fitting_batch(bundle.manifest, profile.memory_budget_mb)
        if best == 0:
            plan = plan_memory(bundle.manifest, 1)
            raise ConfigError(f"even batch 1 needs {plan.total_mb:.0f} MB, over {profile.name}'s budget of "
                              f"{profile.memory_budget_mb} MB; export a lighter preset (head, bias, last:K).")
        return best, threads or profile.threads
    plan = plan_memory(bundle.manifest, batch_size)
    if plan.total_mb > profile.memory_budget_mb:
        over = plan.total_mb - profile.memory_budget_mb
        raise ConfigError(f"batch {batch_size} needs ~{plan.total_mb:.0f} MB, {over:.0f} MB over {profile.name}'s "
                          f"budget of {profile.memory_budget_mb} MB; lower --batch-size or use --auto-batch.")
    return batch_size, threads or profile.threads
