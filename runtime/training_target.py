"""What a training run trains: the whole graph, or a split bundle's suffix behind its frozen prefix. Both read and
write the same state file (the suffix's trainable parameters are the whole graph's), so any sequence of whole and
split runs continues from the latest trained state. A split target runs the prefix on its backend once, through
the feature cache, or per batch when augmentation changes the inputs every epoch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from edgeadapt.runtime.bundle import Bundle, GraphFiles, sha256
from edgeadapt.runtime.data import Dataset, preprocess
from edgeadapt.runtime.errors import ConfigError
from edgeadapt.runtime.feature_cache import FeatureCache, namespace
from edgeadapt.runtime.prefix import PrefixRunner
from edgeadapt.runtime.state import digest

PREFIX_BATCH = 16  # prefix features are extracted in batches of min(16, batch size): early activations are large


@dataclass
class TrainingTarget:
    graphs: GraphFiles
    split: bool
    per_batch: Callable[[np.ndarray], np.ndarray] | None = None  # the prefix, run on every batch (augmentation)
    notes: list[str] = field(default_factory=list)


def features_of(data: Dataset, bundle: Bundle, runner: PrefixRunner, cache: FeatureCache | None,
                batch_size: int = PREFIX_BATCH) -> Dataset:
    """Prefix outputs of `data` (small batches: a prefix's early activations are its largest tensors)."""
    def compute(samples: np.ndarray) -> np.ndarray:  # filled in place: the chunks are never held twice
        features = None
        for start in range(0, len(samples), batch_size):
            chunk = runner(preprocess(samples[start:start + batch_size], bundle.manifest, data.is_image))
            if features is None:
                features = np.empty((len(samples), *chunk.shape[1:]), chunk.dtype)
            features[start:start + len(chunk)] = chunk
        return features

    values = cache.features(data.samples, compute) if cache else compute(data.samples)
    return Dataset(values, data.targets, False, data.skipped, data.names, features=True)


def bundle_statistics(bundle: Bundle) -> np.ndarray | None:
    """The bundle's current BN statistics (re-estimated by adapt-bn, or the exported ones)."""
    return bundle.load_state().statistics


def prefix_identity(model: bytes, statistics: np.ndarray | None) -> str:
    """What the prefix computes: its bytes and the BN statistics it is fed (AdaBN changes the features)."""
    if statistics is None:
        return sha256(model)
    return f"{sha256(model)}:{digest(statistics)}"


def prefix_model(bundle: Bundle, int8: bool) -> bytes:
    """The prefix's verified bytes: the exported one, or the INT8 one this device quantized."""
    if not int8:
        return bundle.read_graph(bundle.manifest.split.prefix_model)
    if not bundle.int8_prefix_path.is_file():
        raise ConfigError(f"{bundle.int8_prefix_path} does not exist; create it with `edgeadapt quantize-prefix "
                          f"{bundle.path} DATA`.")
    return bundle.read_device_graph(bundle.int8_prefix_path.name)


def wants_split(bundle: Bundle, mode: str) -> bool:
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"unknown --split '{mode}'; choose auto, on or off.")
    if mode == "on" and bundle.manifest.split is None:
        raise ConfigError("--split on needs a split bundle: export with a `head` or `last:K` preset.")
    return mode != "off" and bundle.manifest.split is not None


def prepare(bundle: Bundle, config, train: Dataset,
            val: Dataset | None) -> tuple[Dataset, Dataset | None, TrainingTarget]:
    """(train, val, target): the datasets as the target's graphs see them."""
    if not wants_split(bundle, config.split):
        return train, val, TrainingTarget(bundle.graphs(split=False), split=False)
    model = prefix_model(bundle, config.prefix_int8)
    statistics = bundle_statistics(bundle)
    runner = PrefixRunner(model, config.prefix_device, config.threads, statistics)
    space = namespace(prefix_identity(model, statistics), bundle.manifest.input, config.prefix_device)
    cache = FeatureCache(bundle.cache_path, space, config.cache_mb << 20, bundle.seal)
    target = TrainingTarget(bundle.graphs(split=True), split=True)
    chunk = min(PREFIX_BATCH, config.batch_size or PREFIX_BATCH)
    if config.augment and train.is_image:
        target.per_batch = runner
        target.notes.append("augmentation changes inputs every epoch: feature cache bypassed, prefix runs per batch")
    else:
        train = features_of(train, bundle, runner, cache, chunk)
    val = features_of(val, bundle, runner, cache, chunk) if val is not None else None
    target.notes += cache.notes
    return train, val, target
