"""The torch model as an eval-mode ONNX graph with a dynamic batch, BN policy applied (toolchain/bn.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from edgeadapt.toolchain.bn import apply_policy
from edgeadapt.toolchain.stages import INPUT_NAME, OUTPUT_NAME

OPSET = 17


def export_eval_onnx(module: torch.nn.Module, example: np.ndarray, bn_policy: str | None,
                     path: Path) -> onnx.ModelProto:
    """Export with every parameter its own initializer. (Without keep_initializers_as_inputs the exporter merges
    initializers of equal value in eval mode — e.g. all fresh BN scales of one width — so they would share one
    gradient in training.) The initializers are then taken back out of the graph inputs. `bn_policy` None keeps the
    BN nodes (for rewrites that must see them, like the channel splits of `--trainable sparse`). `example`: two
    inputs of the model's kind and dtype (token ids for text)."""
    example = torch.from_numpy(example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(), (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=OPSET,
            dynamo=False, do_constant_folding=False, training=torch.onnx.TrainingMode.EVAL,
            keep_initializers_as_inputs=True)
    model = onnx.load(str(path))
    initializers = set(initializer_names(model))
    inputs = [i for i in model.graph.input if i.name not in initializers]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    return apply_policy(model, bn_policy) if bn_policy else model


def initializer_names(model: onnx.ModelProto) -> list[str]:
    return [init.name for init in model.graph.initializer]
