"""edgeadapt's engines vs PyTorch eager on the same training work, side by side in one run.

For each preset × batch size × input size, PyTorch eager and each edgeadapt engine (ort-training: ONNX Runtime
training's artifacts; onnxruntime and openvino: the portable step on the CPU) train MobileNetV2 (ImageNet weights,
10-class head) in a fresh process each, limited to the same threads; rounds are interleaved and medians reported.
For head and last:2, `onnxruntime-split` is what `edgeadapt train` runs in an uncached epoch (prefix inference +
suffix step). With `--device-python`, the portable engines run in the device install's interpreter (its newer
onnxruntime, OpenVINO) and the host's onnxruntime stays as a column. Prints a markdown table of step time and peak
RSS, the portable engines' ratios to ort-training and to PyTorch, the planner's prediction against the measured peak,
and the achieved GFLOP/s (the step's convolution and linear work, counted from the PyTorch model) next to this
machine's sgemm throughput at the same threads.

    python benchmarks/compare_pytorch.py                # full grid: head last:2 bias full × 8,32 × 128,224
    python benchmarks/compare_pytorch.py --quick        # head and full, batch 32, 224 px, one round
    python benchmarks/compare_pytorch.py --device-python .venv-device/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SPLIT_PRESETS = ("head", "last:2")


def export(preset: str, size: int, root: Path) -> Path:
    from edgeadapt.toolchain.build import HeadRequest
    from edgeadapt.toolchain.export import ExportOptions, export_bundle

    out = root / f"{preset.replace(':', '')}-{size}"
    if not out.exists():
        export_bundle(ExportOptions(out=out, backbone="mobilenet_v2", weights="imagenet", trainable=preset,
                                    head=HeadRequest(num_classes=10), input_size=(size,), validate=False,
                                    backbone_lr_ratio=1.0, decay_norms=True))  # one group: ORT training runs it too
    return out


ENGINES = ("pytorch", "ort-training", "onnxruntime", "openvino")
DEVICE_ENGINES = ("onnxruntime", "openvino", "onnxruntime-split")  # what --device-python runs
HOST_ORT = "onnxruntime-host"  # the host's onnxruntime, a column when the device install runs the portable engines
SGEMM_N = 2048


def _threads_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "OPENBLAS_NUM_THREADS": str(threads)}


def run(engine: str, bundle: Path, batch: int, threads: int, steps: int, warmup: int, python: str) -> dict:
    """engine: pytorch, or an edgeadapt engine; `-split` appended: prefix inference + suffix step."""
    edgeadapt = engine != "pytorch"
    script = ["-m", "edgeadapt.devices.bench_case"] if edgeadapt else [str(HERE / "torch_case.py")]
    args = [python, *script, str(bundle), str(batch), str(threads), str(steps), str(warmup)]
    if edgeadapt:
        args += ["--no-inference", "--engine", engine.removesuffix("-split").removesuffix("-host")]
    if engine.endswith("-split"):
        args.append("--split")
    done = subprocess.run(args, capture_output=True, text=True, env=_threads_env(threads), check=True)
    raw = json.loads(done.stdout.strip().splitlines()[-1])
    return {"step_ms": float(np.median(raw["step_ms"])), "peak_rss_mb": raw["peak_rss_mb"],
            **({"step_gflop": raw["step_gflop"]} if "step_gflop" in raw else {})}


def sgemm_gflops(threads: int) -> float:
    """This machine's float32 matrix-multiply throughput at `threads` (numpy's BLAS, best of five 2048² products)."""
    n = SGEMM_N
    code = (f"import time, numpy as np; a = np.ones(({n}, {n}), np.float32); b = a.copy(); a @ b; best = 1e9\n"
            "for _ in range(5):\n t = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t)\n"
            f"print(2 * {n} ** 3 / best / 1e9)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_threads_env(threads),
                          check=True)
    return float(done.stdout)


def version(python: str, module: str) -> str:
    done = subprocess.run([python, "-c", f"import {module}; print({module}.__version__)"], capture_output=True,
                          text=True, check=True)
    return done.stdout.strip().split("-")[0]


def planned_mb(bundle: Path, batch: int) -> float:
    from edgeadapt.devices.planner import planned_peak
    from edgeadapt.runtime.manifest import Manifest

    return planned_peak(Manifest.read(bundle), batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="head,last:2,bias,full")
    parser.add_argument("--batch-sizes", default="8,32")
    parser.add_argument("--sizes", default="128,224")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--device-python", help="the device install's interpreter: it runs the portable engines")
    args = parser.parse_args()
    if args.quick:
        args.presets, args.batch_sizes, args.sizes, args.rounds = "head,full", "32", "224", 1
    cells = [(p, b, s) for s in map(int, args.sizes.split(",")) for p in args.presets.split(",")
             for b in map(int, args.batch_sizes.split(","))]
    device = args.device_python or sys.executable
    engines_of = {e: device if e in DEVICE_ENGINES else sys.executable for e in ENGINES}
    if args.device_python:
        engines_of[HOST_ORT] = sys.executable
    results: dict = {}
    sgemm = sgemm_gflops(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        bundles = {(p, s): export(p, s, Path(tmp)) for p, _, s in cells}
        planned = {(p, b, s): planned_mb(bundles[(p, s)], b) for p, b, s in cells}
        for round_ in range(args.rounds):
            for preset, batch, size in cells:
                engines = list(engines_of) + (["onnxruntime-split"] if preset in SPLIT_PRESETS else [])
                for engine in engines if round_ % 2 == 0 else engines[::-1]:
                    measured = run(engine, bundles[(preset, size)], batch, args.threads, args.steps, args.warmup,
                                   engines_of.get(engine, device))
                    results.setdefault((preset, batch, size, engine), []).append(measured)
                    print(f"round {round_ + 1} {engine:17} {preset:6} batch {batch:2} {size}px: "
                          f"{measured['step_ms']:.0f} ms, {measured['peak_rss_mb']:.0f} MB", file=sys.stderr)
    versions = {"device": version(device, "onnxruntime"), "host": version(sys.executable, "onnxruntime")}
    print_table(cells, results, args.threads, planned, sgemm, versions)
    if args.json:
        args.json.write_text(json.dumps([{"preset": p, "batch": b, "size": s, "engine": e, "runs": r}
                                         for (p, b, s, e), r in results.items()], indent=1))


def _median(runs: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in runs]))


def _cell(results, key) -> tuple[float, float] | None:
    runs = results.get(key)
    return (_median(runs, "step_ms"), _median(runs, "peak_rss_mb")) if runs else None


def print_table(cells, results, threads: int, planned: dict, sgemm: float, versions: dict) -> None:
    host = any(key[3] == HOST_ORT for key in results)
    ort_name = f"onnxruntime {versions['device']}"
    print(f"\nMobileNetV2 (ImageNet), {threads} threads, medians of interleaved rounds. Each cell: step ms / peak RSS "
          "MB; ratios: time / memory against ORT-training (target ≤ 1) and against PyTorch (stretch: time ≤ 1)\n")
    head = ["preset", "batch", "px", "PyTorch", "ORT-training", ort_name, "vs ORT-tr.", "vs PyTorch"]
    head += [f"onnxruntime {versions['host']} (host)", "vs ORT-tr.", "vs PyTorch"] if host else []
    head += ["OpenVINO", "vs ORT-tr.", "vs PyTorch", "onnxruntime split path", "vs PyTorch"]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for preset, batch, size in cells:
        torch_, ort = (_cell(results, (preset, batch, size, e)) for e in ("pytorch", "ort-training"))
        row = [preset, str(batch), str(size), _fmt(torch_), _fmt(ort)]
        for engine in ("onnxruntime", *([HOST_ORT] if host else []), "openvino"):
            mine = _cell(results, (preset, batch, size, engine))
            row += [_fmt(mine), _ratio(mine, ort), _ratio(mine, torch_, time_only=True)]
        split = _cell(results, (preset, batch, size, "onnxruntime-split"))
        row += [_fmt(split), _ratio(split, torch_, time_only=True)]
        print("| " + " | ".join(row) + " |")
    print(f"\nThe planner's peak against the measured one (planned / measured), and the achieved GFLOP/s of the step's "
          f"convolution and linear work; this machine's sgemm: {sgemm:.0f} GFLOP/s at {threads} threads "
          f"({SGEMM_N}² float32, numpy's BLAS)\n")
    engines = ["pytorch", "ort-training", "onnxruntime", *([HOST_ORT] if host else []), "openvino"]
    names = ["PyTorch", "ORT-training", ort_name, *([f"onnxruntime {versions['host']}"] if host else []), "OpenVINO"]
    head = ["preset", "batch", "px", "planned MB", f"vs {ort_name}", *([f"vs {versions['host']}"] if host else []),
            "vs OpenVINO", "GFLOP / step", *(f"GFLOP/s {n}" for n in names)]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for preset, batch, size in cells:
        plan = planned[(preset, batch, size)]
        row = [preset, str(batch), str(size), f"{plan:.0f}"]
        for engine in ("onnxruntime", *([HOST_ORT] if host else []), "openvino"):
            mine = _cell(results, (preset, batch, size, engine))
            row.append(f"{plan / mine[1]:.2f}" if mine else "–")
        gflop = _median(results[(preset, batch, size, "pytorch")], "step_gflop")
        row.append(f"{gflop:.1f}")
        for engine in engines:
            mine = _cell(results, (preset, batch, size, engine))
            row.append(f"{gflop / mine[0] * 1000:.1f}" if mine else "–")
        print("| " + " | ".join(row) + " |")


def _fmt(cell) -> str:
    return f"{cell[0]:.0f} / {cell[1]:.0f}" if cell else "–"


def _ratio(cell, reference, time_only: bool = False) -> str:
    if not cell or not reference:
        return "–"
    return f"{cell[0] / reference[0]:.2f}" if time_only else \
        f"{cell[0] / reference[0]:.2f} / {cell[1] / reference[1]:.2f}"


if __name__ == "__main__":
    main()
