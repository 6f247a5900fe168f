"""Training a split bundle: the frozen prefix runs on its backend (once, through the feature cache, or per batch
when augmentation changes the inputs every epoch) and only the suffix trains, on the CPU."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.data import Dataset, preprocess
from edgeadapt.runtime.errors import ConfigError
from edgeadapt.runtime.feature_cache import FeatureCache, namespace
from edgeadapt.runtime.manifest import sha256_file
from edgeadapt.runtime.prefix import PrefixRunner

CACHE_FOLDER = "feature_cache"
PREFIX_BATCH = 16  # prefix features are extracted in batches of min(16, batch size): early activations are large
INT8_PREFIX = "prefix_int8.onnx"


@dataclass
class SplitRun:
    graphs: str  # file-name prefix of the suffix artifacts
    checkpoint: Path
    best: Path
    runner: PrefixRunner
    per_batch: bool  # augmentation: run the prefix on every batch
    notes: list[str] = field(default_factory=list)


def features_of(data: Dataset, bundle: Bundle, runner: PrefixRunner, cache: FeatureCache | None,
                batch_size: int = 16) -> Dataset:
    """Prefix outputs of `data` (small batches: a prefix's early activations are its largest tensors)."""
    def compute(samples: np.ndarray) -> np.ndarray:
        return np.concatenate([runner(preprocess(samples[i:i + batch_size], bundle.manifest, data.is_image))
                               for i in range(0, len(samples), batch_size)])

    values = cache.features(data.samples, compute) if cache else compute(data.samples)
    return Dataset(values, data.targets, False, data.skipped, data.names, features=True)


def prefix_model(bundle: Bundle, int8: bool) -> Path:
    split = bundle.manifest.split
    model = bundle.path / (INT8_PREFIX if int8 else split.prefix_model)
    if not model.is_file():
        raise ConfigError(f"{model} does not exist; create it with `edgeadapt quantize-prefix {bundle.path} DATA`.")
    return model


def prepare(bundle: Bundle, config, train: Dataset,
            val: Dataset | None) -> tuple[Dataset, Dataset | None, SplitRun | None]:
    """(train, val, run): datasets as the suffix sees them, or unchanged with run None when not splitting."""
    split, mode = bundle.manifest.split, config.split
    if mode == "off" or (split is None and mode == "auto"):
        return train, val, None
    if split is None:
        raise ConfigError("--split on needs a split bundle: export with a `head` or `last:K` preset.")
    model = prefix_model(bundle, config.prefix_int8)
    runner = PrefixRunner(model, config.prefix_device, config.threads)
    space = namespace(sha256_file(model), bundle.manifest.input, config.prefix_device)
    cache = FeatureCache(bundle.path / CACHE_FOLDER, space, config.cache_mb << 20)
    per_batch = config.augment and train.is_image
    chunk = min(PREFIX_BATCH, config.batch_size)
    run = SplitRun(split.suffix_prefix, bundle.path / f"{split.suffix_prefix}checkpoint",
                   bundle.path / f"{split.suffix_prefix}checkpoint.best", runner, per_batch)
    if per_batch:
        run.notes.append("augmentation changes inputs every epoch: feature cache bypassed, prefix runs per batch")
    else:
        train = features_of(train, bundle, runner, cache, chunk)
    val = features_of(val, bundle, runner, cache, chunk) if val is not None else None
    run.notes += cache.notes
    return train, val, run
