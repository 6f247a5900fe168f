"""Step 1 of export: build the torch model (zoo entry or user factory), load weights, attach the task head."""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from edgeadapt.models.registry import BackboneSpec, get_entry
from edgeadapt.models.weights import resolve_weights
from edgeadapt.runtime.errors import ConfigError, WeightsError
from edgeadapt.toolchain.options import HeadRequest  # noqa: F401 (build's callers name it here too)


@dataclass
class BuiltModel:
    module: nn.Module
    spec: BackboneSpec
    labels: list[str]
    head_is_new: bool
    weights: str  # "imagenet", a path, or "random"
    notes: list[str] = field(default_factory=list)
    lora: object | None = None  # the manifest's LoraSpec once adapters are added (toolchain/lora.py)


def imagenet_labels() -> list[str]:
    return resources.files("edgeadapt.models").joinpath("imagenet_classes.txt").read_text().splitlines()


def resolve_labels(head: HeadRequest, pretrained_classes: int) -> tuple[list[str], bool]:
    """Labels of the exported model and whether the head is new."""
    chosen = [head.num_classes is not None, bool(head.labels), head.keep_head]
    if sum(chosen) != 1:
        raise ConfigError("give exactly one of --classes N, --labels FILE or --keep-head.")
    if head.keep_head and not pretrained_classes:
        raise ConfigError("this backbone has no pretrained classifier to keep; give --classes N or --labels FILE.")
    if head.keep_head:
        names = imagenet_labels() if pretrained_classes == 1000 else [f"class_{i}" for i in range(pretrained_classes)]
        return names, False
    labels = list(head.labels) or [f"class_{i}" for i in range(head.num_classes or 0)]
    if len(labels) < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {len(labels)}; give --classes 2 or more.")
    if len(set(labels)) != len(labels):
        raise ConfigError("--labels has duplicate names; give each class once.")
    return labels, True


def replace_head(module: nn.Module, head_name: str, num_outputs: int) -> None:
    """Swap the last Linear of the head for a freshly initialised one with `num_outputs` outputs."""
    head = module.get_submodule(head_name)
    if isinstance(head, nn.Linear):
        parent, _, attr = head_name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr, _new_linear(head.in_features, num_outputs))
        return
    last = [name for name, m in head.named_modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ConfigError(f"the head '{head_name}' has no Linear layer to replace; name another module with --head.")
    replace_head(module, f"{head_name}.{last[-1]}", num_outputs)


def _new_linear(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    nn.init.normal_(layer.weight, 0, 0.01)
    nn.init.zeros_(layer.bias)
    return layer


def load_weights(module: nn.Module, spec: BackboneSpec, weights: str | None) -> str:
    """Load `weights` into the module: a named source ('imagenet'), a file path, or None/'random' for random init.
    A path whose file name is an official weight file's is sha256-checked against it."""
    if weights in (None, "", "random"):
        return "random"
    if weights in spec.weights:
        path = resolve_weights(spec.weights[weights])
    elif weights in ("imagenet", "pretrained"):
        raise WeightsError(f"{spec.name} has no downloadable ImageNet weights; pass --weights PATH to a "
                           "torchvision-compatible state dict, or omit --weights for random init.")
    else:
        official = next((s for s in spec.weights.values() if s.filename == Path(weights).name), None)
        path = resolve_weights(official, weights) if official else Path(weights)
        if not path.is_file():
            raise WeightsError(f"weight file {path} does not exist; check the path or use --weights imagenet.")
    _load_state_dict(module, spec, path)
    return weights


def _load_state_dict(module: nn.Module, spec: BackboneSpec, path: Path) -> None:
    try:
        state = spec.state_loader(path) if spec.state_loader else torch.load(path, map_location="cpu",
                                                                              weights_only=True)
    except WeightsError:
        raise
    except Exception as exc:  # torch and the readers raise many types for a bad file
        raise WeightsError(f"cannot read weight file {path} ({type(exc).__name__}); pass "
                           f"{'the official file' if spec.state_loader else 'a torch state dict'}.") from None
    if not isinstance(state, dict):
        raise WeightsError(f"weight file {path} holds a {type(state).__name__}, not a state dict; "
                           "save model.state_dict().")
    missing, unexpected = module.load_state_dict(state, strict=False)
    if not spec.num_pretrained_classes:  # an encoder's weights: the classifier is new whatever it is
        missing = [n for n in missing if not (n == spec.head or n.startswith(spec.head + "."))]
    if missing or unexpected:
        raise WeightsError(f"weight file {path} does not fit {spec.name}: missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}; pass weights saved from the same architecture.")


def build_zoo_model(name: str, head: HeadRequest, weights: str | None) -> BuiltModel:
    entry = get_entry(name)
    labels, head_is_new = resolve_labels(head, entry.spec.num_pretrained_classes)
    module = entry.factory(entry.spec.num_pretrained_classes or len(labels))
    loaded = load_weights(module, entry.spec, weights)
    if head_is_new:
        replace_head(module, entry.spec.head, len(labels))
    return BuiltModel(module.eval(), entry.spec, labels, head_is_new, loaded)


def build_user_model(target: str, head: HeadRequest, spec: BackboneSpec) -> BuiltModel:
    """`package.module:factory` returning an nn.Module (or (module, head_name))."""
    module_name, _, attr = target.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # `--model mymodels:factory` from the user's project folder
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"cannot import --model {target} ({exc}); give it as package.module:factory.") from None
    result = factory()
    module, head_name = result if isinstance(result, tuple) else (result, spec.head)
    if not isinstance(module, nn.Module):
        raise ConfigError(f"--model {target} returned {type(module).__name__}, not a torch.nn.Module.")
    try:
        module.get_submodule(head_name)
    except AttributeError:
        raise ConfigError(f"--model {target} has no module '{head_name}'; name its classifier with --head.") from None
    spec = replace(spec, head=head_name)
    outputs = _count_outputs(module, spec)
    labels, head_is_new = resolve_labels(head, outputs)
    if head_is_new:
        replace_head(module, head_name, len(labels))
    return BuiltModel(module.eval(), spec, labels, head_is_new, "user")


def _count_outputs(module: nn.Module, spec: BackboneSpec) -> int:
    with torch.no_grad():
        return int(module.eval()(torch.zeros(1, *spec.input_size)).shape[-1])
