"""An existing ONNX model as the source of a bundle (`export --onnx model.onnx`), for models we do not ship.

The user names the head: its initializers (`--head-params`, e.g. a final Gemm's weight and bias) or the feature
output to put a new linear head on (`--feature-output`). BatchNormalization nodes are rewritten by the same `fold`
policy torch models get (toolchain/bn.py), so the training and eval graphs compute the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeadapt.models.registry import IMAGENET_MEAN, IMAGENET_STD
from edgeadapt.runtime.errors import ConfigError
from edgeadapt.runtime.manifest import InputSpec
from edgeadapt.toolchain.bn import fold_batchnorm, fold_constants_of
from edgeadapt.toolchain.graph_builder import with_inferred_types
from edgeadapt.toolchain.stages import INPUT_NAME, OUTPUT_NAME, Source


@dataclass
class OnnxSource:
    model: onnx.ModelProto
    params: list[str]  # trainable candidates: float initializers that are weights
    buffers: list[str]  # BN statistics and non-float constants: always frozen
    head: list[str]
    input_shape: tuple[int, ...]  # without batch
    num_outputs: int


def load_onnx(path: Path, pad_id: int | None = None) -> onnx.ModelProto:
    """The model with one data input. A text model's attention mask and token types (BERT's other int64 inputs)
    are derived in the graph from the ids (`pad_id` marks padding), so the step keeps one data input."""
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf decode errors
        raise ConfigError(f"--onnx {path} is not a readable ONNX model ({type(exc).__name__}).") from None
    inputs = _real_inputs(model)
    if len(inputs) > 1 and _derivable_text_inputs(inputs):
        if pad_id is None:
            raise ConfigError(f"--onnx {path} takes token ids with an attention mask: give its WordPiece vocabulary "
                              "with --vocab vocab.txt (the mask is then derived from the ids' padding).")
        _derive_text_inputs(model, inputs, pad_id)
        inputs = _real_inputs(model)
    if len(inputs) != 1:
        raise ConfigError(f"--onnx {path} has {len(inputs)} inputs; edgeadapt trains single-input models (text "
                          "models may add an attention mask and token type ids, derived from the ids).")
    return model


def _ids_first(inputs: list) -> list:
    return sorted(inputs, key=lambda i: any(w in i.name.lower() for w in ("mask", "type")))


def _derivable_text_inputs(inputs: list) -> bool:
    ids, *others = _ids_first(inputs)
    int64 = all(i.type.tensor_type.elem_type == TensorProto.INT64 for i in inputs)
    return int64 and "mask" not in ids.name.lower() and all(
        ("mask" in o.name.lower() or "type" in o.name.lower()) and _shape(o) == _shape(ids) for o in others)


def _derive_text_inputs(model: onnx.ModelProto, inputs: list, pad_id: int) -> None:
    ids, *others = _ids_first(inputs)
    nodes = [helper.make_node("Constant", [], ["derived/pad"], value=numpy_helper.from_array(np.array(pad_id,
                                                                                                       np.int64)))]
    for other in others:
        if "mask" in other.name.lower():  # 1 on real tokens, 0 on padding
            nodes += [helper.make_node("Equal", [ids.name, "derived/pad"], [f"{other.name}/is_pad"]),
                      helper.make_node("Not", [f"{other.name}/is_pad"], [f"{other.name}/is_real"]),
                      helper.make_node("Cast", [f"{other.name}/is_real"], [other.name], to=TensorProto.INT64)]
        else:  # one segment
            nodes += [helper.make_node("Sub", [ids.name, ids.name], [other.name])]
    names = {o.name for o in others}
    kept = [i for i in model.graph.input if i.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    existing = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + existing)


def _real_inputs(model: onnx.ModelProto) -> list:
    initializers = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _shape(value_info) -> list:
    return [d.dim_value if d.dim_value > 0 else -1 for d in value_info.type.tensor_type.shape.dim]


def _rename_io(model: onnx.ModelProto, output: str, num_outputs: int) -> None:
    """One input called `input` with a free batch dimension; the chosen output called `logits`."""
    old_in = _real_inputs(model)[0].name
    for node in model.graph.node:
        node.input[:] = [INPUT_NAME if n == old_in else n for n in node.input]
        node.output[:] = [OUTPUT_NAME if n == output else n for n in node.output]
        node.input[:] = [OUTPUT_NAME if n == output else n for n in node.input]
    graph_input = _real_inputs(model)[0]
    graph_input.name = INPUT_NAME
    graph_input.type.tensor_type.shape.dim[0].dim_param = "batch"
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", num_outputs]))


def attach_linear_head(model: onnx.ModelProto, features: str, num_outputs: int, seed: int) -> list[str]:
    """Cut at `features`, flatten, add Gemm(head.weight, head.bias) → logits."""
    inferred = with_inferred_types(model)
    info = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    if features not in info:
        raise ConfigError(f"--feature-output {features} is not a tensor of the model (or its shape is unknown); "
                          "name an output of a node, e.g. the pooled features.")
    dims = _shape(info[features])[1:]
    if not dims or any(d <= 0 for d in dims):
        raise ConfigError(f"--feature-output {features} has no fixed feature size ({dims}); pick a pooled output.")
    width = int(np.prod(dims))
    rng = np.random.default_rng(seed)
    model.graph.initializer.extend([
        numpy_helper.from_array((rng.standard_normal((num_outputs, width)) * 0.01).astype(np.float32), "head.weight"),
        numpy_helper.from_array(np.zeros(num_outputs, np.float32), "head.bias")])
    model.graph.node.extend([helper.make_node("Flatten", [features], ["head/flat"], axis=1),
                             helper.make_node("Gemm", ["head/flat", "head.weight", "head.bias"], ["head/logits"],
                                              transB=1)])
    return ["head.weight", "head.bias"]


def prune_unused(model: onnx.ModelProto, output: str) -> None:
    """Keep only the nodes and initializers that `output` depends on."""
    needed, kept = {output}, []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    del model.graph.node[:]
    model.graph.node.extend(reversed(kept))
    inits = [i for i in model.graph.initializer if i.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)


def prepare(path: Path, head_params: list[str], feature_output: str | None, num_outputs: int | None,
            seed: int = 0, pad_id: int | None = None) -> OnnxSource:
    model = load_onnx(path, pad_id)
    statistics = fold_batchnorm(model)
    if feature_output:
        if num_outputs is None:
            raise ConfigError("--feature-output adds a new head: give --classes N or --labels FILE.")
        head = attach_linear_head(model, feature_output, num_outputs, seed)
        output = "head/logits"
    else:
        output = model.graph.output[0].name
        head = head_params
    prune_unused(model, output)
    source = _describe(model, head, statistics, path)
    _rename_io(model, output, source.num_outputs)
    return source


def _describe(model: onnx.ModelProto, head: list[str], statistics: list[str], path: Path) -> OnnxSource:
    helpers = fold_constants_of(model)
    floats = [i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT and
              i.name not in helpers and i.name not in statistics]
    missing = [h for h in head if h not in floats]
    if not head or missing:
        raise ConfigError(f"--head-params {', '.join(missing) or '(none)'} not among the model's weights; give the "
                          f"head's initializers (e.g. {', '.join(floats[-2:])}) or use --feature-output.")
    buffers = [i.name for i in model.graph.initializer if i.name not in floats]
    shape = tuple(_shape(_real_inputs(model)[0])[1:]) if _real_inputs(model) else ()
    if any(d <= 0 for d in shape):
        raise ConfigError(f"--onnx {path} has a free input dimension besides the batch {shape}; fix it first.")
    outputs = int(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == head[-1])).shape[0])
    return OnnxSource(model, floats, buffers, head, shape, outputs)


def reference_logits(path: Path, x: np.ndarray, feature_output: str | None, head: dict[str, np.ndarray],
                     pad_id: int | None = None):
    """What the bundle must compute, from the original file: its output, or its features through the new head. A
    text model's mask and token types are fed as a tokenizer makes them."""
    from edgeadapt.runtime.ort import onnxruntime_module

    onnxruntime = onnxruntime_module()

    model = onnx.load(str(path))
    inputs = _ids_first(_real_inputs(model))
    if feature_output:
        model.graph.output.append(helper.make_tensor_value_info(feature_output, TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = feature_output or model.graph.output[0].name

    def feed(row: np.ndarray) -> dict:  # one sample at a time: the file may fix its batch size at 1
        values = {inputs[0].name: row}
        for other in inputs[1:]:
            values[other.name] = (row != pad_id).astype(np.int64) if "mask" in other.name.lower() else \
                np.zeros_like(row)
        return values
    out = np.concatenate([session.run([wanted], feed(x[i:i + 1]))[0] for i in range(len(x))])
    if not feature_output:
        return out
    return out.reshape(len(x), -1) @ head["head.weight"].T + head["head.bias"]


# ---- stage 1 for `--onnx`: the prepared graph as a Source; every later stage is the one zoo exports use ------

def _read_vocab(opts) -> str | None:
    """The text of `--vocab`, read once (None without it)."""
    if opts.vocab is None:
        return None
    try:
        return Path(opts.vocab).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--vocab {opts.vocab} is not a readable UTF-8 file ({exc}).") from None


def _token_input(opts, shape: tuple[int, ...], text: str | None) -> tuple[InputSpec, dict[str, bytes]]:
    from edgeadapt.runtime.text import token_spec, vocabulary_lines
    from edgeadapt.toolchain.inputs import VOCAB_FILE

    if text is None:
        raise ConfigError(f"--onnx {opts.onnx} takes token ids (int64): give its WordPiece vocabulary with --vocab "
                          "vocab.txt (one token per line).")
    if len(shape) != 1:
        raise ConfigError(f"--onnx {opts.onnx} takes token ids of shape {shape}; give a model of [batch, tokens].")
    tokens = token_spec(vocabulary_lines(text), VOCAB_FILE, shape[0])
    return InputSpec("input", [-1, shape[0]], "int64", "NT", "", [0.0], [1.0], tokens=tokens), \
        {VOCAB_FILE: text.encode("utf-8")}


def _pad_id(text: str | None) -> int | None:
    from edgeadapt.runtime.text import vocabulary_lines

    if text is None:
        return None
    vocab = vocabulary_lines(text)
    return vocab.index("[PAD]") if "[PAD]" in vocab else 0


def _input_spec(opts, shape: tuple[int, ...]) -> InputSpec:
    spec = opts.user_spec
    is_image = len(shape) == 3
    rgb = is_image and shape[0] == 3
    mean = list(spec.mean) if spec else (list(IMAGENET_MEAN) if rgb else [0.0])
    std = list(spec.std) if spec else (list(IMAGENET_STD) if rgb else [1.0])
    channels = ("RGB" if shape[0] == 3 else "L") if is_image else ""
    return InputSpec("input", [-1, *shape], "float32", "NCHW" if is_image else "NC", channels, mean, std,
                     list(shape[1:]) if is_image else [])


def onnx_source(opts) -> Source:
    from edgeadapt.toolchain.build import resolve_labels

    labels = None if opts.head.keep_head else resolve_labels(opts.head, 0)[0]
    vocab = _read_vocab(opts)
    pad_id = _pad_id(vocab)
    prepared = prepare(Path(opts.onnx), list(opts.head_params), opts.feature_output,
                       len(labels) if labels and opts.feature_output else None, opts.seed, pad_id)
    labels = labels or [f"class_{i}" for i in range(prepared.num_outputs)]
    if len(labels) != prepared.num_outputs:
        raise ConfigError(f"the model has {prepared.num_outputs} outputs but {len(labels)} labels were given; with "
                          "--head-params use --keep-head (or --labels with one name per output).")
    head = {init.name: onnx.numpy_helper.to_array(init) for init in prepared.model.graph.initializer
            if init.name in prepared.head}

    def reference(x: np.ndarray) -> np.ndarray:
        return reference_logits(Path(opts.onnx), x, opts.feature_output, head, pad_id)
    is_text = _real_inputs(prepared.model)[0].type.tensor_type.elem_type == TensorProto.INT64
    spec, assets = _token_input(opts, prepared.input_shape, vocab) if is_text else \
        (_input_spec(opts, prepared.input_shape), {})
    return Source(prepared.model, prepared.params, prepared.buffers, labels, spec,
                  f"onnx:{Path(opts.onnx).name}", "onnx", prepared.head, bool(opts.feature_output), reference,
                  notes=[f"source: {Path(opts.onnx).name}"], assets=assets)
