"""Optional plugin: ONNX Runtime training's own artifacts (training, eval and optimizer graphs + checkpoint) for the
legacy `--engine ort-training` and ORT's mobile packages. Written only where the `[ort-training]` extra is
installed (x86_64, CPython <= 3.11); when it is missing or its generator fails, the bundle goes without them and
its manifest says why. The portable step never depends on it."""

from __future__ import annotations

import contextlib
import copy
import os
import re
import sys
import tempfile
from pathlib import Path

import onnx

from edgeadapt.runtime.errors import ExportError

LOSS_TYPES = {"cross_entropy": "CrossEntropyLoss", "bce_with_logits": "BCEWithLogitsLoss", "mse": "MSELoss",
              "l1": "L1Loss"}
ADAMW = dict(betas=(0.9, 0.999), eps=1e-8)
FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint",
         "training_model.ort", "eval_model.ort", "optimizer_model.ort", "required_operators.config")


def unavailable() -> str:
    """Why this host cannot write ORT training's artifacts ("" when it can)."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not (Path(spec.origin).parent / "training").is_dir():
        return "the [ort-training] plugin is not installed (x86_64, Python <= 3.11: pip install -e '.[ort-training]')"
    try:
        from onnxruntime.training import artifacts  # noqa: F401
    except ImportError as exc:
        return (f"the [ort-training] plugin cannot be loaded ({exc}): onnxruntime's files were written over it; "
                "pip uninstall -y onnxruntime-training-cpu, then pip install -e '.[ort-training]' on its own")
    return ""


def remove_all(out_dir: Path) -> None:
    """Drop the plugin's artifacts of the whole graph and of a split's suffix."""
    from edgeadapt.toolchain.split import SUFFIX

    remove(out_dir)
    remove(out_dir, SUFFIX)


def remove(out_dir: Path, prefix: str = "") -> None:
    """Drop whatever a failed generation left behind."""
    for name in FILES:
        (out_dir / f"{prefix}{name}").unlink(missing_ok=True)
    for leftover in out_dir.glob(f"{prefix}*.required_operators.config"):
        leftover.unlink()


def optimizer_block(name: str, weight_decay: float):
    from onnxruntime.training import onnxblock

    if name == "adamw":
        return onnxblock.optim.AdamW(betas=ADAMW["betas"], eps=ADAMW["eps"], weight_decay=weight_decay)
    return onnxblock.optim.SGD()


def generate(model: onnx.ModelProto, trainable: list[str], frozen: list[str], loss: str, optimizer: str,
             weight_decay: float, out_dir: Path, ort_format: bool, output_name: str, prefix: str = "") -> None:
    """Write the artifacts under `prefix`; an ExportError says why ORT could not (nothing is left behind)."""
    import onnxruntime
    from onnxruntime.training import artifacts

    onnxruntime.set_default_logger_severity(3)
    model = with_layer_norm_statistics(model)
    try:
        with native_stderr_captured():
            artifacts.generate_artifacts(
                model, requires_grad=trainable, frozen_params=frozen,
                loss=getattr(artifacts.LossType, LOSS_TYPES[loss]), optimizer=optimizer_block(optimizer, weight_decay),
                artifact_directory=str(out_dir), ort_format=ort_format, additional_output_names=[output_name],
                prefix=prefix)
    except Exception as exc:  # ORT raises RuntimeError/Fail with the C++ message
        remove(out_dir, prefix)
        raise _explain(exc, model, trainable) from None
    if ort_format:
        merge_operator_configs(out_dir)


def with_layer_norm_statistics(model: onnx.ModelProto) -> onnx.ModelProto:
    """ORT's LayerNormalization gradient reads the node's optional Mean and InvStdDev outputs: name them."""
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization" and len(n.output) < 3]
    if not norms:
        return model
    model = copy.deepcopy(model)
    for node in (n for n in model.graph.node if n.op_type == "LayerNormalization"):
        while len(node.output) < 3:
            node.output.append(f"{node.output[0]}/ort_statistic_{len(node.output)}")
    return model


@contextlib.contextmanager
def native_stderr_captured():
    """ORT's gradient builder logs every graph pass at info level from C++, and its .ort converter prints each
    step: keep both off the user's terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink, contextlib.redirect_stdout(open(os.devnull, "w")):
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def merge_operator_configs(out_dir: Path) -> None:
    """One `required_operators.config` for a minimal ORT build that runs all three graphs."""
    ops: dict[tuple[str, str], set[str]] = {}
    for config in sorted(out_dir.glob("*.required_operators.config")):
        for line in config.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                domain, opset, names = line.split(";")
                ops.setdefault((domain, opset), set()).update(names.split(","))
        config.unlink()
    lines = [f"{d};{v};{','.join(sorted(n))}" for (d, v), n in sorted(ops.items())]
    header = "# Operators of training_model.ort, eval_model.ort and optimizer_model.ort (edgeadapt export)\n"
    (out_dir / "required_operators.config").write_text(header + "\n".join(lines) + "\n")


def _downstream_nodes(model: onnx.ModelProto, trainable: list[str]) -> list:
    """Nodes that consume (transitively) a trainable initializer: the ones that need gradients."""
    reached, nodes = set(trainable), []
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        if any(name in reached for name in node.input):
            nodes.append(node)
            reached.update(node.output)
    return nodes


def _explain(exc: Exception, model: onnx.ModelProto, trainable: list[str]) -> Exception:
    """Turn ORT's 'no gradient builder' failure into a one-line error that names the op and node."""
    text = str(exc)
    match = re.search(r"(?:gradient builder|gradient definition)[^:]*:\s*([\w.]+)", text, re.IGNORECASE)
    if not match:
        return ExportError(f"ONNX Runtime training could not build its graph ({text.splitlines()[0][:200]})")
    op = match.group(1)
    on_path = _downstream_nodes(model, trainable)
    nodes = [n.name or n.output[0] for n in on_path if n.op_type == op]
    return ExportError(f"ONNX Runtime training has no gradient for op {op} (node {nodes[0] if nodes else '?'}) on the "
                       "trainable path")
