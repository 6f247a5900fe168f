"""Trainable subgraphs named by intent (`head`, `last:K`, `bias`, `full`, `scratch`, or patterns), resolved to the
exact parameter names that ONNX Runtime gets as `requires_grad`."""

from __future__ import annotations

import difflib
import fnmatch
import re

from edgeadapt.runtime.errors import ConfigError

PRESETS = ("head", "full", "last:K", "bias", "scratch")


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
