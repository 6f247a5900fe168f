"""The one contract from host to device: `manifest.json`, a versioned frozen dataclass with file hashes.

Compatibility promise (see runtime/COMPATIBILITY.md): a runtime reads every manifest whose `schema_version` it
knows; new optional fields only ever get added within a schema version; anything else bumps the version, and a
runtime refuses a version it does not know with a message saying so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from edgeadapt.runtime.errors import BundleError

SCHEMA_VERSION = 3
SUPPORTED_SCHEMAS = (2, 3)  # 2: no BN statistics as state (edgeadapt 0.2)
MANIFEST_NAME = "manifest.json"
TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, CHECKPOINT = (
    "training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")
LOSSES = ("cross_entropy", "bce_with_logits", "mse", "l1")
OPTIMIZERS = ("adamw", "sgd")
# Bounds on what a manifest may ask the device to allocate (per sample, before any data is read).
MAX_SIDE = 8192  # image resize, each side
MAX_SAMPLE_ELEMENTS = 1 << 26  # one preprocessed sample: 256 MB of float32
MAX_LABELS = 100_000
MAX_BATCH = 1 << 16
# What a manifest's hyperparameters mean when they lack a batch size or epochs (every export writes its own).
DEFAULT_BATCH, DEFAULT_EPOCHS = 32, 5


MAX_ACCUMULATION = 1024


def default_batch(m: "Manifest") -> int:
    return int(m.hyperparameters.get("batch_size", DEFAULT_BATCH))


def default_accumulation(m: "Manifest") -> int:
    """Micro-batches per update the export chose (`--trainable auto` on a small memory budget), else 1."""
    return int(m.hyperparameters.get("accumulate", 1))


@dataclass(frozen=True)
class TokenSpec:
    """Text input: WordPiece token ids of the bundle's vocabulary ([CLS] text [SEP], truncated, right-padded)."""

    vocab_file: str  # one token per line, its line number its id (in the bundle, listed and hashed)
    vocab_size: int
    max_length: int
    pad_id: int
    cls_id: int
    sep_id: int
    unk_id: int
    lowercase: bool = True  # BERT's normaliser: lowercase and strip accents
    max_chars_per_word: int = 100  # longer words become [UNK]


@dataclass(frozen=True)
class AudioSpec:
    """Speech input: Whisper's log-mel features of a clip padded or cut to `samples` at `sample_rate`."""

    sample_rate: int
    samples: int
    n_mels: int = 80
    n_fft: int = 400
    hop_length: int = 160

    @property
    def frames(self) -> int:
        return self.samples // self.hop_length


INPUT_KINDS = {"NCHW": "image", "NC": "features", "NT": "tokens", "NCT": "audio"}


@dataclass(frozen=True)
class InputSpec:
    """The model input and how raw samples become it."""

    name: str
    shape: list[int]  # -1 for the batch dimension
    dtype: str  # "float32"; "int64" for token ids
    layout: str  # "NCHW" images, "NC" feature rows, "NT" token ids (0.4), "NCT" audio features (0.4)
    channels: str  # "RGB", "L" or "" for non-images
    mean: list[float]
    std: list[float]
    resize: list[int] = field(default_factory=list)  # [H, W] for images
    crop: float = 0.875  # images: shorter side resized to H / crop, then an H×W centre crop (1.0: no crop)
    tokens: TokenSpec | None = None  # layout NT
    audio: AudioSpec | None = None  # layout NCT

    @property
    def kind(self) -> str:
        return INPUT_KINDS[self.layout]


@dataclass(frozen=True)
class SparseLayer:
    """One layer a sparse export trains: its output channels (empty: the whole tensor), parameters, contribution
    score (sum of |mean gradient| on the calibration samples) and the planned training memory they take."""

    name: str
    channels: list[int]
    total_channels: int
    params: int
    score: float
    mb: float


