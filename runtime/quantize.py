"""INT8 prefix: post-training static quantization (ONNX Runtime, QDQ, per-channel) of a split bundle's frozen
prefix, calibrated on local samples. The float suffix then trains on its features (`train --prefix-int8`)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.data import load_dataset, preprocess
from edgeadapt.runtime.errors import ConfigError
from edgeadapt.runtime.onnx_wire import bake_input
from edgeadapt.runtime.prefix import PrefixRunner
from edgeadapt.runtime.state import STATISTICS_INPUT
from edgeadapt.runtime.training_target import bundle_statistics


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    samples: int
    float_mb: float
    int8_mb: float
    feature_rel_diff: float  # ‖f_int8 − f_float‖ / ‖f_float‖ on the calibration samples


def quantize_prefix(bundle: Bundle, data: Path, samples: int = 128, seed: int = 0) -> QuantizeResult:
    try:  # heavy and optional: onnxruntime's quantization tools need the onnx package
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise ConfigError(f"quantize-prefix needs onnxruntime's quantization tools ({exc.name} is missing): "
                          "`pip install onnx`, or quantize on the host and copy prefix_int8.onnx.") from None

    split = bundle.manifest.split
    if split is None:
        raise ConfigError(f"{bundle.path} is not a split bundle; export it with a `head` or `last:K` preset.")
    dataset = load_dataset(data, bundle)
    pick = np.random.default_rng(seed).permutation(len(dataset))[:samples]
    inputs = preprocess(dataset.samples[pick], bundle.manifest, dataset.is_image)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": inputs[i:i + 16]} for i in range(0, len(inputs), 16)])

        def get_next(self):
            return next(self.batches, None)

    target = bundle.int8_prefix_path
    statistics = bundle_statistics(bundle)
    model = bundle.read_graph(split.prefix_model)
    with tempfile.TemporaryDirectory() as tmp:
        float_prefix = Path(tmp) / "prefix.onnx"  # the current BN statistics baked in, then folded and quantized
        float_prefix.write_bytes(bake_input(model, STATISTICS_INPUT, statistics) if statistics is not None else model)
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(float_prefix), str(prepared), skip_symbolic_shape=True)
        staged = Path(tmp) / "int8.onnx"
        quantize_static(str(prepared), str(staged), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        quantized_model = staged.read_bytes()
    bundle.write_device_graph(target.name, quantized_model)  # authenticated by this device's key
    reference = PrefixRunner(model, statistics=statistics)(inputs)
    quantized = PrefixRunner(bundle.read_device_graph(target.name))(inputs)
    diff = float(np.linalg.norm(quantized - reference) / max(np.linalg.norm(reference), 1e-12))
    return QuantizeResult(target, len(inputs), len(model) / 2**20, target.stat().st_size / 2**20, diff)
