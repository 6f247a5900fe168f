"""Scratch vs transfer learning vs fine-tuning, measured through the real export → runtime path.

Strategies: scratch (random init, all trainable), head (transfer learning), bias (TinyTL), last:2, full, on
MobileNetV2 with ImageNet weights; k training images per class, several seeds; a fixed held-out set drawn from the
same split. Each run trains in a fresh process with torch blocked (peak RSS from VmHWM). Writes a markdown table and
two plots (accuracy vs shots; accuracy vs peak memory) and a JSON of every run.

    python benchmarks/study.py --quick                 # digits (scikit-learn), 32 px: about 2 minutes
    python benchmarks/study.py --out docs/study        # Fashion-MNIST train split, 96 px, k 1..50, 3 seeds
    python benchmarks/study.py --out docs/study --strategies head,head+adabn --merge docs/study/runs.json

`X+adabn`: preset X, and `train --adabn` (the BN statistics re-estimated on the k-shot training images first).
`sparse@P`: `--trainable sparse` with `--budget-mb` set to preset P's planned peak (split run, batch 32), to P MB
when P is a number, or P% of the way from head's planned peak to full's (the ladder: sparse@0%,25%,...,100%), and
the k-shot training images as `--calibration` (so it is exported for every run, its new head initialised as every
pretrained strategy's: export seed 0).
`X/key=value,...`: export options for X: `lr` (the head's rate) and `ratio` (--backbone-lr-ratio), e.g.
`full/ratio=1,lr=1e-4` is full fine-tuning with one rate for every tensor.

    python benchmarks/study.py --out docs/study/ladder --shots 20,50 \
        --strategies head,last:2,sparse@0%,sparse@25%,sparse@50%,sparse@75%,sparse@100%,full,full/ratio=1,lr=1e-4
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
STRATEGIES = ("scratch", "head", "bias", "last:2", "full", "head+adabn", "last:2+adabn", "sparse@138",
              "sparse@last:2", "sparse@180", "sparse@last:2+adabn")
RUN = """
import json, sys, time
sys.modules['torch'] = None
from edgeadapt.devices.bench_case import peak_rss_mb
from edgeadapt.runtime.inference import evaluate
from edgeadapt.runtime.trainer import Trainer, TrainConfig
bundle, train, test, epochs, batch, seed, adabn = sys.argv[1:8]
started = time.perf_counter()
Trainer(bundle, TrainConfig(epochs=int(epochs), batch_size=int(batch), seed=int(seed), val_split=0.0,
                            adabn=adabn)).fit(train)
