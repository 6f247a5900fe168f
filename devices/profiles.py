"""Device profiles as data: one TOML file per device class (devices/profiles/), read into a frozen dataclass."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, replace
from importlib import resources

from edgeadapt.runtime.errors import ConfigError, UnknownNameError

try:
    import tomllib
except ImportError:  # Python 3.10 (e.g. JetPack 6)
    import tomli as tomllib


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    cores: int
    threads: int
    memory_budget_mb: int  # for training: what the process may use at its peak
    training_backend: str  # cpu | cuda
    inference_backends: tuple[str, ...]
    prefix_backend: str  # where a frozen prefix runs best (split execution)
    notes: str = ""
    sources: tuple[str, ...] = field(default_factory=tuple)


def _total_memory_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)


def _resolved(profile: DeviceProfile) -> DeviceProfile:
    """Fill the host profile's detected fields (0 means detect)."""
    cores = profile.cores or os.cpu_count() or 1
    return replace(profile, cores=cores, threads=profile.threads or cores,
                   memory_budget_mb=profile.memory_budget_mb or _total_memory_mb() // 2)


def parse_profile(text: str, source: str) -> DeviceProfile:
    try:
        raw = tomllib.loads(text)
        raw["inference_backends"] = tuple(raw.get("inference_backends", ()))
        raw["sources"] = tuple(raw.get("sources", ()))
        return _resolved(DeviceProfile(**raw))
    except (tomllib.TOMLDecodeError, TypeError) as exc:
        raise ConfigError(f"device profile {source} is not valid ({exc}); see devices/profiles/*.toml.") from None


def load_profiles() -> dict[str, DeviceProfile]:
    folder = resources.files("edgeadapt.devices").joinpath("profiles")
    profiles = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            profile = parse_profile(entry.read_text(encoding="utf-8"), entry.name)
            profiles[profile.name] = profile
    return profiles


def get_profile(name: str) -> DeviceProfile:
    """A built-in profile by name, or a TOML file of the same fields (a custom device)."""
    if name.endswith(".toml") and os.path.isfile(name):
        with open(name, encoding="utf-8") as fh:
            return parse_profile(fh.read(), name)
    profiles = load_profiles()
    if name not in profiles:
        close = difflib.get_close_matches(name, profiles, n=2)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownNameError(f"unknown device profile '{name}'.{hint} Known: {', '.join(profiles)}.")
    return profiles[name]
