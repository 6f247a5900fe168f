"""The preset registry: trainable sets named by intent, resolved to the exact parameter names that train (the
rest frozen). The only place preset names live in the toolchain, with the CLI's help built from it; other stages
ask the registry what a preset does (`preset_of(name).random_init`, …), never compare names."""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgeadapt.runtime.errors import ConfigError

if TYPE_CHECKING:  # the registry itself imports nothing heavy: the CLI's help reads it on devices too
    from edgeadapt.toolchain.stages import Lists, Source


@dataclass(frozen=True)
class Preset:
    name: str  # as typed; `last:K` stands for last:1, last:2, …
    summary: str  # what trains (the CLI's help)
    random_init: bool = False  # the weights start random, whatever --weights says
    scored: bool = False  # chosen by scoring calibration samples against a memory budget (rewrites the graph)
    searched: bool = False  # a search over the other presets for a device profile
    needs_module: bool = False  # needs a torch module (block boundaries, initialisers, scores)
    adapters: bool = False  # adds new low-rank adapter tensors to the model (toolchain/lora.py) and trains those


HEAD = "head"
REGISTRY = {p.name: p for p in (
    Preset(HEAD, "transfer learning: the new head only, the backbone frozen as a feature extractor"),
    Preset("last:K", "the last K blocks and the head", needs_module=True),
    Preset("bias", "every bias (BatchNorm shifts included) and the head, as in TinyTL"),
    Preset("full", "fine-tuning of every weight from the pretrained start"),
    Preset("lora:R", "LoRA: rank-R adapters on the attention query and value projections (lora:R@q,k,v,o,ffn, or "
           "module globs, to choose) and the head; the rest frozen", needs_module=True, adapters=True),
    Preset("scratch", "learning from scratch: random init, everything trainable", random_init=True,
           needs_module=True),
    Preset("sparse", "with --calibration and --budget-mb or --profile: the layers and channels that contribute most "
           "per MB of training memory, the head and the biases after the earliest", scored=True, needs_module=True),
    Preset("auto", "with --profile: the most accurate strategy of the study that fits its memory", searched=True),
)}
PRESETS = tuple(REGISTRY)
# `auto`'s candidates, most accurate first (the studies' rankings; toolchain/auto.py says why): image and feature-row
# models, and text and speech transformers (docs/study/text, docs/study/speech)
AUTO_RANKING = ("full", "sparse", "last:2", HEAD)
SEQUENCE_AUTO_RANKING = ("full", "lora:8", "last:2", "lora:4", HEAD)


def auto_ranking(kind: str) -> tuple[str, ...]:
    """`auto`'s candidates for an input kind (manifest.input.kind)."""
    return SEQUENCE_AUTO_RANKING if kind in ("tokens", "audio") else AUTO_RANKING
PLAIN = Preset("patterns", "globs or re:REGEX over parameter names, comma-separated")


def preset_of(spec: str) -> Preset:
    """The registered preset `spec` names (`last:3` is `last:K`); patterns get PLAIN."""
    if spec.startswith("last:"):
        return REGISTRY["last:K"]
    if spec.startswith("lora:"):
        return REGISTRY["lora:R"]
    return REGISTRY.get(spec, PLAIN)


def help_text() -> str:
    return "; ".join(f"{p.name}: {p.summary}" for p in REGISTRY.values()) + f"; or {PLAIN.summary}."


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def resolve_trainable(preset: str, names: list[str], head: str, blocks: tuple[str, ...]) -> list[str]:
    """Return the trainable subset of `names` (in model order) for `preset`."""
    head_names = [n for n in names if _under(n, head)]
    if preset == HEAD:
        return head_names
    if preset in ("full", "scratch"):
        return list(names)
    if preset == "bias":
        return [n for n in names if n.endswith(".bias") or _under(n, head)]
    if preset_of(preset).adapters:
        from edgeadapt.toolchain.lora import is_adapter

        return [n for n in names if is_adapter(n) or _under(n, head)]
    if preset.startswith("last:"):
        prefixes = _last_blocks(preset, blocks)
        return [n for n in names if _under(n, head) or any(_under(n, p) for p in prefixes)]
    return _match_patterns(preset, names)


