"""One PyTorch-eager training case, in its own process: the same model, trainable set, batch, optimizer (AdamW,
weight decay 0.01, eps 1e-8) and threads as an edgeadapt bundle, BatchNorm in eval mode (frozen statistics, the
math edgeadapt's `fold` policy computes). Prints one JSON line like edgeadapt.devices.bench_case, with the step's
GFLOP."""

from __future__ import annotations

import json
import sys
import time

from edgeadapt.devices.bench_case import peak_rss_mb


def main(bundle: str, batch: int, threads: int, steps: int, warmup: int) -> None:
    import numpy as np
    import torch

    from edgeadapt.runtime.manifest import Manifest
    from edgeadapt.toolchain.build import HeadRequest, build_zoo_model

    torch.set_num_threads(threads)
    manifest = Manifest.read(bundle)
    model = build_zoo_model(manifest.backbone, HeadRequest(labels=tuple(manifest.labels)), manifest.weights).module
    model.eval()  # BN uses frozen statistics; dropout off, as in the exported graphs
    trainable = set(manifest.trainable)
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
        if name in trainable:
            params.append(param)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=manifest.hyperparameters.get("weight_decay", 0.01),
                                  eps=1e-8)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal([batch, *manifest.input.shape[1:]]).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, len(manifest.labels), batch))
    times = []
    for i in range(warmup + steps):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if i >= warmup:
            times.append((time.perf_counter() - started) * 1000)
    peak = peak_rss_mb()  # before counting, which records every op
    print(json.dumps({"step_ms": times, "peak_rss_mb": peak, "step_gflop": _step_gflop(model, x)}))


def _step_gflop(model, x) -> float:
    """The multiply-adds (×2) of one step's convolutions and linear layers, as autograd runs them for this trainable
    set: each layer's forward, its input gradient where its input needs one (none below the first trainable layer) and
    its weight gradient where the weight trains, each as many MACs as the forward. (torch's FlopCounterMode counts
    depthwise convolutions' backward as dense: 98 instead of 14 GFLOP for MobileNetV2's full step at batch 8.)"""
    import torch

    macs = []

    def count(module, inputs, output):
        per_output = module.weight[0].numel()  # in/groups × kernel for a conv, in_features for a linear layer
        forward = output.numel() * per_output
        macs.append(forward * (1 + inputs[0].requires_grad + module.weight.requires_grad))

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    hooks = [layer.register_forward_hook(count) for layer in layers]
    model(x)
    for hook in hooks:
        hook.remove()
    return 2 * sum(macs) / 1e9


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:6]))
