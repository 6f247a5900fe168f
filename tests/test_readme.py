"""Documented examples run: the README's Python example, and its CLI lines name real commands."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

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


def _sequence_blocks() -> list[str]:
    """The README's text and speech examples: bash blocks that start by writing their data."""
    return [b for b in re.findall(r"```bash\n(.*?)```", README, re.S) if b.startswith("python benchmarks/datasets.py")]


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1], ids=["text", "speech"])
def test_text_and_speech_examples_run_in_order(tmp_path, index):
    """Each line of the README's text and speech examples, in order, as a user types them (real weights, real
    data): every command succeeds, the held-out accuracy is far above chance (1/8), predict answers a label."""
    root = Path(__file__).resolve().parents[1]
    block = _sequence_blocks()[index]
    outputs = []
    for line in block.strip().splitlines():
        if line.startswith("echo "):
            text, _, target = line[5:].rpartition(" > ")
            (tmp_path / target).write_text(text.strip('"') + "\n")
            continue
        words = shlex.split(line)
        command = [sys.executable, str(root / words[1]), *words[2:]] if words[0] == "python" else \
            [sys.executable, "-m", "edgeadapt", *words[1:]]
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=1800)
        assert result.returncode == 0, (line, result.stderr[-2000:])
        outputs.append((words, result.stdout))
    evaluated = next(out for words, out in outputs if words[:2] == ["edgeadapt", "evaluate"])
    assert float(re.search(r"accuracy=([\d.]+)%", evaluated).group(1)) > 50
    predicted = next(out for words, out in outputs if words[:2] == ["edgeadapt", "predict"])
    labels = (tmp_path / ("texts" if index == 0 else "speech") / "labels.txt").read_text().split()
    assert any(label in predicted for label in labels)