seconds = time.perf_counter() - started
print(json.dumps({"accuracy": evaluate(bundle, test).accuracy, "train_s": seconds, "peak_rss_mb": peak_rss_mb()}))
"""


def load(quick: bool):
    """(images uint8 N×H×W, label names, class names)."""
    if quick:
        from sklearn.datasets import load_digits

        digits = load_digits()
        names = tuple(str(i) for i in range(10))
        return (digits.images * 255 / 16).astype(np.uint8), np.array(names)[digits.target], names
    from datasets import FASHION_LABELS, fashion_mnist_train

    images, labels = fashion_mnist_train()
    return images, np.array(FASHION_LABELS)[labels], FASHION_LABELS


def split_data(labels: np.ndarray, held_out: int, shots: list[int], seeds: list[int]):
    """A fixed held-out set, then for each seed nested k-shot training sets from the rest (k images per class)."""
    order = np.random.default_rng(1234).permutation(len(labels))
    test, rest = order[:held_out], order[held_out:]
    sets = {}
    for seed in seeds:
        shuffled = np.random.default_rng(seed).permutation(rest)
        for k in shots:
            sets[(k, seed)] = np.concatenate([shuffled[labels[shuffled] == c][:k] for c in np.unique(labels)])
    return test, sets


def epochs_for(count: int, batch: int, min_steps: int = 60, max_epochs: int = 40) -> int:
    """Enough epochs for at least `min_steps` optimizer steps, as few-shot sets are tiny."""
    return int(min(max_epochs, max(5, np.ceil(min_steps / np.ceil(count / batch)))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shots", default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--held-out", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("study"))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--merge", type=Path, default=None, help="runs.json of earlier runs, for strategies not run")
    args = parser.parse_args()
    shots = [int(k) for k in (args.shots or ("1,5,10" if args.quick else "1,5,10,20,50")).split(",")]
    seeds = list(range(2 if args.quick and args.seeds == 3 else args.seeds))
    size = args.size or (32 if args.quick else 96)
    images, labels, classes = load(args.quick)
    test, sets = split_data(labels, 300 if args.quick else args.held_out, shots, seeds)
    chosen = split_strategies(args.strategies)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = run_all(images, labels, classes, test, sets, size, 25 if args.quick else 60, chosen,
                   args.out / "runs.partial.json")
    if args.merge:  # same protocol, same seeds: earlier runs of the strategies not run now
        runs += [r for r in json.loads(args.merge.read_text()) if r["strategy"] not in chosen]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runs.json").write_text(json.dumps(runs, indent=1))
    table = report(runs, shots, "digits (scikit-learn)" if args.quick else "Fashion-MNIST train split", size)
    (args.out / "results.md").write_text(table)
    plot(runs, shots, args.out)
    print(table)


def run_all(images, labels, classes, test, sets, size: int, min_steps: int, strategies=STRATEGIES,
            partial: Path | None = None) -> list[dict]:
    """Every strategy on every (k, seed) set; each finished run is also written to `partial` at once (a long study
    that stops keeps what it measured)."""
    from edgeadapt.toolchain.build import HeadRequest
    from edgeadapt.toolchain.export import ExportOptions, export_bundle

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        np.savez(root / "test.npz", x=images[test], y=labels[test])
        def export(preset: str, out: Path, seed: int, **extra) -> Path:
            if not out.exists():
                export_bundle(ExportOptions(out=out, backbone="mobilenet_v2", weights="imagenet", trainable=preset,
                                            head=HeadRequest(labels=classes), input_size=(size,), seed=seed,
                                            validate=False, **extra))
            return out

        def budget_of(reference: str) -> float:
            if reference.endswith("%"):
                low, high = (budget_of(p) for p in ("head", "full"))
                return math.ceil(10 * (low + float(reference[:-1]) / 100 * (high - low))) / 10
            if reference.replace(".", "").isdigit():
                return float(reference)
            return sparse_budget(export(reference, root / reference.replace(":", ""), 0))

        for strategy in strategies:
            preset, options = parse_strategy(strategy)
            preset, _, adabn = preset.partition("+")
            tag = "".join(c if c.isalnum() else "_" for c in strategy)
            for (k, seed), index in sorted(sets.items()):
                np.savez(root / f"train-{k}-{seed}.npz", x=images[index], y=labels[index])
                shutil.copyfile(root / f"train-{k}-{seed}.npz", root / "train.npz")
                if preset.startswith("sparse@"):
                    template = export("sparse", root / f"{tag}-{k}-{seed}", 0, budget_mb=budget_of(preset[7:]),
                                      calibration=root / f"train-{k}-{seed}.npz", **options)
                else:
                    template = export(preset, root / f"{tag}-{seed if preset == 'scratch' else 0}", seed, **options)
                work = root / "work"
                shutil.rmtree(work, ignore_errors=True)
                shutil.copytree(template, work)
                batch = min(32, len(index))
                epochs = epochs_for(len(index), batch, min_steps)
                done = subprocess.run([sys.executable, "-c", RUN, str(work), str(root / "train.npz"),
                                       str(root / "test.npz"), str(epochs), str(batch), str(seed),
                                       "all" if adabn else ""],
                                      capture_output=True, text=True, check=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                runs.append({"strategy": strategy, "shots": k, "seed": seed, "epochs": epochs, **result})
                if partial is not None:
                    partial.write_text(json.dumps(runs, indent=1))
                print(f"{strategy:8} k={k:3} seed={seed}: {result['accuracy']:.3f} in {result['train_s']:.1f} s, "
                      f"{result['peak_rss_mb']:.0f} MB", file=sys.stderr)
    return runs


def split_strategies(text: str) -> list[str]:
    """Comma-separated strategies, where `key=value` items continue the previous strategy's options."""
    strategies: list[str] = []
    for item in text.split(","):
        if "=" in item and "/" not in item and strategies:
            strategies[-1] += "," + item
        else:
            strategies.append(item)
    return strategies


