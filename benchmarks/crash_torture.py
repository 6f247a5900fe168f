"""Crash torture, N = 100 by default: SIGKILL `edgeadapt train` at random moments (checkpoint writes included),
then check the last good checkpoint, resume, and compare the final weights with an uninterrupted run.

    python benchmarks/crash_torture.py [--trials 100] [--backbone tiny_cnn]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np


def make_data(root: Path, backbone: str) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    if backbone == "tiny_mlp":
        x = (digits.data / 16).astype(np.float32)
    else:  # 8x8 digits as uint8 images; the runtime resizes them to the model's input
        x = (digits.images * 255 / 16).astype(np.uint8)
    path = root / "digits.npz"
    np.savez(path, x=x[:600], y=digits.target[:600].astype(str))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--backbone", default="tiny_cnn")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from edgeadapt.runtime.torture import torture
    from edgeadapt.toolchain.build import HeadRequest
    from edgeadapt.toolchain.export import ExportOptions, export_bundle

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        template = export_bundle(ExportOptions(out=root / "template", backbone=args.backbone, trainable="full",
                                               head=HeadRequest(labels=tuple("0123456789")))).out
        options = ["--epochs", "4", "--batch-size", "32", "--seed", "7", "--checkpoint-every", "2", "--augment"]
        tally = torture(template, make_data(root, args.backbone), options, args.trials, root, args.seed)
    print(json.dumps({k: v for k, v in asdict(tally).items() if k != "notes"}, indent=1))
    for note in tally.notes[:5]:
        print("note:", note)


if __name__ == "__main__":
    main()
