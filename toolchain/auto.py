"""`--trainable auto --profile P`: the strategy with the best expected accuracy that fits the device's memory.

Rule, from the study (benchmarks/study.py; docs/study/results.md: MobileNetV2 ImageNet, Fashion-MNIST, 1-50 images
per class, 3 seeds): `full` was the most accurate at every shot count (83.1% at 50/class); `sparse` at last:2's
planned memory came next (82.3% at 50/class, 79.1% at 20) at less measured memory than last:2 (300-325 vs 372 MB),
beating `last:2` by 0.5-1 point at every k but k=5 (a tie); `last:2` matched `bias` (81.8% vs 81.6%) at half the
memory, so `bias` is never the best choice that fits; `head` came next (79.2%); every pretrained strategy beat
`scratch` (68.7%) by 10-22 points. Candidates are therefore tried in the order full, sparse, last:2, head; the first
whose planned peak fits 80% of the profile's budget at a batch of at least MIN_BATCH (head: 1) is chosen, with the
largest such batch up to 32. Where a candidate fits only a smaller micro-batch (at least MIN_MICRO_BATCH), it is
chosen with gradient accumulation up to an effective batch of MIN_BATCH: with frozen BN statistics, accumulated
micro-batches train as the big batch (tests/test_accumulation.py), so the study's ranking holds, only slower.
`sparse` needs `--calibration` samples to score (skipped without them) and fits
wherever the head does, since its selection fills the budget; if no selection fits after all, the next one is
taken. Each candidate is planned from its training step built in memory: nothing is exported until the choice is made.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from edgeadapt.devices.profiles import DeviceProfile
from edgeadapt.runtime.errors import ConfigError
from edgeadapt.toolchain.plan import make_plan
from edgeadapt.toolchain.presets import HEAD, auto_ranking, preset_of, resolve_lists
from edgeadapt.toolchain.pricing import pricing

MIN_BATCH, MAX_BATCH = 8, 32
MIN_MICRO_BATCH = 2  # below it a step's fixed costs dominate and the planner is least accurate
HEADROOM = 0.8  # plan to 80% of the budget: the planner is −10% … +16% off the measured peak (devices/planner.py)


def _planner(source, opts, preset: str):
    """batch -> planned peak MB of training with `preset` as the device will run it (split where it splits)."""
    lists = resolve_lists(source, preset)
    sizes = {i.name: int(np.prod(i.dims)) for i in source.graph.graph.initializer}
    total = sum(sizes[n] for n in lists.trainable + lists.frozen)
    trainable = sum(sizes[n] for n in lists.trainable)
    groups = make_plan(opts, source, lists).training.groups  # the groups the export will give the step
    measured = pricing(source.graph, lists.trainable, opts, 1, total, kind=source.input.kind, groups=groups)
    return lambda batch, accumulating=False: replace(measured, batch=batch).peak(trainable, accumulating)


def _largest_batch(peak_at, budget: float, accumulating: bool = False) -> int:
    batch = MAX_BATCH
    while batch >= 1 and peak_at(batch, accumulating) > budget:
        batch //= 2
    return batch


def choose(source, opts, profile: DeviceProfile, skip: tuple[str, ...] = (),
           adapted=None) -> tuple[str, int, int, list[str]]:
    """(preset, batch size, micro-batches per update, reasons) for `opts` under `profile`'s memory budget.
    `adapted(preset)`: the source with a preset's new tensors (LoRA's adapters), to plan it."""
    budget, reasons = HEADROOM * profile.memory_budget_mb, []
    for preset in (p for p in auto_ranking(source.input.kind) if p not in skip):
        scored = preset_of(preset).scored
        if scored and (opts.calibration is None or source.torch_module is None):
            reasons.append(f"{preset} needs --calibration and a torch model")
            continue
        # a scored selection fills whatever the budget leaves above the head: it fits where the head fits
        planned_source = adapted(preset) if preset_of(preset).adapters and adapted else source
        peak_at = _planner(planned_source, opts, HEAD if scored else preset)
        batch = _largest_batch(peak_at, budget)
        if batch >= (1 if preset == HEAD else MIN_BATCH):
            planned = f"the selection fills {budget:.0f} MB" if scored else \
                f"planned {peak_at(batch):.0f} MB"
            reasons.append(f"chose {preset} at batch {batch} ({planned} of {profile.name}'s "
                           f"{profile.memory_budget_mb} MB)")
            return preset, batch, 1, reasons
        micro = 0 if scored else _largest_batch(peak_at, budget, accumulating=True)
        if micro >= MIN_MICRO_BATCH:
            accumulate = -(-MIN_BATCH // micro)
            reasons.append(f"chose {preset} at batch {micro} × {accumulate} accumulated (planned "
                           f"{peak_at(micro, True):.0f} MB of {profile.name}'s {profile.memory_budget_mb} MB; "
                           f"batch {MIN_BATCH} would need {peak_at(MIN_BATCH):.0f} MB)")
            return preset, micro, accumulate, reasons
        reasons.append(f"{preset} needs {peak_at(MIN_BATCH):.0f} MB at batch {MIN_BATCH}")
    raise ConfigError(f"nothing fits {profile.name}'s budget of {profile.memory_budget_mb} MB ({'; '.join(reasons)});"
                      " use a smaller --input-size or a smaller backbone.")
