"""Crash torture, N = 100 by default: SIGKILL `edgeadapt train` at random moments (checkpoint writes included),
then check the last good checkpoint, resume, and compare the final weights with an uninterrupted run. With
`--commit-points`, kill instead at every commit point of every epoch (just before and just after each rename of the
state file — checkpoints, the epoch's commit of state, best state and log lines, the final state — and just after
each log append), on each engine of `--engines`, and compare weights and log lines too.

    python benchmarks/crash_torture.py [--trials 100] [--backbone tiny_cnn]
    python benchmarks/crash_torture.py --commit-points [--engines onnxruntime,openvino]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the harness lives with the tests


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
    parser.add_argument("--commit-points", action="store_true", help="kill at every commit point instead")
    parser.add_argument("--engines", default="onnxruntime,openvino")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--checkpoint-every", default="4")
    args = parser.parse_args()

    from torture import torture

    from edgeadapt.toolchain.build import HeadRequest
    from edgeadapt.toolchain.export import ExportOptions, export_bundle

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        template = export_bundle(ExportOptions(out=root / "template", backbone=args.backbone, trainable="full",
                                               head=HeadRequest(labels=tuple("0123456789")))).out
        data = make_data(root, args.backbone)
        if args.commit_points:
            from torture import torture_commit_points

            for engine in args.engines.split(","):
                options = ["--epochs", str(args.epochs), "--batch-size", "32", "--seed", "7", "--checkpoint-every",
                           args.checkpoint_every, "--patience", "3", "--engine", engine]
                report(f"commit points, {engine}", torture_commit_points(template, data, options, root / engine))
            return
        options = ["--epochs", "4", "--batch-size", "32", "--seed", "7", "--checkpoint-every", "2", "--augment"]
        report("random kills", torture(template, data, options, args.trials, root, args.seed))


def report(title: str, tally) -> None:
    print(title, json.dumps({k: v for k, v in asdict(tally).items() if k != "notes"}), flush=True)
    for note in tally.notes[:5]:
        print("note:", note)


if __name__ == "__main__":
    main()
