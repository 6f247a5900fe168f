"""Stand-ins for models a user brings with `--model package.module:factory`."""

from torch import nn


def small_net() -> nn.Module:
    net = nn.Sequential()
    net.add_module("features", nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                             nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    net.add_module("classifier", nn.Linear(8, 5))
    return net


def net_with_hardswish() -> tuple[nn.Module, str]:
    """ONNX Runtime has no gradient for HardSwish: training across it must be refused clearly."""
    net = nn.Sequential()
    net.add_module("features", nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.Hardswish(), nn.AdaptiveAvgPool2d(1),
                                             nn.Flatten()))
    net.add_module("head", nn.Linear(8, 5))
    return net, "head"
