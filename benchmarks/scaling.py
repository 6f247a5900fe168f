"""How a step's cost grows: step time and peak RSS against batch size and input size for head, last:2 and full on
MobileNetV2 (ImageNet), for PyTorch eager and both portable engines (onnxruntime, OpenVINO), each point a fresh
process per engine with the engines interleaved, and the planner's peak beside the measured ones. Writes a PNG (one
column per preset: time and memory against batch, then against input size) and prints the points as a table.

    python benchmarks/scaling.py --device-python .venv-device/bin/python --out benchmarks/scaling.png
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_pytorch import export, planned_mb, run, version  # noqa: E402

PRESETS = ("head", "last:2", "full")
ENGINES = ("pytorch", "onnxruntime", "openvino")


def sweep(args) -> list[dict]:
    """Every (preset, batch, size) point of both sweeps, measured on every engine."""
    points = [(p, b, args.size) for p in PRESETS for b in args.batch_sizes] + \
             [(p, args.batch, s) for p in PRESETS for s in args.sizes if s != args.size or args.batch not in
              args.batch_sizes]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (preset, batch, size) in enumerate(points):
            bundle = export(preset, size, Path(tmp))
            row = {"preset": preset, "batch": batch, "size": size, "planned_mb": planned_mb(bundle, batch)}
            for engine in ENGINES if i % 2 == 0 else ENGINES[::-1]:
                python = sys.executable if engine == "pytorch" else args.device_python
                row[engine] = run(engine, bundle, batch, args.threads, args.steps, args.warmup, python)
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def plot(rows: list[dict], batch_size: int, size: int, out: Path, versions: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(4, len(PRESETS), figsize=(4.2 * len(PRESETS), 12), squeeze=False)
    for column, preset in enumerate(PRESETS):
        for line, (axis_key, fixed_key, fixed, label) in enumerate((("batch", "size", size, f"batch ({size} px)"),
                                                                    ("size", "batch", batch_size,
                                                                     f"input px (batch {batch_size})"))):
            points = sorted((r for r in rows if r["preset"] == preset and r[fixed_key] == fixed),
                            key=lambda r: r[axis_key])
            xs = [r[axis_key] for r in points]
            time_axis, memory_axis = axes[2 * line][column], axes[2 * line + 1][column]
            for engine in ENGINES:
                time_axis.plot(xs, [r[engine]["step_ms"] for r in points], marker="o", label=engine)
                memory_axis.plot(xs, [r[engine]["peak_rss_mb"] for r in points], marker="o", label=engine)
            memory_axis.plot(xs, [r["planned_mb"] for r in points], linestyle="--", color="black",
                             label="planner")
            time_axis.set(title=f"{preset}: step time", xlabel=label, ylabel="ms")
            memory_axis.set(title=f"{preset}: peak RSS", xlabel=label, ylabel="MB")
            for axis in (time_axis, memory_axis):
                axis.grid(alpha=0.3)
                axis.legend(fontsize=7)
    figure.suptitle(f"MobileNetV2 training step, 2 threads ({versions})")
    figure.tight_layout()
    figure.savefig(out, dpi=90)


def print_points(rows: list[dict]) -> None:
    print("| preset | batch | px | PyTorch ms / MB | onnxruntime ms / MB | OpenVINO ms / MB | planned MB |")
    print("|---" * 7 + "|")
    for r in rows:
        cells = [f"{r[e]['step_ms']:.0f} / {r[e]['peak_rss_mb']:.0f}" for e in ENGINES]
        print(f"| {r['preset']} | {r['batch']} | {r['size']} | " + " | ".join(cells) + f" | {r['planned_mb']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="4,8,16,32,64", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--sizes", default="96,128,160,192,224", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--size", type=int, default=128, help="input size of the batch sweep")
    parser.add_argument("--batch", type=int, default=16, help="batch size of the input-size sweep")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device-python", default=sys.executable,
                        help="the device install's interpreter: it runs the portable engines")
    parser.add_argument("--out", type=Path, default=Path("scaling.png"))
    args = parser.parse_args()
    rows = sweep(args)
    versions = f"onnxruntime {version(args.device_python, 'onnxruntime')}, " \
               f"OpenVINO {version(args.device_python, 'openvino')}"
    plot(rows, args.batch, args.size, args.out, versions)
    print_points(rows)


if __name__ == "__main__":
    main()
