"""Fleet personalization on Fashion-MNIST (train split), MobileNetV2 ImageNet, through `edgeadapt fleet simulate`:
federated global and personalized accuracy against clients training alone, wall time and the peak RSS of the whole
process tree (Flower's Ray workers included); then the bytes one client sends and receives per round for the head,
last:2 and full presets.

    python benchmarks/fleet.py --out docs/fleet            # 10 clients, Dirichlet 0.3, 10 rounds, 96 px
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from datasets import FASHION_LABELS, fashion_mnist_train  # noqa: E402


def tree_rss_mb(pid: int) -> float:
    """RSS of `pid` and all its descendants, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            rss[int(entry.name)] = int(fields[21]) * 4096
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += rss.get(current, 0)
        todo.extend(children.get(current, []))
    return total / 2**20


def run_measured(command: list[str]) -> tuple[dict, float, float]:
    """(JSON stdout, wall seconds, peak tree RSS in MB) of a command."""
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def sample():
        while process.poll() is None:
            peak[0] = max(peak[0], tree_rss_mb(process.pid))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = process.communicate()
    sampler.join()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{err[-3000:]}")
    return json.loads(out), time.monotonic() - started, peak[0]


def export(preset: str, size: int, out: Path) -> Path:
    from edgeadapt.toolchain.build import HeadRequest
    from edgeadapt.toolchain.export import ExportOptions, export_bundle

    export_bundle(ExportOptions(out=out, backbone="mobilenet_v2", weights="imagenet", trainable=preset,
                                head=HeadRequest(labels=FASHION_LABELS), input_size=(size,), validate=False))
    return out


def simulate_command(bundle: Path, data: Path, clients: int, rounds: int, alpha: float, seed: int = 0,
                     local_epochs: int = 1) -> list[str]:
    return [sys.executable, "-m", "edgeadapt", "fleet", "simulate", str(bundle), str(data), "--clients", str(clients),
            "--rounds", str(rounds), "--non-iid", str(alpha), "--seed", str(seed), "--local-epochs",
            str(local_epochs), "--json"]


def fashion_npz(path: Path, count: int, seed: int) -> Path:
    images, labels = fashion_mnist_train()
    picked = np.random.default_rng(seed).permutation(len(labels))[:count]
    np.savez(path, x=images[picked], y=np.array(FASHION_LABELS)[labels[picked]])
    return path


