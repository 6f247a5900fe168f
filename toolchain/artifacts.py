"""Stage 2 of export: the graphs. The portable training step and forward graph (standard ONNX, any engine), and,
where onnxruntime-training is installed on the host, ONNX Runtime training's own artifacts (training, eval and
optimizer graphs + checkpoint) for the legacy engine and ORT's mobile packages. Split bundles get both for the
suffix too."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import onnx

from edgeadapt.runtime.errors import ExportError
from edgeadapt.runtime.manifest import PortableSpec
from edgeadapt.runtime.state import digest
from edgeadapt.toolchain.bn import statistics_graph, statistics_layout
from edgeadapt.toolchain.split import build_split
from edgeadapt.toolchain.stages import OUTPUT_NAME, Artifacts, initial_values, write_initial_state
from edgeadapt.toolchain.train_step import build_forward, build_train_step

LOSS_TYPES = {"cross_entropy": "CrossEntropyLoss", "bce_with_logits": "BCEWithLogitsLoss", "mse": "MSELoss",
              "l1": "L1Loss"}
ADAMW = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def has_ort_training() -> bool:
    """Whether this host can write ONNX Runtime training's artifacts (no training wheel: the bundle goes without)."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not (Path(spec.origin).parent / "training").is_dir():
        return False
    try:
        from onnxruntime.training import artifacts  # noqa: F401
    except ImportError as exc:
        raise ExportError(f"onnxruntime-training is installed but cannot be loaded ({exc}): onnxruntime's files "
                          "overwrote it; run `pip install --no-deps --force-reinstall "
                          "onnxruntime-training-cpu==1.19.2`.") from None
    return True


def write_artifacts(source, lists, opts, out_dir: Path):
    """All graphs of the bundle, its initial state, and the split (when the frozen part is a prefix)."""
    ort_training = has_ort_training()
    memory: dict[str, float] = {}
    statistics = statistics_layout(source.graph)

    def make_graphs(graph, trainable, frozen, prefix=""):
        portable = write_portable(graph, trainable, opts, out_dir, prefix, memory, statistics)
        if ort_training:
            generate(graph, trainable, frozen, opts.loss, opts.optimizer, opts.weight_decay, out_dir,
                     opts.ort_format, OUTPUT_NAME, prefix)
        return portable

    portable = make_graphs(source.graph, lists.trainable, lists.frozen + lists.buffers)
    split = build_split(source.graph, lists, out_dir, make_graphs, portable, statistics) if opts.split else None
    if split is not None:  # the prefix's largest tensor is the network's (early layers are the widest)
        memory["prefix_largest_bytes_per_sample"] = memory["largest_bytes_per_sample"]
    if statistics:
        portable = write_statistics_graph(source.graph, portable, out_dir)
    write_initial_state(out_dir, source.graph, portable)
    return Artifacts(portable, split, memory, ort_training)


def write_statistics_graph(graph: onnx.ModelProto, portable: PortableSpec, out_dir: Path) -> PortableSpec:
    """AdaBN's graph, `(input, params) -> bn_batch`, and the exported statistics' hash."""
    name = "adabn.onnx"
    onnx.save(build_forward(statistics_graph(graph), portable.layout), str(out_dir / name))
    values = initial_values(graph, portable.statistics)
    return replace(portable, statistics_graph=name, statistics_sha256=digest(values))


def write_portable(graph: onnx.ModelProto, trainable: list[str], opts, out_dir: Path, prefix: str,
                   memory: dict[str, float], statistics: list | None = None):
    graphs = build_train_step(graph, trainable, opts.loss, opts.optimizer,
                              opts.weight_decay if opts.optimizer == "adamw" else 0.0, statistics=statistics or [])
    spec = PortableSpec(layout=graphs.layout, state=graphs.state_names, opset=graphs.step.opset_import[0].version,
                        ir_version=graphs.step.ir_version, statistics=list(statistics or []))
    onnx.save(graphs.step, str(out_dir / f"{prefix}{spec.train_step}"))
    onnx.save(graphs.forward, str(out_dir / f"{prefix}{spec.forward}"))
    memory.update(memory_record(graphs, prefix))
    return spec


def memory_record(graphs, prefix: str = "") -> dict[str, float]:
    """The planner's per-sample bytes of one training graph (devices/planner.py), keyed for the manifest."""
    return {f"{prefix}kept_bytes_per_sample": float(graphs.kept_bytes_per_sample),
            f"{prefix}largest_bytes_per_sample": float(graphs.largest_bytes_per_sample)}


def optimizer_block(name: str, weight_decay: float):
    from onnxruntime.training import onnxblock

    if name == "adamw":
        return onnxblock.optim.AdamW(betas=ADAMW["betas"], eps=ADAMW["eps"], weight_decay=weight_decay)
    return onnxblock.optim.SGD()


def generate(model: onnx.ModelProto, trainable: list[str], frozen: list[str], loss: str, optimizer: str,
             weight_decay: float, out_dir: Path, ort_format: bool, output_name: str, prefix: str = "") -> None:
    import onnxruntime
    from onnxruntime.training import artifacts

    onnxruntime.set_default_logger_severity(3)
    try:
        with native_stderr_captured():
            artifacts.generate_artifacts(
                model, requires_grad=trainable, frozen_params=frozen,
                loss=getattr(artifacts.LossType, LOSS_TYPES[loss]), optimizer=optimizer_block(optimizer, weight_decay),
                artifact_directory=str(out_dir), ort_format=ort_format, additional_output_names=[output_name],
                prefix=prefix)
    except Exception as exc:  # ORT raises RuntimeError/Fail with the C++ message
        raise _explain(exc, model, trainable) from None
    if ort_format:
        merge_operator_configs(out_dir)


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
        return ExportError(f"ONNX Runtime could not build the training graph: {text.splitlines()[0][:200]}")
    op = match.group(1)
    on_path = _downstream_nodes(model, trainable)
    nodes = [n.name or n.output[0] for n in on_path if n.op_type == op]
    return ExportError(f"op {op} (node {nodes[0] if nodes else '?'}) has no gradient in ONNX Runtime and lies on the "
                       "trainable path; freeze the layers before it (e.g. --trainable head) or replace the op.")