def parse_strategy(strategy: str) -> tuple[str, dict]:
    """`preset[+adabn][/lr=…,ratio=…]` → (preset[+adabn], ExportOptions fields)."""
    preset, _, given = strategy.partition("/")
    names = {"lr": "lr", "ratio": "backbone_lr_ratio"}
    options = {}
    for item in filter(None, given.split(",")):
        key, _, value = item.partition("=")
        options[names[key]] = float(value)
    return preset, options


def sparse_budget(bundle: Path) -> float:
    """The planned peak MB of training `bundle` (split when it is) at batch 32: the budget `sparse@P` fits."""
    from edgeadapt.devices.planner import planned_peak
    from edgeadapt.runtime.bundle import Bundle

    return math.ceil(10 * planned_peak(Bundle.open(bundle).manifest, 32, split=True)) / 10  # P's plan fits


def ordered_strategies(runs) -> list[str]:
    """The study's own strategies in their order, then the others as they were run."""
    seen = list(dict.fromkeys(r["strategy"] for r in runs))
    return [s for s in STRATEGIES if s in seen] + [s for s in seen if s not in STRATEGIES]


def _cell(runs, strategy, k, key):
    values = [r[key] for r in runs if r["strategy"] == strategy and r["shots"] == k]
    return float(np.mean(values)), float(np.std(values))


def report(runs, shots, data: str, size: int) -> str:
    seeds = len({r["seed"] for r in runs})
    lines = [f"MobileNetV2 (ImageNet weights; `scratch`: same architecture, random init), {data}, {size} px, "
             f"held-out accuracy, mean ± std over {seeds} seeds.", "",
             "| strategy | " + " | ".join(f"k={k}" for k in shots) + " | train time (k=" + str(shots[-1]) +
             ") | peak RSS |", "|---|" + "---|" * (len(shots) + 2)]
    return "\n".join(lines + table_rows(runs, ordered_strategies(runs), shots)) + "\n"


def table_rows(runs, strategies, shots) -> list[str]:
    """Per strategy: accuracy mean ± std at each k, then train time and peak RSS at the largest k."""
    rows = []
    for strategy in strategies:
        accuracy = [_cell(runs, strategy, k, "accuracy") for k in shots]
        seconds, memory = _cell(runs, strategy, shots[-1], "train_s"), _cell(runs, strategy, shots[-1],
                                                                              "peak_rss_mb")
        rows.append(f"| {strategy} | " + " | ".join(f"{m:.1%} ± {s:.1%}" for m, s in accuracy) +
                    f" | {seconds[0]:.1f} s | {memory[0]:.0f} MB |")
    return rows


def plot(runs, shots, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    present = ordered_strategies(runs)
    for i, strategy in enumerate(present):
        style = dict(color=plt.cm.tab20(i / max(len(present) - 1, 1)), marker="os^Dv<>p*hX"[i % 11])
        cells = [_cell(runs, strategy, k, "accuracy") for k in shots]
        left.errorbar(shots, [m for m, _ in cells], yerr=[s for _, s in cells], capsize=3, label=strategy, **style)
        memory = [_cell(runs, strategy, k, "peak_rss_mb")[0] for k in shots]
        right.scatter(memory, [m for m, _ in cells], label=strategy, **style)
    left.set(xscale="log", xlabel="training images per class", ylabel="held-out accuracy", title="accuracy vs shots")
    left.set_xticks(shots, [str(k) for k in shots])
    right.set(xlabel="peak RSS during training (MB)", ylabel="held-out accuracy", title="accuracy vs peak memory")
    left.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "study.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
