"""MobileNetV3-Small in plain torch with torchvision's parameter names."""

from __future__ import annotations

import torch
from torch import nn

from edgeadapt.models.layers import Backbone, ConvBNAct, init_weights, make_divisible
from edgeadapt.models.registry import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, register_backbone

# (kernel, expanded, out, squeeze-excite, hard-swish, stride), torchvision's mobilenet_v3_small table.
_SMALL = [(3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
          (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
          (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1), (5, 288, 96, True, True, 2),
          (5, 576, 96, True, True, 1), (5, 576, 96, True, True, 1)]
_EPS = 1e-3


class Hardswish(nn.Module):
    """x·relu6(x+3)/6, as torch's hardswish, written with ops ONNX Runtime can differentiate (its training build
    has no HardSwish gradient)."""

    def __init__(self, inplace: bool = False):
        super().__init__()

    def forward(self, x):
        return x * nn.functional.relu6(x + 3.0) / 6.0


def hardsigmoid(x):
    return nn.functional.relu6(x + 3.0) / 6.0


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x):
        scale = nn.functional.adaptive_avg_pool2d(x, 1)
        scale = hardsigmoid(self.fc2(torch.relu(self.fc1(scale))))
        return x * scale


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, se: bool, hswish: bool, stride: int):
        super().__init__()
        act = Hardswish if hswish else nn.ReLU
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvBNAct(cin, expanded, 1, act=act, eps=_EPS))
        layers.append(ConvBNAct(expanded, expanded, kernel, stride, groups=expanded, act=act, eps=_EPS))
        if se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4)))
        layers.append(ConvBNAct(expanded, cout, 1, act=None, eps=_EPS))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.block(x) if self.use_res_connect else self.block(x)


class MobileNetV3Small(Backbone):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        blocks: list[nn.Module] = [ConvBNAct(3, 16, 3, 2, act=Hardswish, eps=_EPS)]
        cin = 16
        for kernel, expanded, cout, se, hswish, stride in _SMALL:
            blocks.append(InvertedResidual(cin, kernel, expanded, cout, se, hswish, stride))
            cin = cout
        blocks.append(ConvBNAct(cin, 576, 1, act=Hardswish, eps=_EPS))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Linear(576, 1024), Hardswish(), nn.Dropout(dropout),
                                        nn.Linear(1024, num_classes))
        init_weights(self)

    def forward_features(self, x):
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)


@register_backbone(BackboneSpec(
    name="mobilenet_v3_small", input_size=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD, feature_dim=576,
    head="classifier", blocks=tuple(f"features.{i}" for i in range(13)),
    description="MobileNetV3-Small (torchvision names); weights from a user path, else random init",
))
def mobilenet_v3_small(num_classes: int) -> MobileNetV3Small:
    return MobileNetV3Small(num_classes)
