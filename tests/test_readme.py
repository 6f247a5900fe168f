"""Documented examples run: the README's Python example, and its CLI lines name real commands."""

import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_python_example_runs(tmp_path):
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    accuracy = float(re.search(r"test accuracy ([\d.]+)%", result.stdout).group(1))
    assert accuracy > 60
    assert (tmp_path / "digits.onnx").is_file()


def test_cli_lines_use_real_commands():
    from typer.main import get_command

    from edgeadapt.cli import app

    commands = set(get_command(app).commands)
    used = set(re.findall(r"^edgeadapt ([\w-]+)", README, re.M))
    assert used and used <= commands