@dataclass(frozen=True)
class SparseSpec:
    """What `--trainable sparse` chose and why (shown by `inspect`). Split layers appear in `trainable` as
    `<name>@sel` (the channels listed here) with their frozen rest `<name>@rest` among the frozen tensors."""

    budget_mb: float
    batch_size: int
    planned_mb: float
    cut: str  # the earliest block that trains (biases from there on always train); "": the head alone
    calibration_samples: int
    layers: list[SparseLayer]
    always: int  # tensors that train whatever the scores: the head and the biases after the cut
    always_params: int
    always_score: float


SUFFIX_PREFIX = "suffix_"  # the file-name prefix of a split bundle's suffix graphs and memory record


@dataclass(frozen=True)
class SplitSpec:
    """Split execution: a frozen prefix as a plain inference model, and the trainable suffix as training artifacts
    (ORT's standard names with a `suffix_` prefix) that take the prefix's output, `boundary`, as input."""

    boundary: str
    boundary_shape: list[int]  # -1 for the batch dimension
    prefix_model: str = "prefix.onnx"
    suffix_prefix: str = SUFFIX_PREFIX
    prefix_statistics: list[str] = field(default_factory=list)  # the BN statistics the prefix reads


@dataclass(frozen=True)
class ParamGroup:
    """Trainable tensors that share one learning-rate multiplier (of the step's `lr` input) and one decoupled weight
    decay; the portable step applies them in-graph, so every engine honours them."""

    name: str
    lr_scale: float
    weight_decay: float
    tensors: list[str]


@dataclass(frozen=True)
class StateLayout:
    """Where one trainable tensor lives in the flat state vectors."""

    name: str
    shape: list[int]
    offset: int
    size: int


GRAD_SUM, GRAD_SHARE = "grad_sum", "grad_share"  # the accumulating step's extra inputs
ACCUMULATING_STEP = "train_step_accumulating.onnx"


@dataclass(frozen=True)
class PortableSpec:
    """The portable training step: standard-ONNX graphs any maintained engine runs (see runtime/COMPATIBILITY.md).
    `train_step(input, labels, lr, step, *state) -> loss, logits, *state.new`; `forward(input, params) -> logits`.
    Split bundles add the same two graphs for the suffix, named with the split's `suffix_prefix`."""

    layout: list[StateLayout]
    state: list[str]  # state vectors in the step's input order: params, then the optimizer's moments
    opset: int
    ir_version: int
    train_step: str = "train_step.onnx"
    forward: str = "forward.onnx"
    state_file: str = "state.safetensors"
    # BN running statistics, frozen in training: every graph's `bn_stats` input, in the state file; re-estimated
    # on the device by `adapt-bn` through `statistics_graph` ((input, params) -> per BN: batch mean, unbiased var)
    statistics: list[StateLayout] = field(default_factory=list)
    statistics_graph: str = ""
    statistics_sha256: str = ""  # of the exported statistics, which ONNX Runtime training's artifacts fold in
    # gradient accumulation (0.4): the step with two more inputs, GRAD_SUM and GRAD_SHARE, and one more output
    # GRAD_SUM + ".new", the gradient its update uses (COMPATIBILITY.md 4a); "" in bundles exported before
    accumulating_step: str = ""


@dataclass(frozen=True)
class LoraTarget:
    """One adapted layer: its frozen weight W (a constant of the forward graph) and the trainable A and B."""

    weight: str
    a: str
    b: str
    shape: list[int]  # W's shape; B·A is reshaped to it


