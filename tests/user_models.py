"""Stand-ins for models a user brings with `--model package.module:factory`."""

from torch import nn


def small_net() -> nn.Module:
    net = nn.Sequential()
    net.add_module("features", nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                             nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    net.add_module("classifier", nn.Linear(8, 5))
    return net


def net_with_hardswish() -> tuple[nn.Module, str]:
    """ONNX Runtime training has no gradient for HardSwish; the portable step has."""
    net = nn.Sequential()
    net.add_module("features", nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.Hardswish(), nn.AdaptiveAvgPool2d(1),
                                             nn.Flatten()))
    net.add_module("head", nn.Linear(8, 5))
    return net, "head"


class _SharedConv(nn.Module):
    """A conv whose output feeds a BatchNorm and, beside it, a skip connection: folding the BN into the conv would
    change what the skip connection sees."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 1, 1)
        self.bn = nn.BatchNorm2d(8)
        self.classifier = nn.Linear(8, 4)

    def forward(self, x):
        y = self.conv(x)
        pooled = (self.bn(y) + y).mean((2, 3))
        return self.classifier(pooled)


def conv_shared_with_bn() -> nn.Module:
    net = _SharedConv()
    net.bn.running_mean.uniform_(-0.5, 0.5)  # non-trivial statistics, as in a trained model
    net.bn.running_var.uniform_(0.5, 2.0)
    return net
