"""Trainable subgraphs named by intent (`head`, `last:K`, `bias`, `full`, `scratch`, or patterns), resolved to the
exact parameter names that ONNX Runtime gets as `requires_grad`."""

from __future__ import annotations

import difflib
import fnmatch
import re

from edgeadapt.runtime.errors import ConfigError
from edgeadapt.toolchain.stages import Lists, Source

PRESETS = ("head", "full", "last:K", "bias", "scratch", "sparse")


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def resolve_trainable(preset: str, names: list[str], head: str, blocks: tuple[str, ...]) -> list[str]:
    """Return the trainable subset of `names` (in model order) for `preset`."""
    head_names = [n for n in names if _under(n, head)]
    if preset == "head":
        return head_names
    if preset in ("full", "scratch"):
        return list(names)
    if preset == "bias":
        return [n for n in names if n.endswith(".bias") or _under(n, head)]
    if preset.startswith("last:"):
        prefixes = _last_blocks(preset, blocks)
        return [n for n in names if _under(n, head) or any(_under(n, p) for p in prefixes)]
    return _match_patterns(preset, names)


def _last_blocks(preset: str, blocks: tuple[str, ...]) -> tuple[str, ...]:
    count = preset.partition(":")[2]
    if not count.isdigit() or not 0 <= int(count) <= len(blocks):
        raise ConfigError(f"'{preset}' needs a whole number of blocks from 0 to {len(blocks)}, e.g. last:2.")
    return blocks[len(blocks) - int(count):]


def _match_patterns(spec: str, names: list[str]) -> list[str]:
    """Comma-separated globs (`features.1*`) or regexes (`re:features\\.(17|18)\\.`); each must match something."""
    selected: set[str] = set()
    for pattern in filter(None, (p.strip() for p in spec.split(","))):
        hits = _matches(pattern, names)
        if not hits:
            close = difflib.get_close_matches(pattern.removeprefix("re:"), names, n=3, cutoff=0.4)
            raise ConfigError(
                f"--trainable pattern '{pattern}' matches no parameter; close names: {', '.join(close) or 'none'} "
                f"(presets: {', '.join(PRESETS)}; `edgeadapt export ... --list-params` shows all names).")
        selected.update(hits)
    return [n for n in names if n in selected]


def _matches(pattern: str, names: list[str]) -> list[str]:
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as exc:
            raise ConfigError(f"--trainable regex '{pattern[3:]}' is invalid ({exc}).") from None
        return [n for n in names if regex.search(n)]
    return [n for n in names if fnmatch.fnmatchcase(n, pattern) or _under(n, pattern)]


def resolve_lists(source: Source, preset: str) -> Lists:
    """(trainable, frozen parameters, frozen buffers/constants): every initializer lands in exactly one list."""
    if source.torch_module is None and (preset.startswith("last:") or preset == "scratch"):
        raise ConfigError(f"--trainable {preset} needs a torch model (block boundaries, initialisers); with --onnx use "
                          "head, bias, full or patterns over initializer names.")
    if preset == "sparse" and source.sparse is None:
        raise ConfigError("--trainable sparse needs a torch model (zoo backbone or --model) to score; with --onnx use "
                          "head, bias, full or patterns.")
    if preset == "head":
        wanted = set(source.head)
    elif preset == "sparse":
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
