"""The manifest's input section for a backbone spec, and the files it needs in the bundle (a text model's
vocabulary), plus example inputs for the export's own checks (runtime/samples.py)."""

from __future__ import annotations

import numpy as np

from edgeadapt.models.registry import BackboneSpec
from edgeadapt.runtime.manifest import AudioSpec, InputSpec
from edgeadapt.runtime.samples import example_batch
from edgeadapt.runtime.text import WordPiece, token_spec, vocabulary_lines

VOCAB_FILE = "vocab.txt"


def input_spec(spec: BackboneSpec) -> tuple[InputSpec, dict[str, bytes]]:
    """(InputSpec, {bundle file name: content}) for a zoo or `--model` spec."""
    if spec.tokens is not None:
        text = _vocabulary(spec)
        tokens = token_spec(vocabulary_lines(text), VOCAB_FILE, spec.input_size[0], spec.tokens.lowercase)
        return InputSpec("input", [-1, tokens.max_length], "int64", "NT", "", [0.0], [1.0], tokens=tokens), \
            {VOCAB_FILE: text.encode("utf-8")}
    if spec.audio is not None:
        mels, frames = spec.input_size
        audio = AudioSpec(spec.audio.sample_rate, frames * spec.audio.hop_length, mels, spec.audio.n_fft,
                          spec.audio.hop_length)
        return InputSpec("input", [-1, mels, frames], "float32", "NCT", "", [0.0], [1.0], audio=audio), {}
    is_image = len(spec.input_size) == 3
    channels = ("L" if spec.input_size[0] == 1 else spec.channels or "RGB") if is_image else ""
    return InputSpec(name="input", shape=[-1, *spec.input_size], dtype="float32", layout="NCHW" if is_image else "NC",
                     channels=channels, mean=list(spec.mean), std=list(spec.std),
                     resize=list(spec.input_size[1:]) if is_image else []), {}


def _vocabulary(spec: BackboneSpec) -> str:
    if spec.tokens.vocab == "builtin:tiny":
        from edgeadapt.models.vocab import tiny_vocabulary_text

        return tiny_vocabulary_text()
    from edgeadapt.models.weights import resolve_weights

    return resolve_weights(spec.assets[spec.tokens.vocab]).read_text(encoding="utf-8")


def examples(spec: InputSpec, assets: dict[str, bytes], batch: int, seed: int = 0) -> np.ndarray:
    """Example inputs for `spec`; text through the bundle's own vocabulary."""
    encode = None
    if spec.tokens is not None:
        encode = WordPiece.from_text(assets[spec.tokens.vocab_file].decode("utf-8"), spec.tokens).encode_batch
    return example_batch(spec, batch, seed, encode)