@dataclass(frozen=True)
class LoraSpec:
    """`--trainable lora:R`: the adapted layers compute with W + (alpha/rank)·B·A. `merged_forward` is the
    forward graph of the merged model, whose `params` follow `merged_layout` (the trained tensors without the
    adapters, and each target's merged W): deploy bakes plain weights into it."""

    rank: int
    alpha: float
    dropout: float
    targets: list[LoraTarget]
    merged_forward: str = "merged_forward.onnx"
    merged_layout: list[StateLayout] = field(default_factory=list)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    edgeadapt_version: str
    backbone: str
    weights: str
    preset: str
    bn_policy: str
    input: InputSpec
    output_name: str
    labels: list[str]
    loss: str
    optimizer: str
    hyperparameters: dict[str, float]
    trainable: list[str]
    frozen: list[str]
    buffers: list[str]
    trainable_params: int
    frozen_params: int
    opset: int
    ir_version: int
    onnxruntime_version: str
    files: dict[str, str]
    validation: dict[str, float] = field(default_factory=dict)
    created: str = ""
    notes: list[str] = field(default_factory=list)
    portable: PortableSpec | None = None  # schema 2: required (checked below)
    split: SplitSpec | None = None
    memory: dict[str, float] = field(default_factory=dict)  # per-sample activation bytes of each graph (planner)
    sparse: SparseSpec | None = None  # `--trainable sparse`: the selection and its reasons
    sizes: dict[str, int] = field(default_factory=dict)  # bytes of each exported file (0.3.1; bounds `unpack`)
    # 0.4: every trainable tensor in exactly one group (empty in older bundles: one lr, `weight_decay` for all)
    param_groups: list[ParamGroup] = field(default_factory=list)
    lora: LoraSpec | None = None  # 0.4: `--trainable lora:R`

    @property
    def num_outputs(self) -> int:
        return len(self.labels)

    @property
    def is_classification(self) -> bool:
        return self.loss in ("cross_entropy", "bce_with_logits")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = MANIFEST_NAME) -> "Manifest":
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{source} is not valid JSON ({exc}); re-export the bundle.") from None
        if not isinstance(raw, dict):
            raise BundleError(f"{source} must hold a JSON object; re-export the bundle.")
        version = raw.get("schema_version")
        if version == 1:
            raise BundleError(f"{source} is a schema-1 bundle (edgeadapt 0.1, onnxruntime-training only); this runtime "
                              f"reads schemas {list(SUPPORTED_SCHEMAS)}, which carry the portable training step: "
                              "re-export it with `edgeadapt export`.")
        if version not in SUPPORTED_SCHEMAS:
            raise BundleError(
                f"{source} has schema_version {version!r}, this runtime reads {list(SUPPORTED_SCHEMAS)}; "
                "update edgeadapt on the device or re-export with a matching version.")
        return _checked(_build(cls, raw, source), source)

    @classmethod
    def read(cls, bundle_dir: Path) -> "Manifest":
        path = Path(bundle_dir) / MANIFEST_NAME
        if not path.is_file():
            raise BundleError(f"{bundle_dir} has no {MANIFEST_NAME}: it is not an edgeadapt bundle; "
                              "create one with `edgeadapt export`.")
        try:
            return cls.from_json(path.read_text(encoding="utf-8"), str(path))
        except UnicodeDecodeError:
            raise BundleError(f"{path} is not UTF-8 text; re-export the bundle.") from None


def is_plain_name(name: str) -> bool:
    """A file name that can only mean a file directly inside the bundle folder, on every platform."""
    return (isinstance(name, str) and 0 < len(name) <= 200 and not name.startswith(".") and
            not any(c in name for c in '/\\:\0') and name == name.strip() and name.isprintable())


def referenced_files(m: "Manifest") -> list[str]:
    """The files the device runtime reads, besides the manifest: each must be a plain name listed in `files`."""
    portable = m.portable
    names = [portable.train_step, portable.forward, portable.state_file]
    names += [portable.statistics_graph] if portable.statistics_graph else []
    names += [portable.accumulating_step] if portable.accumulating_step else []
    names += [m.input.tokens.vocab_file] if m.input.tokens else []
    names += [m.lora.merged_forward] if m.lora else []
    if m.split is not None:
        names += [m.split.prefix_model, m.split.suffix_prefix + portable.train_step,
                  m.split.suffix_prefix + portable.forward]
        names += [m.split.suffix_prefix + portable.accumulating_step] if portable.accumulating_step else []
    return names


