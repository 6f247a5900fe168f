"""Folders are dependency boundaries: the device side imports and trains with torch blocked."""

import ast
from pathlib import Path

import pytest

from conftest import run_without_torch

ROOT = Path(__file__).resolve().parents[1]


def test_runtime_and_cli_import_without_torch():
    result = run_without_torch("""
        import importlib, pkgutil, sys
        import edgeadapt.runtime as runtime
        for info in pkgutil.iter_modules(runtime.__path__):
            importlib.import_module(f"edgeadapt.runtime.{info.name}")
        for info in pkgutil.iter_modules(importlib.import_module("edgeadapt.runtime.engines").__path__):
            importlib.import_module(f"edgeadapt.runtime.engines.{info.name}")
        import edgeadapt.devices, edgeadapt.cli
        bad = [m for m in ("torch", "onnx", "onnxruntime.training.ortmodule") if sys.modules.get(m)]
        assert not bad, bad
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


@pytest.mark.ort_training
def test_the_legacy_engine_loads_without_torch():
    result = run_without_torch("""
        import sys
        from edgeadapt.runtime.ort import training_api
        api = training_api()
        assert api.Module and api.Optimizer and api.CheckpointState
        bad = [m for m in ("torch", "onnx", "onnxruntime.training.ortmodule") if sys.modules.get(m)]
        assert not bad, bad
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_help_works_without_torch():
    """A device has neither torch nor onnx: the help (the preset registry's text included) needs neither."""
    for command in ("--help", "export --help"):
        result = run_without_torch("import sys\nsys.modules['onnx'] = None\n"
                                   f"sys.argv = ['edgeadapt', *{command.split()!r}]\nfrom edgeadapt.cli import main\n"
                                   "main()")
        assert "export" in result.stdout and "Traceback" not in result.stderr, result.stderr
    assert "transfer learning" in result.stdout


def test_export_without_torch_says_what_to_install(tmp_path):
    result = run_without_torch(f"import sys\nsys.argv = ['edgeadapt', 'export', 'tiny_cnn', '--classes', '2', "
                               f"'--out', '{tmp_path / 'b'}']\nfrom edgeadapt.cli import main\nmain()")
    assert result.returncode != 0
    assert "pip install 'edgeadapt[host]'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("folder", ["runtime", "devices", "fleet"])
def test_no_host_imports_in_device_folders(folder):
    """No module-level import of torch or onnx in runtime/ and devices/ (heavy imports stay lazy)."""
    for path in (ROOT / folder).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("torch", "onnx", "edgeadapt.toolchain") or
                           n.startswith("edgeadapt.toolchain") for n in names), f"{path}: {names}"


def test_preset_names_live_only_in_the_registry():
    """Stages ask the registry what a preset does; no toolchain module but the registry and the CLI compares or
    spells a preset name (renaming one can then never silently change a stage's behaviour)."""
    from edgeadapt.toolchain.presets import REGISTRY

    names = set(REGISTRY) | {"last:2"}
    offenders = []
    for path in sorted((ROOT / "toolchain").glob("*.py")):
        if path.name in ("presets.py", "cli.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                    node.value in names or node.value.startswith("last:")):
                offenders.append(f"{path.name}:{node.lineno} {node.value!r}")
    assert not offenders, offenders
