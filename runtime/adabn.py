"""AdaBN on the device: re-estimate the frozen BatchNorm statistics from local, unlabelled data, forward only.

The bundle's statistics graph runs the network with every BN normalising by its batch statistics (train mode) and
returns them; their average over the batches — PyTorch's cumulative average (`momentum=None`), unbiased variances
— replaces the running statistics of every BN (`scope` "all") or of the frozen prefix's only ("prefix"). The
statistics are state: they go to the state file, every graph reads them (`bn_stats`), training keeps them frozen,
`deploy` bakes them in, and a split bundle's feature cache is keyed on them (its prefix features are recomputed)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.data import Dataset, as_model_input, load_unlabeled, preprocess
from edgeadapt.runtime.errors import ConfigError, DataError
from edgeadapt.runtime.lock import bundle_lock
from edgeadapt.runtime.manifest import DEFAULT_BATCH
from edgeadapt.runtime.ort import onnxruntime_module, session_options

SCOPES = ("all", "prefix")


@dataclass(frozen=True)
class AdaBNResult:
    samples: int
    batches: int
    statistics: int  # running means and variances replaced
    scope: str
    relative_change: float  # ‖new − old‖ / ‖old‖ over the replaced statistics
    seconds: float


def adapt_bn(bundle: Bundle | str | Path, data: Dataset | str | Path, scope: str = "all",
             batch_size: int = DEFAULT_BATCH,
             threads: int | None = None) -> AdaBNResult:
    """Re-estimate the bundle's BN statistics from `data` (labels unused), under the trainer's lock."""
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    dataset = data if isinstance(data, Dataset) else load_unlabeled(data, bundle)
    with bundle_lock(bundle.lock_path):
        return adapt_bn_locked(bundle, dataset, scope, batch_size, threads)


def _replaced(bundle: Bundle, scope: str) -> list:
    portable, split = bundle.manifest.portable, bundle.manifest.split
    if scope not in SCOPES:
        raise ConfigError(f"unknown --scope '{scope}'; choose all or prefix.")
    if not portable.statistics_graph:
        raise ConfigError(f"{bundle.path} has no BN statistics to re-estimate (no BatchNorm, --bn ort, or exported "
                          "before edgeadapt 0.3); re-export it with --bn fold.")
    if scope == "all":
        return list(portable.statistics)
    if split is None or not split.prefix_statistics:
        raise ConfigError(f"{bundle.path} has no frozen prefix with BatchNorm; use --scope all.")
    return [p for p in portable.statistics if p.name in set(split.prefix_statistics)]


def adapt_bn_locked(bundle: Bundle, data: Dataset, scope: str, batch_size: int,
                    threads: int | None) -> AdaBNResult:
    """adapt_bn for a caller that holds the bundle's lock (the trainer's `--adabn`)."""
    started = time.monotonic()
    replaced = _replaced(bundle, scope)
    if batch_size < 2 or len(data) < 2:
        raise DataError("AdaBN needs batches of at least 2 samples (a BN's batch variance needs 2); give more "
                        "samples or a larger --batch-size.")
    state = bundle.load_state()
    estimate, batches = batch_statistics(bundle, data, state.params, batch_size, threads)
    old = state.statistics.copy()
    for p in replaced:
        state.statistics[p.offset:p.offset + p.size] = estimate[p.offset:p.offset + p.size]
    bundle.save_state(state)
    bundle.int8_prefix_path.unlink(missing_ok=True)  # quantized with the old statistics: quantize-prefix again
    changed = np.concatenate([np.arange(p.offset, p.offset + p.size) for p in replaced])
    change = float(np.linalg.norm(state.statistics[changed] - old[changed]) / max(np.linalg.norm(old[changed]), 1e-12))
    return AdaBNResult(len(data), batches, len(replaced), scope, change, time.monotonic() - started)


def batch_statistics(bundle: Bundle, data: Dataset, params: np.ndarray, batch_size: int,
                     threads: int | None = None) -> tuple[np.ndarray, int]:
    """The statistics graph over `data` in order, averaged over batches (a last batch of one sample is dropped);
    the estimate and the number of batches."""
    graph = bundle.read_graph(bundle.manifest.portable.statistics_graph)
    session = onnxruntime_module().InferenceSession(graph, session_options(threads),
                                                    providers=["CPUExecutionProvider"])
    total, count = None, 0
    for start in range(0, len(data), batch_size):
        samples = data.samples[start:start + batch_size]
        if len(samples) < 2:
            break
        x = samples if data.features else preprocess(samples, bundle.manifest, data.is_image)
        (values,) = session.run(None, {"input": as_model_input(x), "params": params})
        total = values.astype(np.float64) if total is None else total + values
        count += 1
    estimate = (total / count).astype(np.float32)
    if not np.isfinite(estimate).all():
        raise DataError("the data gives non-finite BN statistics (constant channels in every batch?); check it.")
    return estimate, count
