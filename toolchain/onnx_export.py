"""Stage 1 for `--onnx model.onnx`: the prepared graph (BN folded, head named or attached) as a `Source`; every
later stage is the one zoo and `--model` exports use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from edgeadapt.runtime.errors import ConfigError
from edgeadapt.runtime.manifest import InputSpec
from edgeadapt.toolchain.build import resolve_labels
from edgeadapt.toolchain.onnx_source import prepare, reference_logits
from edgeadapt.toolchain.stages import Source


def _input_spec(opts, shape: tuple[int, ...]) -> InputSpec:
    spec = opts.user_spec
    is_image = len(shape) == 3
    mean = list(spec.mean) if spec else ([0.485, 0.456, 0.406] if is_image and shape[0] == 3 else [0.0])
    std = list(spec.std) if spec else ([0.229, 0.224, 0.225] if is_image and shape[0] == 3 else [1.0])
    channels = ("RGB" if shape[0] == 3 else "L") if is_image else ""
    return InputSpec("input", [-1, *shape], "float32", "NCHW" if is_image else "NC", channels, mean, std,
                     list(shape[1:]) if is_image else [])


def onnx_source(opts) -> Source:
    labels = None if opts.head.keep_head else resolve_labels(opts.head, 0)[0]
    prepared = prepare(Path(opts.onnx), list(opts.head_params), opts.feature_output,
                       len(labels) if labels and opts.feature_output else None, opts.seed)
    labels = labels or [f"class_{i}" for i in range(prepared.num_outputs)]
    if len(labels) != prepared.num_outputs:
        raise ConfigError(f"the model has {prepared.num_outputs} outputs but {len(labels)} labels were given; with "
                          "--head-params use --keep-head (or --labels with one name per output).")
    head = {init.name: onnx.numpy_helper.to_array(init) for init in prepared.model.graph.initializer
            if init.name in prepared.head}

    def reference(x: np.ndarray) -> np.ndarray:
        return reference_logits(Path(opts.onnx), x, opts.feature_output, head)
    return Source(prepared.model, prepared.params, prepared.buffers, labels, _input_spec(opts, prepared.input_shape),
                  f"onnx:{Path(opts.onnx).name}", "onnx", prepared.head, bool(opts.feature_output), reference,
                  notes=[f"source: {Path(opts.onnx).name}"])
