"""`deploy`: the adapted model as a plain inference ONNX file or OpenVINO IR, built from the forward graph and the
bundle's state (no `onnx` package needed), each checked against the bundle's own evaluation path. The state is read
once: the model written and the check see the same snapshot, even while a trainer checkpoints."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeadapt.runtime.atomic import atomic_write, fsync_dir
from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.errors import BundleError, ConfigError, EdgeAdaptError, InternalError
from edgeadapt.runtime.inference import evaluation_engine
from edgeadapt.runtime.metrics import dummy_targets
from edgeadapt.runtime.onnx_wire import bake_input, float_initializers
from edgeadapt.runtime.ort import onnxruntime_module
from edgeadapt.runtime.ov import openvino_device, openvino_module
from edgeadapt.runtime.state import STATISTICS_INPUT, TrainState, flatten, named_parameters

FORMATS = ("onnx", "openvino")
SUFFIXES = {"onnx": ".onnx", "openvino": ".xml"}
TOLERANCE = 1e-4


@dataclass(frozen=True)
class DeployResult:
    path: Path
    format: str
    max_abs_diff: float
    same_predictions: bool


def check_batch(bundle: Bundle, batch: int = 4, seed: int = 0) -> np.ndarray:
    """Example model inputs (preprocessed; real token ids for text): runtime/samples.py."""
    return bundle.examples(batch, seed)


def inference_model(bundle: Bundle, state: TrainState | None = None) -> bytes:
    """The whole forward graph with the trained parameters (`state`, default: the bundle's) baked in: a plain
    inference model (for LoRA bundles the merged model's graph, with W + (α/R)·B·A as plain weights)."""
    state = state or bundle.load_state()
    if bundle.manifest.lora is not None:
        forward = bake_input(bundle.read_graph(bundle.manifest.lora.merged_forward), "params",
                             merged_parameters(bundle, state))
    else:
        forward = bake_input(bundle.read_graph(bundle.graphs(split=False).forward), "params", state.params)
    if state.statistics is not None:  # the BN statistics, re-estimated or not, become constants too
        forward = bake_input(forward, STATISTICS_INPUT, state.statistics)
    return forward


def merged_parameters(bundle: Bundle, state: TrainState) -> np.ndarray:
    """The merged model's params: the trained tensors, and each LoRA target's W + (α/R)·B·A, with W read from the
    forward graph's constants."""
    lora, portable = bundle.manifest.lora, bundle.manifest.portable
    values = named_parameters(state.params, portable.layout)
    try:
        base = float_initializers(bundle.read_graph(portable.forward), {t.weight for t in lora.targets})
    except ValueError as exc:
        raise BundleError(f"{bundle.path / portable.forward}: {exc}; re-export the bundle.") from None
    for target in lora.targets:
        if target.weight not in base:
            raise BundleError(f"{bundle.path / portable.forward} has no frozen weight {target.weight} for its LoRA "
                              "adapters; re-export the bundle.")
        delta = values[target.b].astype(np.float64) @ values[target.a].astype(np.float64)
        values[target.weight] = (base[target.weight] + lora.scale * delta.reshape(target.shape)).astype(np.float32)
    return flatten(values, lora.merged_layout, lambda p: BundleError(
        f"the LoRA merge lacks {p.name}; re-export the bundle."))


def inference_prefix(bundle: Bundle) -> bytes:
    """A split bundle's frozen prefix with its current BN statistics baked in: a plain inference model."""
    state = bundle.load_state()
    prefix = bundle.read_graph(bundle.manifest.split.prefix_model)
    return bake_input(prefix, STATISTICS_INPUT, state.statistics) if state.statistics is not None else prefix


def export_onnx(bundle: Bundle, path: Path, state: TrainState | None = None) -> None:
    model = inference_model(bundle, state)
    atomic_write(path, lambda tmp: tmp.write_bytes(model))


def onnx_logits(model: Path, x: np.ndarray, input_name: str) -> np.ndarray:
    session = onnxruntime_module().InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, {input_name: x})[0]


def openvino_logits_from(model_path: Path, x: np.ndarray, device: str = "CPU") -> np.ndarray:
    # f32 explicitly: the CPU plugin otherwise runs bf16 where the processor has it
    compiled = openvino_device(device).compile_model(str(model_path), device, {"INFERENCE_PRECISION_HINT": "f32"})
    return np.asarray(compiled(x)[compiled.output(0)])


def save_openvino(onnx_model: Path, xml: Path) -> None:
    """Convert to IR and place model.xml/.bin atomically (the .bin first, the .xml that names it last). The ONNX
    frontend reads the model (`read_model`), not the `convert_model` tool, which writes a telemetry id under
    ~/intel unasked."""
    openvino = openvino_module()
    with tempfile.TemporaryDirectory(dir=xml.parent) as tmp:
        staged = Path(tmp) / xml.name
        model = openvino_device("CPU").read_model(str(onnx_model))
        openvino.save_model(model, str(staged), compress_to_fp16=False)
        os.replace(staged.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(staged, xml)
        fsync_dir(xml.parent)


def deploy(bundle: Bundle | str | Path, fmt: str, out: str | Path, check: bool = True) -> DeployResult:
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    if fmt not in FORMATS:
        raise ConfigError(f"unknown --format '{fmt}'; choose one of {', '.join(FORMATS)}.")
    out = output_file(out, fmt)
    state = bundle.load_state()  # one snapshot for the model and its check
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgeAdaptError(f"cannot create {out.parent} ({exc.strerror}); choose a writable --out.") from None
    if fmt == "onnx":
        export_onnx(bundle, out, state)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            export_onnx(bundle, Path(tmp) / "model.onnx", state)
            save_openvino(Path(tmp) / "model.onnx", out)
    return _checked(bundle, state, out, fmt) if check else DeployResult(out, fmt, float("nan"), True)


def output_file(out: str | Path, fmt: str) -> Path:
    """`--out` as the file to write: a folder (existing, named with a trailing separator, or a name without a
    suffix) gets model.onnx / model.xml; a file name must have the format's suffix."""
    text, suffix = str(out), SUFFIXES[fmt]
    path = Path(out)
    if path.is_dir() or text.endswith(("/", os.sep)) or not path.suffix:
        return path / f"model{suffix}"
    if path.suffix.lower() != suffix:
        raise ConfigError(f"--out {out} does not end in {suffix}, the suffix of --format {fmt}; name the file "
                          f"*{suffix} or give a folder (with a trailing /).")
    return path


def _checked(bundle: Bundle, state: TrainState, out: Path, fmt: str) -> DeployResult:
    x = check_batch(bundle)
    engine = evaluation_engine(bundle, state=state)
    expected = engine.eval_step(x, dummy_targets(bundle.manifest, len(x)))[1]
    actual = onnx_logits(out, x, bundle.manifest.input.name) if fmt == "onnx" else openvino_logits_from(out, x)
    diff = float(np.abs(actual - expected).max())
    same = bool((actual.argmax(1) == expected.argmax(1)).all())
    if diff > TOLERANCE:
        raise InternalError(f"deployed {fmt} model differs from the eval graph by {diff:.2e}")
    return DeployResult(out, fmt, diff, same)