def _last_blocks(preset: str, blocks: tuple[str, ...]) -> tuple[str, ...]:
    count = preset.partition(":")[2]
    if count == "0":
        raise ConfigError("last:0 trains no block, only the head: use --trainable head.")
    if not count.isdigit() or not 1 <= int(count) <= len(blocks):
        raise ConfigError(f"'{preset}' needs a whole number of blocks from 1 to {len(blocks)}, e.g. last:2.")
    return blocks[len(blocks) - int(count):]


def _match_patterns(spec: str, names: list[str]) -> list[str]:
    """Comma-separated globs (`features.1*`) or regexes (`re:features\\.(17|18)\\.`); each must match something."""
    selected: set[str] = set()
    for pattern in filter(None, (p.strip() for p in spec.split(","))):
        hits = _matches(pattern, names)
        if not hits:
            raise ConfigError(_no_match(pattern, names))
        selected.update(hits)
    return [n for n in names if n in selected]


def _no_match(pattern: str, names: list[str]) -> str:
    """A preset name mistyped is the likelier mistake than a pattern matching nothing: say which was meant."""
    preset = difflib.get_close_matches(pattern, [p for p in PRESETS if p not in ("last:K", "lora:R")] +
                                       ["last:2", "lora:8"], n=1, cutoff=0.6)
    if preset:
        return (f"--trainable '{pattern}' is neither a preset nor a pattern that matches a parameter; did you mean "
                f"'{preset[0]}'? (presets: {', '.join(PRESETS)})")
    close = difflib.get_close_matches(pattern.removeprefix("re:"), names, n=3, cutoff=0.4)
    return (f"--trainable pattern '{pattern}' matches no parameter; close names: {', '.join(close) or 'none'} "
            f"(presets: {', '.join(PRESETS)}; `edgeadapt export ... --list-params` shows all names).")


def _matches(pattern: str, names: list[str]) -> list[str]:
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as exc:
            raise ConfigError(f"--trainable regex '{pattern[3:]}' is invalid ({exc}).") from None
        return [n for n in names if regex.search(n)]
    return [n for n in names if fnmatch.fnmatchcase(n, pattern) or _under(n, pattern)]


def resolve_lists(source: "Source", preset: str) -> "Lists":
    """(trainable, frozen parameters, frozen buffers/constants): every initializer lands in exactly one list."""
    from edgeadapt.toolchain.stages import Lists

    kind = preset_of(preset)
    if kind.needs_module and (source.torch_module is None or (kind.scored and source.sparse is None)):
        raise ConfigError(f"--trainable {preset} needs a torch model (zoo backbone or --model: block boundaries, "
                          "initialisers, scores); with --onnx use head, bias, full or patterns over initializer names.")
    if preset == HEAD:
        wanted = set(source.head)
    elif kind.scored:
        wanted = set(source.sparse.graph.trainable)
    elif source.torch_module is not None:
        wanted = set(resolve_trainable(preset, source.params, source.head_module, source.blocks))
    else:  # an ONNX file has no module tree: the named head always trains
        wanted = set(resolve_trainable(preset, source.params, "\0", ())) | set(source.head)
    trainable = [n for n in source.params if n in wanted]
    if not trainable:
        raise ConfigError(f"--trainable {preset} selects no parameter used by the model; pick another preset.")
    if source.head_is_new and not set(source.head) <= set(trainable):
        raise ConfigError("the new head is randomly initialised but not trainable; include it in --trainable.")
    initializers = [init.name for init in source.graph.graph.initializer]
    params = set(source.params)
    frozen = [n for n in initializers if n in params and n not in wanted]
    buffers = [n for n in initializers if n not in params]
    return Lists(trainable, frozen, buffers)
