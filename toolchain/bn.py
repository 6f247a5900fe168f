"""BatchNorm policies for export.

ONNX Runtime's artifact generator turns every BatchNormalization node of the training graph into a batch-statistics
BN (even for an eval-mode export) while the eval graph keeps the stored statistics, so train and eval would compute
different functions. Policy `fold` (default) keeps BN nodes out of both graphs: each conv→BN pair is computed as
conv(x, W·γ/√(σ²+ε), β − μ·γ/√(σ²+ε)) with the running statistics frozen and W, γ, β separate parameters (names and
counts unchanged) — exactly PyTorch's eval-mode BN, differentiable in every parameter. A BN not fed by a conv becomes
the per-channel affine x·γ/√(σ²+ε) + (β − μ·γ/√(σ²+ε)). Policy `ort` keeps BN nodes (ORT's default behaviour)
and is only allowed when no BN parameter is trainable and the user accepts batch statistics in the training graph.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

BN_POLICIES = ("fold", "affine", "ort")
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class BnPlan:
    pairs: list[tuple[nn.Conv2d, nn.modules.batchnorm._BatchNorm]]
    lone: list[nn.modules.batchnorm._BatchNorm]


def plan_bn(model: nn.Module, example: torch.Tensor) -> BnPlan:
    """Find which BN layers consume a conv's output directly, by running the model once and watching tensors."""
    conv_of_output: dict[int, tuple[nn.Conv2d, torch.Tensor]] = {}
    pairs, lone = [], []

    def after_conv(module, _inputs, output):
        conv_of_output[id(output)] = (module, output)

    def before_bn(module, inputs):
        hit = conv_of_output.get(id(inputs[0]))
        if hit is not None and hit[1] is inputs[0]:
            pairs.append((hit[0], module))
        else:
            lone.append(module)

    hooks = [m.register_forward_hook(after_conv) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_pre_hook(before_bn) for m in model.modules() if isinstance(m, _BN_TYPES)]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for hook in hooks:
            hook.remove()
    return BnPlan(pairs, lone)


def _bn_scale_shift(bn) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _folded_conv_forward(conv: nn.Conv2d, bn, original):
    def forward(x, weight, bias):
        scale, shift = _bn_scale_shift(bn)
        folded_bias = shift if bias is None else bias * scale + shift
        return original(x, weight * scale.reshape(-1, 1, 1, 1), folded_bias)
    return forward


def _affine_forward(bn):
    def forward(x):
        scale, shift = _bn_scale_shift(bn)
        view = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.reshape(view) + shift.reshape(view)
    return forward


def _identity(x):
    return x


@contextlib.contextmanager
def bn_policy_applied(model: nn.Module, example: torch.Tensor, policy: str):
    """Within the block, BN layers compute eval-mode BN from frozen statistics without BN nodes (`fold`, `affine`),
    or stay as they are (`ort`). Parameter names do not change; the module is restored afterwards."""
    plan = plan_bn(model, example) if policy != "ort" else BnPlan([], [])
    patched: list[tuple[nn.Module, str]] = []
    try:
        for conv, bn in plan.pairs if policy == "fold" else []:
            conv._conv_forward = _folded_conv_forward(conv, bn, conv._conv_forward)
            bn.forward = _identity
            patched += [(conv, "_conv_forward"), (bn, "forward")]
        lone = plan.lone + ([bn for _, bn in plan.pairs] if policy == "affine" else [])
        for bn in lone:
            bn.forward = _affine_forward(bn)
            patched.append((bn, "forward"))
        yield plan
    finally:
        for module, attr in patched:
            module.__dict__.pop(attr, None)
