"""edgeadapt vs PyTorch eager on the same training work, side by side in one run.

For each preset × batch size × input size, both engines train MobileNetV2 (ImageNet weights, 10-class head) in a
fresh process each, limited to the same threads; rounds are interleaved and medians reported. Prints a markdown
table with step time and peak RSS of each, and the ratios edgeadapt / PyTorch.

    python benchmarks/compare_pytorch.py                # full grid: head last:2 bias full × 8,32 × 128,224
    python benchmarks/compare_pytorch.py --quick        # head and full, batch 32, 224 px, one round
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
                                    head=HeadRequest(num_classes=10), input_size=(size,), validate=False))
    return out


def run(engine: str, bundle: Path, batch: int, threads: int, steps: int, warmup: int) -> dict:
    """engine: pytorch; edgeadapt (whole-graph training step); edgeadapt-split (prefix inference + suffix step:
    what `edgeadapt train` does for head/last:K in an epoch whose features are not cached yet)."""
    script = ["-m", "edgeadapt.devices.bench_case"] if engine.startswith("edgeadapt") else \
        [str(HERE / "torch_case.py")]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    args = [sys.executable, *script, str(bundle), str(batch), str(threads), str(steps), str(warmup)]
    if engine.startswith("edgeadapt"):
        args.append("--no-inference")
    if engine == "edgeadapt-split":
        args.append("--split")
    done = subprocess.run(args, capture_output=True, text=True, env=env, check=True)
    raw = json.loads(done.stdout.strip().splitlines()[-1])
    return {"step_ms": float(np.median(raw["step_ms"])), "peak_rss_mb": raw["peak_rss_mb"]}


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
    args = parser.parse_args()
    if args.quick:
        args.presets, args.batch_sizes, args.sizes, args.rounds = "head,full", "32", "224", 1
    cells = [(p, b, s) for s in map(int, args.sizes.split(",")) for p in args.presets.split(",")
             for b in map(int, args.batch_sizes.split(","))]
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        bundles = {(p, s): export(p, s, Path(tmp)) for p, _, s in cells}
        for round_ in range(args.rounds):
            for preset, batch, size in cells:
                engines = ["pytorch", "edgeadapt"] + (["edgeadapt-split"] if preset in SPLIT_PRESETS else [])
                for engine in engines if round_ % 2 == 0 else engines[::-1]:
                    measured = run(engine, bundles[(preset, size)], batch, args.threads, args.steps, args.warmup)
                    results.setdefault((preset, batch, size, engine), []).append(measured)
                    print(f"round {round_ + 1} {engine:9} {preset:6} batch {batch:2} {size}px: "
                          f"{measured['step_ms']:.0f} ms, {measured['peak_rss_mb']:.0f} MB", file=sys.stderr)
    print_table(cells, results, args.threads)
    if args.json:
        args.json.write_text(json.dumps([{"preset": p, "batch": b, "size": s, "engine": e, "runs": r}
                                         for (p, b, s, e), r in results.items()], indent=1))


def _median(runs: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in runs]))


def print_table(cells, results, threads: int) -> None:
    print(f"\nMobileNetV2 (ImageNet), {threads} threads, medians of interleaved rounds; ratio = edgeadapt / PyTorch\n")
    print("| preset | batch | px | PyTorch step / peak RSS | edgeadapt whole-graph step / peak RSS | ratio | "
          "edgeadapt train path (split, uncached) | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for preset, batch, size in cells:
        t_ms, t_mb = (_median(results[(preset, batch, size, "pytorch")], k) for k in ("step_ms", "peak_rss_mb"))
        e_ms, e_mb = (_median(results[(preset, batch, size, "edgeadapt")], k) for k in ("step_ms", "peak_rss_mb"))
        row = f"| {preset} | {batch} | {size} | {t_ms:.0f} ms / {t_mb:.0f} MB | {e_ms:.0f} ms / {e_mb:.0f} MB | " \
              f"{e_ms / t_ms:.2f} / {e_mb / t_mb:.2f} |"
        split = results.get((preset, batch, size, "edgeadapt-split"))
        if split:
            s_ms, s_mb = _median(split, "step_ms"), _median(split, "peak_rss_mb")
            row += f" {s_ms:.0f} ms / {s_mb:.0f} MB | {s_ms / t_ms:.2f} / {s_mb / t_mb:.2f} |"
        else:
            row += " – | – |"
        print(row)


if __name__ == "__main__":
    main()
