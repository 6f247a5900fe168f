"""`--trainable lora:R[@targets]`: low-rank adapters on chosen Linear and Conv layers of a torch model.

Each target layer keeps its pretrained weight W frozen and gains A (R × fan-in, Kaiming-uniform) and B
(out × R, zeros): it computes with W + (α/R)·B·A, so training starts from the pretrained function and the step
trains A, B and the head alone. The adapted weight is formed in the graph at the weight level (one R-rank product
per layer and step), which keeps the layer one MatMul/Conv and lets `deploy` write plain merged weights.

Targets are the backbone's short names (`q`, `k`, `v`, `o`, `ffn` for the transformers; default `q,v`) or module
globs / `re:` regexes for any `--model`."""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from edgeadapt.runtime.errors import ConfigError
from edgeadapt.runtime.manifest import LoraSpec, LoraTarget

DEFAULT_TARGETS = ("q", "v")
ALPHA_PER_RANK = 2.0  # α = 2R: the adapters' update is twice B·A (a common choice; recorded in the manifest)
DROPOUT = 0.0  # the step is deterministic: no adapter dropout
ADAPTER_SUFFIXES = (".lora_A", ".lora_B")


@dataclass(frozen=True)
class LoraRequest:
    rank: int
    targets: tuple[str, ...]
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def parse(preset: str) -> LoraRequest:
    """`lora:8` or `lora:8@q,k,v` → the request (targets unresolved)."""
    body = preset.partition(":")[2]
    rank_text, _, targets = body.partition("@")
    if not rank_text.isdigit() or not 1 <= int(rank_text) <= 1024:
        raise ConfigError(f"'{preset}' needs a rank from 1 to 1024, e.g. lora:8 or lora:8@q,k,v,o.")
    chosen = tuple(t.strip() for t in targets.split(",") if t.strip()) if targets else DEFAULT_TARGETS
    rank = int(rank_text)
    return LoraRequest(rank, chosen, ALPHA_PER_RANK * rank)


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, scale: float):
        super().__init__()
        self.weight, self.bias, self.scale = base.weight, base.bias, scale
        self.lora_A = nn.Parameter(_kaiming(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))

    def adapted_weight(self) -> torch.Tensor:
        return self.weight + self.scale * (self.lora_B @ self.lora_A)

    def forward(self, x):
        return nn.functional.linear(x, self.adapted_weight(), self.bias)

    def merged(self) -> nn.Linear:
        layer = nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=self.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self.adapted_weight())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer


class LoraConv(nn.Module):
    """A Conv1d/Conv2d with W + (α/R)·(B·A) reshaped to W's shape (A: R × in/groups·kernel)."""

    def __init__(self, base: nn.Conv1d | nn.Conv2d, rank: int, scale: float):
        super().__init__()
        self.base_type, self.scale = type(base), scale
        self.config = dict(stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = nn.Parameter(_kaiming(rank, math.prod(base.weight.shape[1:])))
        self.lora_B = nn.Parameter(torch.zeros(base.weight.shape[0], rank))

    def adapted_weight(self) -> torch.Tensor:
        return self.weight + self.scale * (self.lora_B @ self.lora_A).reshape(self.weight.shape)

    def forward(self, x):
        conv = nn.functional.conv1d if self.base_type is nn.Conv1d else nn.functional.conv2d
        return conv(x, self.adapted_weight(), self.bias, **self.config)

    def merged(self) -> nn.Module:
        weight = self.weight
        layer = self.base_type(weight.shape[1] * self.config["groups"], weight.shape[0], tuple(weight.shape[2:]),
                               bias=self.bias is not None, **self.config)
        with torch.no_grad():
            layer.weight.copy_(self.adapted_weight())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer


def _kaiming(rows: int, cols: int) -> torch.Tensor:
    value = torch.empty(rows, cols)
    nn.init.kaiming_uniform_(value, a=math.sqrt(5))
    return value


ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def target_modules(module: nn.Module, request: LoraRequest, short_names: dict[str, str], head: str) -> list[str]:
    """Names of the Linear/Conv modules `request.targets` selects (never the head), in model order."""
    layers = [name for name, m in module.named_modules() if isinstance(m, ADAPTABLE) and name and
              not (name == head or name.startswith(head + "."))]
    chosen: set[str] = set()
    for target in request.targets:
        patterns = short_names[target].split(",") if target in short_names else [target]
        hits = [name for name in layers if any(_matches(p, name) for p in patterns)]
        if not hits:
            known = ", ".join(short_names) if short_names else "none (name modules by glob or re:REGEX)"
            raise ConfigError(f"LoRA target '{target}' matches no Linear or Conv layer; short names for this model: "
                              f"{known}; or give module globs (`edgeadapt export ... --list-params` shows names).")
        chosen.update(hits)
    return [name for name in layers if name in chosen]


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        try:
            return re.search(pattern[3:], name) is not None
        except re.error as exc:
            raise ConfigError(f"LoRA target regex '{pattern[3:]}' is invalid ({exc}).") from None
    return fnmatch.fnmatchcase(name, pattern)


def add_adapters(module: nn.Module, request: LoraRequest, names: list[str]) -> LoraSpec:
    """Replace each named layer with its adapted version (in place); the manifest's record of them."""
    targets = []
    for name in names:
        layer = module.get_submodule(name)
        adapted = LoraLinear(layer, request.rank, request.scale) if isinstance(layer, nn.Linear) else \
            LoraConv(layer, request.rank, request.scale)
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr, adapted)
        targets.append(LoraTarget(weight=f"{name}.weight", a=f"{name}.lora_A", b=f"{name}.lora_B",
                                  shape=list(layer.weight.shape)))
    return LoraSpec(rank=request.rank, alpha=request.alpha, dropout=DROPOUT, targets=targets)


def merged_module(module: nn.Module) -> nn.Module:
    """A copy of `module` with every adapter merged into a plain layer (deploy's graph is exported from it)."""
    import copy

    merged = copy.deepcopy(module)
    for name, layer in list(merged.named_modules()):
        if isinstance(layer, (LoraLinear, LoraConv)):
            parent, _, attr = name.rpartition(".")
            setattr(merged.get_submodule(parent) if parent else merged, attr, layer.merged())
    return merged


def is_adapter(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIXES)
