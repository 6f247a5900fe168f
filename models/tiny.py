"""Tiny backbones registered like the real ones, so tests exercise every code path in seconds."""

from __future__ import annotations

import torch
from torch import nn

from edgeadapt.models.layers import Backbone, ConvBNAct, init_weights
from edgeadapt.models.registry import BackboneSpec, register_backbone


class TinyCNN(Backbone):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(ConvBNAct(3, 8, stride=2), ConvBNAct(8, 8, groups=8),
                                      ConvBNAct(8, 16, 1), ConvBNAct(16, 16, stride=2))
        self.classifier = nn.Linear(16, num_classes)
        init_weights(self)

    def forward_features(self, x):
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)


class TinyMLP(Backbone):
    """For sensor and tabular rows: Linear + ReLU stack over a flat feature vector."""

    def __init__(self, num_classes: int = 10, in_features: int = 64):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(in_features, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.classifier = nn.Linear(32, num_classes)
        init_weights(self)

    def forward_features(self, x):
        return self.features(x)


@register_backbone(BackboneSpec(
    name="tiny_cnn", input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), feature_dim=16,
    head="classifier", blocks=tuple(f"features.{i}" for i in range(4)), num_pretrained_classes=10,
    description="4-layer CNN for fast tests (random init)",
))
def tiny_cnn(num_classes: int) -> TinyCNN:
    return TinyCNN(num_classes)


@register_backbone(BackboneSpec(
    name="tiny_mlp", input_size=(64,), mean=(0.0,), std=(1.0,), feature_dim=32, head="classifier",
    blocks=("features.0", "features.2"), channels="", layout="NC", num_pretrained_classes=10,
    description="2-layer MLP over 64 features (sensor/tabular rows, e.g. 8x8 digits), random init",
))
def tiny_mlp(num_classes: int) -> TinyMLP:
    return TinyMLP(num_classes)