def ort_training_files(m: "Manifest") -> list[str]:
    """The listed files only the `ort-training` engine reads (ONNX Runtime training's artifacts, of the whole graph
    and of a split bundle's suffix): an archive packed for apps leaves them out, so they may be absent."""
    prefixes = [""] + ([m.split.suffix_prefix] if m.split is not None else [])
    names = (f"{prefix}{name}" for prefix in prefixes for name in (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL,
                                                                     CHECKPOINT))
    return [name for name in names if name in m.files]


def _checked(m: "Manifest", source: str) -> "Manifest":
    """Well-typed is not enough: refuse values no export writes (they would fail later, far from the cause)."""
    spec = m.input
    problems = [
        (m.loss not in LOSSES, f"loss '{m.loss}' is unknown"),
        (m.optimizer not in OPTIMIZERS, f"optimizer '{m.optimizer}' is unknown"),
        (len(m.labels) < 1 or len(set(m.labels)) != len(m.labels), "labels are empty or repeated"),
        (len(m.labels) > MAX_LABELS, f"{len(m.labels)} labels is more than {MAX_LABELS}"),
        (not m.output_name, "output_name is empty"),
        (len(spec.shape) < 2 or spec.shape[0] != -1 or any(d < 1 for d in spec.shape[1:]),
         f"input shape {spec.shape} is not [-1, positive dims…]"),
        (len(spec.shape) >= 2 and math.prod(max(d, 1) for d in spec.shape[1:]) > MAX_SAMPLE_ELEMENTS,
         f"input shape {spec.shape} is over {MAX_SAMPLE_ELEMENTS:,} values per sample"),
        (spec.layout not in INPUT_KINDS, f"layout '{spec.layout}' is unknown"),
        *_input_kind_problems(spec),
        (spec.layout == "NCHW" and (spec.channels not in ("RGB", "L") or len(spec.resize) != 2 or
                                    any(d < 1 for d in spec.resize) or len(spec.shape) != 4),
         "image input needs channels RGB or L, a 2-number resize and an NCHW shape"),
        (any(d > MAX_SIDE for d in spec.resize), f"resize {spec.resize} has a side over {MAX_SIDE}"),
        (spec.layout == "NCHW" and len(spec.shape) == 4 and list(spec.shape[2:]) != list(spec.resize),
         f"image resize {spec.resize} differs from the input shape {spec.shape}"),
        (not spec.mean or len(spec.mean) != len(spec.std) or
         not all(math.isfinite(v) for v in spec.mean + spec.std) or any(not v >= 1e-6 for v in spec.std),
         "mean/std are empty, of different lengths, not finite, or a std is below 1e-6"),
        (not 0 < spec.crop <= 1, f"crop {spec.crop} is not in (0, 1]"),
        (not m.trainable, "no trainable parameter"),
        (m.portable is None or [p.name for p in m.portable.layout] != m.trainable,
         "the portable step's state layout does not list the trainable parameters"),
        *_hyperparameter_problems(m.hyperparameters),
        *_group_problems(m),
        *_file_problems(m),
    ]
    for failed, what in problems:
        if failed:
            raise BundleError(f"{source}: {what}; re-export the bundle.")
    return m


def _input_kind_problems(spec: InputSpec) -> list[tuple[bool, str]]:
    """Token and audio inputs: the section their layout needs, and a shape that matches it."""
    tokens, audio = spec.tokens, spec.audio
    return [
        (spec.dtype != ("int64" if spec.layout == "NT" else "float32"), f"input dtype {spec.dtype} does not fit "
         f"layout {spec.layout}"),
        ((spec.layout == "NT") != (tokens is not None), "token ids need layout NT and a tokens section"),
        (tokens is not None and (list(spec.shape) != [-1, tokens.max_length] or
                                 not 0 < tokens.max_length <= 8192 or not 0 < tokens.vocab_size <= 10_000_000 or
                                 not all(0 <= i < tokens.vocab_size for i in (tokens.pad_id, tokens.cls_id,
                                                                               tokens.sep_id, tokens.unk_id))),
         "the tokens section does not fit the input shape or its vocabulary"),
        ((spec.layout == "NCT") != (audio is not None), "audio features need layout NCT and an audio section"),
        (audio is not None and (list(spec.shape) != [-1, audio.n_mels, audio.frames] or
                                not 8000 <= audio.sample_rate <= 192_000 or
                                not 0 < audio.samples <= 3600 * audio.sample_rate or
                                not 0 < audio.hop_length <= audio.n_fft <= 8192 or not 0 < audio.n_mels <= 512),
         "the audio section does not fit the input shape"),
    ]


