"""`--trainable auto --profile P`: the strategy with the best expected accuracy that fits the device's memory.

Rule, from the study (benchmarks/study.py; docs/study/results.md: MobileNetV2 ImageNet, Fashion-MNIST, 1-50 images
per class, 3 seeds): `full` was the most accurate at every shot count (83.1% at 50/class); `last:2` matched `bias`
(81.8% vs 81.6% at 50/class, within a point elsewhere) at less than half the peak memory (372 vs 784 MB) and a
sixth of the time, so `bias` is never the best choice that fits; `head` came next (79.2%); every pretrained
strategy beat `scratch` (68.7%) by 10-22 points. Candidates are therefore tried in the order full, last:2, head;
the first whose planned peak fits 90% of the profile's budget at a batch of at least MIN_BATCH (head: 1) is chosen,
with the largest such batch up to 32.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from edgeadapt.devices.planner import largest_fitting_batch, planned_peak
from edgeadapt.devices.profiles import DeviceProfile
from edgeadapt.runtime.errors import ConfigError

PREFERENCE = ("full", "last:2", "head")
MIN_BATCH, MAX_BATCH = 8, 32
HEADROOM = 0.9  # plan to 90% of the budget: the planner was within ±4% on the reference machine


def choose(opts, profile: DeviceProfile) -> tuple[str, int, list[str]]:
    """(preset, batch size, reasons) for `opts` under `profile`'s memory budget."""
    from edgeadapt.toolchain.export import export_bundle

    reasons = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in PREFERENCE:
            candidate = export_bundle(replace(opts, out=Path(tmp) / preset.replace(":", ""), trainable=preset,
                                              validate=False, sign=None, ort_format=False, force=True))
            batch, peak = largest_fitting_batch(candidate.out, candidate.manifest, HEADROOM * profile.memory_budget_mb,
                                                limit=MAX_BATCH, split=True)
            if batch >= (1 if preset == "head" else MIN_BATCH):
                reasons.append(f"chose {preset} at batch {batch} (planned {peak:.0f} MB of {profile.name}'s "
                               f"{profile.memory_budget_mb} MB)")
                return preset, batch, reasons
            needed = planned_peak(candidate.out, candidate.manifest, MIN_BATCH, split=True)
            reasons.append(f"{preset} needs {needed:.0f} MB at batch {MIN_BATCH}")
    raise ConfigError(f"nothing fits {profile.name}'s budget of {profile.memory_budget_mb} MB ({'; '.join(reasons)});"
                      " use a smaller --input-size or a smaller backbone.")