def summary(runs: list[dict]) -> dict:
    """Mean over seeds of what the acceptance compares."""
    mean = lambda values: float(np.mean(values))  # noqa: E731
    last = [r["rounds"][-1] for r in runs]
    return {"samples": runs[0]["samples"], "seeds": len(runs),
            "global_accuracy": mean([x["global_accuracy"] for x in last]),
            "local_only_global_accuracy": mean([r["local_only"]["global_accuracy_mean"] for r in runs]),
            "personalized_accuracy": mean([x["personalized_accuracy_mean"] for x in last]),
            "personalized_accuracy_min": mean([x["personalized_accuracy_min"] for x in last]),
            "local_only_accuracy": mean([r["local_only"]["client_accuracy_mean"] for r in runs]),
            "local_only_accuracy_min": mean([r["local_only"]["client_accuracy_min"] for r in runs]),
            "wall_seconds": mean([r["wall_seconds"] for r in runs]), "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=10000, help="Fashion-MNIST train images used")
    parser.add_argument("--sweep", default="3000", help="more data sizes, for the summary table")
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--bytes-presets", default="head,last:2,full")
    parser.add_argument("--out", type=Path, default=Path("docs/fleet"))
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    sizes = [args.samples] + [int(n) for n in args.sweep.split(",") if n]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        head = export("head", args.size, root / "head")
        runs: dict[int, list[dict]] = {}
        for count in sizes:
            for seed in seeds:
                data = fashion_npz(root / "fashion.npz", count, seed)
                report, wall, peak = run_measured(simulate_command(head, data, args.clients, args.rounds, args.alpha,
                                                                   seed, args.local_epochs))
                report.update(wall_seconds=round(wall, 1), peak_rss_mb=round(peak), samples=count, size=args.size,
                              seed=seed)
                runs.setdefault(count, []).append(report)
                print(f"{count} images, seed {seed}: {wall:.0f} s, peak RSS {peak:.0f} MB, global "
                      f"{report['rounds'][-1]['global_accuracy']:.3f}, personalized "
                      f"{report['rounds'][-1]['personalized_accuracy_mean']:.3f}, local only "
                      f"{report['local_only']['client_accuracy_mean']:.3f}", file=sys.stderr)
        traffic = {}
        small = fashion_npz(root / "small.npz", 200, 0)
        for preset in args.bytes_presets.split(","):
            bundle = head if preset == "head" else export(preset, args.size, root / preset.replace(":", ""))
            one, _, _ = run_measured(simulate_command(bundle, small, 2, 1, 100.0))
            first = one["rounds"][0]
            traffic[preset] = {"trainable_bytes": one["trainable_bytes"], "bytes_up_per_client": first["bytes_up"] // 2,
                               "bytes_down_per_client": first["bytes_down"] // 2}
            print(f"{preset}: {traffic[preset]}", file=sys.stderr)
    result = {"main": runs[args.samples][0], "summary": [summary(runs[n]) for n in sizes], "traffic": traffic,
              "runs": runs}
    (args.out / "fleet.json").write_text(json.dumps(result, indent=1))
    (args.out / "fleet.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    report = result["main"]
    lines = [f"Seed {report['seed']}, {report['samples']} Fashion-MNIST train images at {report['size']} px, "
             f"MobileNetV2 ImageNet, head preset, {report['clients']} clients, Dirichlet {report['alpha']}, "
             f"{len(report['rounds'])} rounds of {report['local_epochs']} local epochs, FedAvg; wall "
             f"{report['wall_seconds']:.0f} s, peak RSS {report['peak_rss_mb']} MB (all processes).", "",
             "| round | global acc | client acc mean / min | personalized mean / min | bytes up | bytes down | s |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rounds"]:
        lines.append(f"| {r['round']} | {pct(r['global_accuracy'])} | {pct(r['client_accuracy_mean'])} / "
                     f"{pct(r['client_accuracy_min'])} | {pct(r['personalized_accuracy_mean'])} / "
                     f"{pct(r['personalized_accuracy_min'])} | {r['bytes_up']:,} | {r['bytes_down']:,} | "
                     f"{r['seconds']:.1f} |")
    alone = report["local_only"]
    lines += ["", f"Local only ({alone['epochs']} epochs each): own held-out mean {pct(alone['client_accuracy_mean'])}"
              f" (min {pct(alone['client_accuracy_min'])}); global held-out mean {pct(alone['global_accuracy_mean'])}.",
              "", "Means over seeds (global held-out = balanced; own held-out = each client's skewed share):", "",
              "| images | seeds | global acc: federated | global acc: local only | own acc: personalized | "
              "own acc: local only | margin | wall s | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for row in result["summary"]:
        margin = 100 * (row["personalized_accuracy"] - row["local_only_accuracy"])
        lines.append(f"| {row['samples']:,} | {row['seeds']} | {pct(row['global_accuracy'])} | "
                     f"{pct(row['local_only_global_accuracy'])} | {pct(row['personalized_accuracy'])} | "
                     f"{pct(row['local_only_accuracy'])} | {margin:+.1f} pt | {row['wall_seconds']:.0f} | "
                     f"{row['peak_rss_mb']} |")
    lines += ["", "| preset | trainable bytes | up per client per round | down per client per round |",
              "|---|---|---|---|"]
    for preset, t in result["traffic"].items():
        lines.append(f"| {preset} | {t['trainable_bytes']:,} | {t['bytes_up_per_client']:,} | "
                     f"{t['bytes_down_per_client']:,} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
