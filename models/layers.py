"""Building blocks shared by the zoo, laid out so torchvision's parameter names come out unchanged."""

from __future__ import annotations

from torch import nn


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's channel rounding: nearest multiple of `divisor`, never below 90% of `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNAct(nn.Sequential):
    """Conv2d (index 0) + BatchNorm2d (index 1) + optional activation (index 2), like torchvision's
    Conv2dNormActivation."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 act: type[nn.Module] | None = nn.ReLU6, eps: float = 1e-5):
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=eps),
        ]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


def init_weights(module: nn.Module) -> None:
    """torchvision's initialisation for conv/BN/linear layers (used for random init and `scratch`)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0, 0.02)


class Backbone(nn.Module):
    """One interface for every zoo model: `features` → pooled vector → `classifier` (timm-style)."""

    head_name = "classifier"

    def forward_features(self, x):  # pragma: no cover - overridden
        raise NotImplementedError

    def forward(self, x):
        return getattr(self, self.head_name)(self.forward_features(x))


def calibrate_batchnorm(module: nn.Module, input_size: tuple[int, ...], batches: int = 4, batch_size: int = 16,
                        seed: int = 0) -> None:
    """Set BN running statistics from standard-normal inputs (the preprocessed input's distribution).

    A randomly initialised network whose BN statistics stay at mean 0 / var 1 does not normalise anything: its
    activations vanish layer by layer. Frozen-statistics training (the `fold` policy) needs statistics that
    normalise at the start, so `scratch` exports get this data-independent calibration.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:  # nothing to calibrate (transformers normalise per sample)
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    module.train()
    with torch.no_grad():
        for _ in range(batches):
            module(torch.randn(batch_size, *input_size, generator=generator))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    module.eval()
