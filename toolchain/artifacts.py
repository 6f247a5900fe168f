"""Stage 2 of export: the graphs. The portable training step and forward graph (standard ONNX, any engine), and,
where the optional plugin is installed, ONNX Runtime training's own artifacts (toolchain/ort_training.py). Split
bundles get both for the suffix too."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import onnx

from edgeadapt.runtime.errors import ExportError
from edgeadapt.runtime.manifest import ACCUMULATING_STEP, PortableSpec
from edgeadapt.runtime.state import digest
from edgeadapt.toolchain.bn import statistics_graph, statistics_layout
from edgeadapt.toolchain.split import build_split
from edgeadapt.toolchain.stages import OUTPUT_NAME, Artifacts, initial_values, write_initial_state
from edgeadapt.toolchain.train_step import build_forward, build_train_step, state_layout


def write_artifacts(source, plan, out_dir: Path):
    """All graphs of the bundle, its initial state, and the split (when the frozen part is a prefix)."""
    lists, spec = plan.lists, plan.training
    from edgeadapt.toolchain import ort_training

    ort_missing = ort_training.unavailable()  # why ORT training's artifacts are left out ("" while they are not)
    memory: dict[str, float] = {}
    statistics = statistics_layout(source.graph)

    def make_graphs(graph, trainable, frozen, prefix=""):
        nonlocal ort_missing
        portable = write_portable(graph, trainable, spec, out_dir, prefix, memory, statistics)
        if not ort_missing:
            try:
                ort_training.generate(graph, trainable, frozen, spec.loss, spec.optimizer, spec.weight_decay,
                                      out_dir, plan.ort_format, OUTPUT_NAME, prefix)
            except ExportError as exc:
                ort_missing = str(exc)
                ort_training.remove_all(out_dir)
        return portable

    portable = make_graphs(source.graph, lists.trainable, lists.frozen + lists.buffers)
    split = build_split(source.graph, lists, out_dir, make_graphs, portable, statistics) if plan.split else None
    if split is not None:  # the prefix's largest tensor is the network's (early layers are the widest)
        memory["prefix_largest_bytes_per_sample"] = memory["largest_bytes_per_sample"]
        memory["prefix_constant_bytes"] = float((out_dir / split.prefix_model).stat().st_size)
    if statistics:
        portable = write_statistics_graph(source.graph, portable, out_dir)
    write_initial_state(out_dir, source.graph, portable)
    lora = write_merged_forward(source, lists.trainable, out_dir) if source.lora else None
    return Artifacts(portable, split, memory, ort_missing, lora)


def write_merged_forward(source, trainable: list[str], out_dir: Path):
    """LoRA: the merged model's forward graph, its params the trained tensors without the adapters plus each
    target's merged weight (in model order); the manifest's LoraSpec with that layout."""
    from edgeadapt.toolchain.lora import is_adapter

    targets = {t.weight for t in source.lora.targets}
    kept = set(trainable) | targets
    names = [init.name for init in source.merged_graph.graph.initializer if init.name in kept and
             not is_adapter(init.name)]
    layout = state_layout(source.merged_graph, names)
    statistics = statistics_layout(source.merged_graph)
    onnx.save(build_forward(source.merged_graph, layout, statistics=statistics),
              str(out_dir / source.lora.merged_forward))
    return replace(source.lora, merged_layout=layout)


def write_statistics_graph(graph: onnx.ModelProto, portable: PortableSpec, out_dir: Path) -> PortableSpec:
    """AdaBN's graph, `(input, params) -> bn_batch`, and the exported statistics' hash."""
    name = "adabn.onnx"
    onnx.save(build_forward(statistics_graph(graph), portable.layout), str(out_dir / name))
    values = initial_values(graph, portable.statistics)
    return replace(portable, statistics_graph=name, statistics_sha256=digest(values))


def write_portable(graph: onnx.ModelProto, trainable: list[str], spec, out_dir: Path, prefix: str,
                   memory: dict[str, float], statistics: list | None = None):
    graphs = build_train_step(graph, trainable, spec.loss, spec.optimizer, spec.groups, statistics=statistics or [],
                              with_accumulating=True)
    spec = PortableSpec(layout=graphs.layout, state=graphs.state_names, opset=graphs.step.opset_import[0].version,
                        ir_version=graphs.step.ir_version, statistics=list(statistics or []),
                        accumulating_step=ACCUMULATING_STEP)
    onnx.save(graphs.step, str(out_dir / f"{prefix}{spec.train_step}"))
    onnx.save(graphs.accumulating_step, str(out_dir / f"{prefix}{spec.accumulating_step}"))
    onnx.save(graphs.forward, str(out_dir / f"{prefix}{spec.forward}"))
    memory.update(memory_record(graphs, prefix))
    return spec


def memory_record(graphs, prefix: str = "") -> dict[str, float]:
    """The planner's per-sample bytes of one training graph (devices/planner.py), keyed for the manifest."""
    return {f"{prefix}kept_bytes_per_sample": float(graphs.kept_bytes_per_sample),
            f"{prefix}masked_bytes_per_sample": float(graphs.masked_bytes_per_sample),
            f"{prefix}largest_bytes_per_sample": float(graphs.largest_bytes_per_sample),
            f"{prefix}constant_bytes": float(graphs.constant_bytes)}