def _hyperparameter_problems(given: dict[str, float]) -> list[tuple[bool, str]]:
    def whole(name: str, limit: int) -> tuple[bool, str]:
        value = given.get(name, 1.0)
        return (not (math.isfinite(value) and value == int(value) and 1 <= value <= limit),
                f"the default {name} {value} is not a whole number in 1..{limit}")
    return [
        ("lr" in given and not (math.isfinite(given["lr"]) and given["lr"] > 0), "the default lr is not positive"),
        ("weight_decay" in given and not (math.isfinite(given["weight_decay"]) and given["weight_decay"] >= 0),
         "the default weight_decay is negative"),
        whole("batch_size", MAX_BATCH), whole("epochs", 1_000_000), whole("accumulate", MAX_ACCUMULATION),
    ]


def _group_problems(m: "Manifest") -> list[tuple[bool, str]]:
    if not m.param_groups:
        return []
    listed = [t for g in m.param_groups for t in g.tensors]
    values = [v for g in m.param_groups for v in (g.lr_scale, g.weight_decay)]
    return [
        (sorted(listed) != sorted(m.trainable), "param_groups do not hold every trainable tensor exactly once"),
        (not all(math.isfinite(v) and v >= 0 for v in values), "a parameter group's lr_scale or decay is negative"),
    ]


def is_uniform(m: "Manifest") -> bool:
    """One learning rate and one decay for every trainable tensor (what ONNX Runtime training's optimizer takes)."""
    return len({(g.lr_scale, g.weight_decay) for g in m.param_groups}) <= 1 and \
        all(g.lr_scale == 1.0 for g in m.param_groups)


def _file_problems(m: "Manifest") -> list[tuple[bool, str]]:
    """Every file name is a plain name in the bundle folder, listed and hashed; the state file is the one."""
    if m.portable is None:
        return []
    bad_names = [n for n in list(m.files) + referenced_files(m) + list(m.sizes) if not is_plain_name(n)]
    unlisted = [n for n in referenced_files(m) if n not in m.files]
    hashes = [h for h in m.files.values() if len(h) != 64 or any(c not in "0123456789abcdef" for c in h)]
    return [
        (bool(bad_names), f"file name {bad_names[:1]!r} is not a plain name inside the bundle folder"),
        (not bad_names and bool(unlisted), f"{unlisted[:1]} is read but not listed (and hashed) in `files`"),
        (bool(hashes), "a sha256 in `files` is not 64 hex digits"),
        (m.portable.state_file != "state.safetensors",
         f"state_file {m.portable.state_file!r} is not state.safetensors"),
        (MANIFEST_NAME in m.files, "files lists manifest.json itself"),
        (any(n not in m.files or v < 0 for n, v in m.sizes.items()), "sizes names unlisted files or negative sizes"),
    ]


def _build(cls, raw: dict, source: str):
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise BundleError(f"{source} misses the field '{f.name}'; re-export the bundle.")
            continue
        values[f.name] = _check(raw[f.name], hints[f.name], f"{source}: {f.name}")
    return cls(**values)


def _check(value, hint, where: str):
    """Check `value` against a simple type hint (str, int, float, list[X], dict[str, X], dataclass, X | None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return None if value is None else _check(value, inner, where)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise BundleError(f"{where} must be an object; re-export the bundle.")
        return _build(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise BundleError(f"{where} must be a list; re-export the bundle.")
        return [_check(v, args[0], where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise BundleError(f"{where} must be an object; re-export the bundle.")
        return {str(k): _check(v, args[1], where) for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise BundleError(f"{where} must be {hint.__name__}, got {type(value).__name__}; re-export the bundle.")
    return value


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
