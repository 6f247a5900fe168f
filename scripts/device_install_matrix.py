"""Does the device install (`pip install edgeadapt`, no extras) resolve to binary wheels on the platforms people
train on? For {manylinux x86_64, manylinux aarch64, macOS arm64, Windows x86_64} × CPython {3.10 … 3.13}, pip
resolves the project's own base dependencies with `--only-binary=:all:` (a dry run: nothing is installed) and the
script prints a table of what resolved, with the onnxruntime version picked. Needs the package index.

    python scripts/device_install_matrix.py [--markdown]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

PLATFORMS = {
    "manylinux x86_64": ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"],
    "manylinux aarch64": ["manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"],
    "macOS arm64": ["macosx_14_0_arm64", "macosx_13_0_arm64", "macosx_12_0_arm64", "macosx_11_0_arm64"],
    "Windows x86_64": ["win_amd64"],
}
PYTHONS = ("3.10", "3.11", "3.12", "3.13")


def base_dependencies() -> list[str]:
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    return project["dependencies"]


def resolve(requirements: list[str], platforms: list[str], python: str) -> tuple[bool, str]:
    """(resolved, onnxruntime version or pip's last error line)."""
    with tempfile.TemporaryDirectory() as target, tempfile.NamedTemporaryFile(suffix=".json") as report:
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                   "--only-binary=:all:", "--python-version", python, "--implementation", "cp", "--target", target,
                   "--report", report.name, *[f"--platform={p}" for p in platforms], *requirements]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if "ERROR" in line] or ["failed"]
            return False, lines[0].replace("ERROR: ", "")[:90]
        installed = json.loads(Path(report.name).read_text())["install"]
    versions = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in installed}
    return True, f"onnxruntime {versions.get('onnxruntime', '?')}"


def main(markdown: bool) -> int:
    requirements = base_dependencies()
    print(f"device install: {', '.join(requirements)}\n")
    rows, failures = [], 0
    for name, platforms in PLATFORMS.items():
        cells = []
        for python in PYTHONS:
            ok, detail = resolve(requirements, platforms, python)
            failures += not ok
            cells.append(("yes, " if ok else "NO: ") + detail)
        rows.append((name, cells))
    if markdown:
        print("| platform | " + " | ".join(f"CPython {p}" for p in PYTHONS) + " |")
        print("|---" * (len(PYTHONS) + 1) + "|")
        for name, cells in rows:
            print(f"| {name} | " + " | ".join(cells) + " |")
    else:
        for name, cells in rows:
            print(f"{name:18s} " + "  ".join(f"{p}: {c}" for p, c in zip(PYTHONS, cells)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main("--markdown" in sys.argv))
