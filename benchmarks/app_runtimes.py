"""Step time of the same bundles on the Python runtime and the JavaScript runtime's engines, side by side in one run:
onnxruntime (Python), onnxruntime-node, onnxruntime-web WebAssembly with 1 and 2 threads and WebGPU in headless
Chromium (SwiftShader's software adapter here: it proves the graphs run; its times are not a GPU's). Fixed batches
of real texture photos, median ms per step after 2 warm-up steps.

    python benchmarks/app_runtimes.py --steps 8 --batches 8,32
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

JS = Path(__file__).resolve().parents[1] / "runtime" / "js"
CASES = (("tiny_cnn", "head", 32), ("tiny_cnn", "full", 32), ("mobilenet_v2", "head", 96), ("mobilenet_v2", "full", 96))


def texture_npz(path: Path, count: int) -> None:
    from PIL import Image

    from edgeadapt.toolchain.demo import write_texture_dataset

    root = path.parent / "textures"
    write_texture_dataset(root, train_per_class=(count + 3) // 4, test_per_class=1)
    files = sorted((root / "train").rglob("*.png"))
    labels = sorted({f.parent.name for f in files})
    x = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    np.savez(path, x=x, y=np.array([labels.index(f.parent.name) for f in files]))


def python_steps(bundle: Path, data: Path, steps: int, batch: int, lr: float = 1e-3):
    """(losses, ms per step, final parameters) of the Python runtime's onnxruntime engine over batches 0..B-1,
    B..2B-1, … of `data` (wrapping around): the fixed steps runtime/js/test/steps.mjs runs."""
    from edgeadapt.runtime.bundle import Bundle
    from edgeadapt.runtime.data import batch_inputs, load_dataset
    from edgeadapt.runtime.engines import open_engine

    opened = Bundle.open(bundle)
    dataset = load_dataset(data, opened)
    engine = open_engine(opened, opened.graphs(split=False), "onnxruntime")
    engine.load(opened.load_state())
    losses, times = [], []
    for s in range(steps):
        index = np.array([(s * batch + i) % len(dataset) for i in range(batch)])
        x = batch_inputs(dataset, index, opened.manifest)
        started = time.perf_counter()
        losses.append(engine.train_step(x, dataset.targets[index], lr)[0])
        times.append(1000 * (time.perf_counter() - started))
    return losses, times, engine.state().params


def python_ms(bundle: Path, data: Path, steps: int, batch: int) -> float:
    return statistics.median(python_steps(bundle, data, steps, batch)[1][2:])


def node_ms(bundle: Path, data: Path, steps: int, batch: int) -> float:
    done = subprocess.run(["node", str(JS / "test" / "node-steps.mjs"), str(bundle), str(data), str(steps), str(batch)],
                          capture_output=True, text=True, check=True)
    return statistics.median(json.loads(done.stdout)["times"][2:])


def browser_ms(root: Path, runs: list[dict]) -> list[float | str]:
    done = subprocess.run(["node", str(JS / "test" / "browser" / "run.mjs"), "steps", str(root), json.dumps(runs)],
                          capture_output=True, text=True, check=True, cwd=JS)
    return [r.get("error", "failed")[:40] if "times" not in r else statistics.median(r["times"][2:])
            for r in json.loads(done.stdout.strip().splitlines()[-1])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batches", default="8,32")
    args = parser.parse_args()
    from edgeadapt.toolchain.build import HeadRequest
    from edgeadapt.toolchain.export import ExportOptions, export_bundle

    batches = [int(b) for b in args.batches.split(",")]
    columns = ["Python onnxruntime", "onnxruntime-node", "WASM 1 thread", "WASM 2 threads", "WebGPU (software)"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        texture_npz(root / "data.npz", max(batches))
        for backbone, preset, size in CASES:
            name = f"{backbone}-{preset}"
            export_bundle(ExportOptions(out=root / name, backbone=backbone, trainable=preset, input_size=(size,),
                                        head=HeadRequest(num_classes=4), validate=False,
                                        weights="imagenet" if backbone == "mobilenet_v2" else None))
            for batch in batches:
                runs = [{"bundle": name, "data": "data.npz", "ep": [ep], "threads": threads, "steps": args.steps,
                         "batch": batch} for ep, threads in (("wasm", 1), ("wasm", 2), ("webgpu", 1))]
                cells = [python_ms(root / name, root / "data.npz", args.steps, batch),
                         node_ms(root / name, root / "data.npz", args.steps, batch), *browser_ms(root, runs)]
                rows.append((f"{backbone} {preset} {size}px", batch, cells))
                print(rows[-1], file=sys.stderr)
        shutil.rmtree(root / "textures", ignore_errors=True)
    print("| bundle | batch | " + " | ".join(columns) + " | node / Python | WASM 2t / node |")
    print("|---|---|" + "---|" * (len(columns) + 2))
    for label, batch, cells in rows:
        shown = [f"{c:.1f}" if isinstance(c, float) else str(c) for c in cells]
        ratios = [f"{cells[1] / cells[0]:.2f}",
                  f"{cells[3] / cells[1]:.2f}" if isinstance(cells[3], float) else "–"]
        print(f"| {label} | {batch} | " + " | ".join(shown) + " | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
