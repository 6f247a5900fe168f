"""Real data available offline for the benchmarks: Debian's `dataset-fashion-mnist` (IDX files)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_LABELS = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle-boot")


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist_train() -> tuple[np.ndarray, np.ndarray]:
    """The train split's 60,000 images (uint8, 28×28) and labels. `apt-get install dataset-fashion-mnist`."""
    if not FASHION_MNIST.is_dir():
        raise SystemExit("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist")
    return _idx(FASHION_MNIST / "train-images-idx3-ubyte.gz"), _idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz")


def fashion_subsets(train: int, held_out: int, seed: int = 0, per_class: bool = False):
    """Disjoint seeded subsets of the train split: (x_train, y_train), (x_test, y_test); labels as names."""
    images, labels = fashion_mnist_train()
    order = np.random.default_rng(seed).permutation(len(labels))
    if per_class:  # `train` images of each class
        picked = np.concatenate([order[labels[order] == c][:train] for c in range(10)])
    else:
        picked = order[:train]
    rest = np.setdiff1d(order, picked, assume_unique=False)
    test = np.random.default_rng(seed + 1).permutation(rest)[:held_out]
    names = np.array(FASHION_LABELS)
    return (images[picked], names[labels[picked]]), (images[test], names[labels[test]])
