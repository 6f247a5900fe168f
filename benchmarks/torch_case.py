"""One PyTorch-eager training case, in its own process: the same model, trainable set, batch, optimizer (AdamW,
weight decay 0.01, eps 1e-8) and threads as an edgeadapt bundle, BatchNorm in eval mode (frozen statistics, the
math edgeadapt's `fold` policy computes). Prints one JSON line like edgeadapt.devices.bench_case."""

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
    print(json.dumps({"step_ms": times, "peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:6]))
