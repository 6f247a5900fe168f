"""ResNet-18 in plain torch with torchvision's parameter names."""

from __future__ import annotations

import torch
from torch import nn

from edgeadapt.models.layers import Backbone, init_weights
from edgeadapt.models.registry import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, register_backbone


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(Backbone):
    head_name = "fc"

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths = [64, 128, 256, 512]
        cin = 64
        for i, width in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(cin, width, stride), BasicBlock(width, width, 1)))
            cin = width
        self.fc = nn.Linear(512, num_classes)
        init_weights(self)

    def forward_features(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


@register_backbone(BackboneSpec(
    name="resnet18", input_size=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD, feature_dim=512, head="fc",
    blocks=("conv1", "bn1") + tuple(f"layer{i}.{j}" for i in range(1, 5) for j in range(2)),
    description="ResNet-18 (torchvision names); weights from a user path, else random init",
))
def resnet18(num_classes: int) -> ResNet18:
    return ResNet18(num_classes)
