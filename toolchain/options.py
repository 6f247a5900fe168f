"""What `edgeadapt export` is asked for: the options (one owner of their defaults, which the CLI reads) and the
head request. Light on purpose: the CLI imports it for its help on machines without torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgeadapt.models.registry import BackboneSpec
from edgeadapt.toolchain.plan import DEFAULT_WEIGHT_DECAY
from edgeadapt.toolchain.presets import HEAD as DEFAULT_PRESET


@dataclass(frozen=True)
class HeadRequest:
    """Exactly one of: a number of classes, label names, or keeping the pretrained classifier."""

    num_classes: int | None = None
    labels: tuple[str, ...] = ()
    keep_head: bool = False



@dataclass(frozen=True)
class ExportOptions:
    out: Path
    backbone: str | None = None  # a zoo name
    model: str | None = None  # package.module:factory
    head: HeadRequest = field(default_factory=HeadRequest)
    trainable: str = DEFAULT_PRESET
    weights: str | None = None  # None: the zoo's pretrained weights where it has them (else random, with a note)
    input_size: tuple[int, ...] | None = None
    loss: str = "cross_entropy"
    optimizer: str = "adamw"
    lr: float | None = None  # the head's rate (None: toolchain/plan.py's default for the optimizer)
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    backbone_lr_ratio: float | None = None  # None: 0.1 for pretrained weights, 1 for random ones (toolchain/plan.py)
    decay_norms: bool = False  # also decay biases and norm parameters (one group: what ORT training's AdamW does)
    bn: str = "fold"
    ort_format: bool = False
    validate: bool = True
    force: bool = False
    seed: int = 0
    user_spec: BackboneSpec | None = None  # input size, mean/std and head name of a --model or --onnx
    onnx: Path | None = None  # an existing ONNX model
    head_params: tuple[str, ...] = ()  # with --onnx: the head's initializers
    feature_output: str | None = None  # with --onnx: the tensor to put a new head on
    vocab: Path | None = None  # with --onnx of a text model: its WordPiece vocabulary
    sign: Path | None = None  # ed25519 private key: write manifest.sig
    split: bool = True  # also emit prefix.onnx + suffix_* artifacts when the frozen part is a prefix
    profile: str | None = None  # with trainable="auto": the device profile (name or TOML file) to fit
    auto_notes: tuple[str, ...] = ()  # why `auto` chose the preset (recorded in the manifest)
    auto_batch: int | None = None
    auto_accumulate: int = 1  # micro-batches per update `auto` chose where memory forced a batch under MIN_BATCH
    budget_mb: float | None = None  # with trainable="sparse": planned peak training memory to fit (else the profile's)
    calibration: Path | None = None  # with trainable="sparse": labelled samples (the user's, or a proxy) to score
    threads: int | None = None  # torch's and the validation sessions' (None: export_threads)
