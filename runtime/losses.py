"""The bundle's losses in numpy (mean reduction, PyTorch's definitions), for engines whose eval graph gives logits."""

from __future__ import annotations

import numpy as np


def mean_loss(loss: str, logits: np.ndarray, targets: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    if loss == "cross_entropy":
        shifted = logits - logits.max(1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
        return float(-log_p[np.arange(len(targets)), targets.astype(np.int64)].mean())
    if loss == "bce_with_logits":
        return float((np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits)))).mean())
    if loss == "mse":
        return float(((logits - targets) ** 2).mean())
    return float(np.abs(logits - targets).mean())
