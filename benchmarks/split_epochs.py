"""Split vs whole-graph training on real images: MobileNetV2 (ImageNet) `head`, Fashion-MNIST train-split images at
224 px, 5 epochs. Prints per-epoch times, total time and peak RSS of both paths, and the INT8 prefix's latency and
held-out accuracy against the float prefix.

    python benchmarks/split_epochs.py [--images 256] [--epochs 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import FASHION_LABELS, fashion_subsets  # noqa: E402

RUN = """
import json, sys, time
sys.modules['torch'] = None
from edgeadapt.devices.bench_case import peak_rss_mb
from edgeadapt.runtime.trainer import Trainer, TrainConfig
started = time.perf_counter()
summary = Trainer(sys.argv[1], TrainConfig(epochs=int(sys.argv[3]), batch_size=32, val_split=0.0, split=sys.argv[4],
                                           prefix_int8=sys.argv[5] == "int8")).fit(sys.argv[2])
print(json.dumps({"total_s": time.perf_counter() - started, "epochs_s": [r.seconds for r in summary.records],
                  "peak_rss_mb": peak_rss_mb()}))
"""


def train(bundle: Path, data: Path, epochs: int, split: str, prefix: str = "float") -> dict:
    done = subprocess.run([sys.executable, "-c", RUN, str(bundle), str(data), str(epochs), split, prefix],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def held_out_accuracy(bundle: Path, data_file: Path, prefix_file: str) -> tuple[float, float]:
    """(accuracy, prefix latency ms at batch 1) of the trained suffix on features from `prefix_file`."""
    from edgeadapt.runtime.bundle import Bundle
    from edgeadapt.runtime.data import load_dataset, preprocess
    from edgeadapt.runtime.engines import open_engine
    from edgeadapt.runtime.metrics import dummy_targets
    from edgeadapt.runtime.prefix import PrefixRunner

    b = Bundle.open(bundle)
    data = load_dataset(data_file, b)
    prefix = b.read_device_graph(prefix_file) if prefix_file != b.manifest.split.prefix_model else \
        b.read_graph(prefix_file)
    runner = PrefixRunner(prefix, threads=2,
                          statistics=b.load_state().statistics)
    suffix = open_engine(b, b.graphs(split=True), training=False)
    suffix.load(b.load_state())
    correct = 0
    for i in range(0, len(data), 50):
        inputs = preprocess(data.samples[i:i + 50], b.manifest, True)
        logits = suffix.eval_step(runner(inputs), dummy_targets(b.manifest, len(inputs)))[1]
        correct += int((logits.argmax(1) == data.targets[i:i + 50]).sum())
    one = preprocess(data.samples[:1], b.manifest, True)
    runner(one)
    started = time.perf_counter()
    for _ in range(20):
        runner(one)
    return correct / len(data), (time.perf_counter() - started) / 20 * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--held-out", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    from edgeadapt.toolchain.build import HeadRequest
    from edgeadapt.toolchain.export import ExportOptions, export_bundle

    (x, y), (xt, yt) = fashion_subsets(args.images, args.held_out)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        np.savez(root / "train.npz", x=x, y=y)
        np.savez(root / "test.npz", x=xt, y=yt)
        template = export_bundle(ExportOptions(out=root / "template", backbone="mobilenet_v2", weights="imagenet",
                                               head=HeadRequest(labels=FASHION_LABELS), trainable="head")).out
        results = {}
        for name, split in (("whole graph", "off"), ("split", "on")):
            shutil.copytree(template, root / name)
            results[name] = train(root / name, root / "train.npz", args.epochs, split)
        for name, r in results.items():
            print(f"{name:12}: total {r['total_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB, epochs (s): "
                  + ", ".join(f"{s:.3f}" for s in r["epochs_s"]))
        whole, split = results["whole graph"]["epochs_s"], results["split"]["epochs_s"]
        print(f"epochs 2-{args.epochs}: split {np.mean(split[1:]) * 1000:.1f} ms vs whole graph "
              f"{np.mean(whole[1:]) * 1000:.0f} ms per epoch = {np.mean(whole[1:]) / np.mean(split[1:]):.0f}x faster")
        quantize = subprocess.run([sys.executable, "-m", "edgeadapt", "quantize-prefix", str(root / "split"),
                                   str(root / "train.npz")], capture_output=True, text=True, check=True)
        print(quantize.stdout.strip())
        accuracy, latency = held_out_accuracy(root / "split", root / "test.npz", "prefix.onnx")
        shutil.copytree(template, root / "int8")
        shutil.copy(root / "split" / "prefix_int8.onnx", root / "int8" / "prefix_int8.onnx")
        int8_run = train(root / "int8", root / "train.npz", args.epochs, "on", "int8")
        accuracy8, latency8 = held_out_accuracy(root / "int8", root / "test.npz", "prefix_int8.onnx")
        print(f"held-out accuracy on {len(yt)} images: float prefix {accuracy:.1%} ({latency:.1f} ms/image), "
              f"INT8 prefix {accuracy8:.1%} ({latency8:.1f} ms/image); INT8 run total {int8_run['total_s']:.1f} s")


if __name__ == "__main__":
    main()
