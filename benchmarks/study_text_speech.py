"""Text and speech: head vs last:K vs bias vs LoRA vs full fine-tuning, through the real export → runtime path and
the same protocol as the image study (benchmarks/study.py): k training samples per class, several seeds, a fixed
held-out set, each run in a fresh process with torch blocked (peak RSS from VmHWM).

- text: all-MiniLM-L6-v2 (`minilm_l6`) on WordNet noun glosses of 8 categories (Debian's wordnet-base);
- speech: Whisper-tiny's encoder (`whisper_tiny_encoder`) on 10 keywords (Speech Commands' words) synthesised by
  espeak-ng, each at a random offset in white noise of 0-15 dB SNR, trained on 18 voices and held out on 12 others
  (no voice in both).

    python benchmarks/study_text_speech.py --task text --out docs/study/text
    python benchmarks/study_text_speech.py --task speech --out docs/study/speech --shots 16,48
    python benchmarks/study_text_speech.py --task text --quick        # tiny random model: checks the pipeline
    python benchmarks/study_text_speech.py --task text --strategies lora:8/lr=3e-3 --out docs/study/text-lr
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import _cell, epochs_for, parse_strategy, split_strategies, table_rows  # noqa: E402

STRATEGIES = ("head", "last:1", "last:2", "bias", "lora:4", "lora:8", "full")
RUN = """
import json, sys, time
sys.modules['torch'] = None
from edgeadapt.devices.bench_case import peak_rss_mb
from edgeadapt.runtime.inference import evaluate
from edgeadapt.runtime.trainer import Trainer, TrainConfig
bundle, train, test, epochs, batch, seed = sys.argv[1:7]
started = time.perf_counter()
Trainer(bundle, TrainConfig(epochs=int(epochs), batch_size=int(batch), seed=int(seed), val_split=0.0)).fit(train)
seconds = time.perf_counter() - started
print(json.dumps({"accuracy": evaluate(bundle, test).accuracy, "train_s": seconds, "peak_rss_mb": peak_rss_mb()}))
"""
TASKS = {"text": ("minilm_l6", "tiny_bert", (40,)), "speech": ("whisper_tiny_encoder", "tiny_whisper", None)}


def text_sets(root: Path, shots: list[int], seeds: list[int], held_out: int) -> tuple[Path, dict, list[str]]:
    """CSV files: a fixed held-out set per class, then nested k-shot training sets per seed from the rest."""
    from datasets import wordnet_glosses, write_text_csv

    glosses = wordnet_glosses()
    classes = sorted(glosses)
    test, rest = [], {}
    for name in classes:
        order = np.random.default_rng(1234).permutation(len(glosses[name]))
        test += [(glosses[name][i], name) for i in order[:held_out]]
        rest[name] = [glosses[name][i] for i in order[held_out:]]
    sets = {}
    for seed in seeds:
        for k in shots:
            rows = []
            for name in classes:
                picked = np.random.default_rng(seed).permutation(len(rest[name]))[:k]
                rows += [(rest[name][i], name) for i in picked]
            sets[(k, seed)] = write_text_csv(root / f"train-{k}-{seed}.csv", rows)
    return write_text_csv(root / "test.csv", test), sets, classes


def speech_sets(root: Path, shots: list[int], seeds: list[int], held_out: int) -> tuple[Path, dict, list[str]]:
    """Folders of .wav: held-out voices only in the test set, training voices only in the k-shot sets."""
    from datasets import HELD_OUT_VOICES, KEYWORDS, TRAIN_VOICES, spoken_keywords

    test = spoken_keywords(root / "test", HELD_OUT_VOICES, held_out, seed=1234)
    sets = {(k, seed): spoken_keywords(root / f"train-{k}-{seed}", TRAIN_VOICES, k, seed)
            for seed in seeds for k in shots}
    return test, sets, sorted(KEYWORDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=tuple(TASKS), required=True)
    parser.add_argument("--quick", action="store_true", help="the tiny random model, 1 seed, k=8")
    parser.add_argument("--shots", default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--held-out", type=int, default=50, help="held-out samples per class")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    shots = [int(k) for k in (args.shots or ("8" if args.quick else "16,64")).split(",")]
    seeds = list(range(1 if args.quick else args.seeds))
    backbone, tiny, input_size = TASKS[args.task]
    out = args.out or Path("study") / args.task
    out.mkdir(parents=True, exist_ok=True)
    runs = run_all(args.task, tiny if args.quick else backbone, input_size, shots, seeds,
                   10 if args.quick else args.held_out, split_strategies(args.strategies), out / "runs.partial.json")
    (out / "runs.json").write_text(json.dumps(runs, indent=1))
    table = report(runs, shots, args.task, tiny if args.quick else backbone, STRATEGIES)
    (out / "results.md").write_text(table)
    plot(runs, shots, out, args.task)
    print(table)


def run_all(task: str, backbone: str, input_size, shots, seeds, held_out: int, strategies, partial: Path) -> list:
    from edgeadapt.toolchain.build import HeadRequest
    from edgeadapt.toolchain.export import ExportOptions, export_bundle

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        test, sets, classes = (text_sets if task == "text" else speech_sets)(root / "data", shots, seeds, held_out)
        for strategy in strategies:
            preset, options = parse_strategy(strategy)  # `lora:8/lr=3e-3`: export options (benchmarks/study.py)
            template = root / "".join(c if c.isalnum() else "_" for c in strategy)
            export_bundle(ExportOptions(out=template, backbone=backbone, trainable=preset,
                                        head=HeadRequest(labels=tuple(classes)), input_size=input_size,
                                        validate=False, **options))
            for (k, seed), train in sorted(sets.items()):
                work = root / "work"
                shutil.rmtree(work, ignore_errors=True)
                shutil.copytree(template, work)
                count = k * len(classes)
                batch = min(32, count)
                epochs = epochs_for(count, batch)
                done = subprocess.run([sys.executable, "-c", RUN, str(work), str(train), str(test), str(epochs),
                                       str(batch), str(seed)], capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{strategy} k={k} seed={seed} failed:\n{done.stderr[-2000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                runs.append({"strategy": strategy, "shots": k, "seed": seed, "epochs": epochs, **result})
                partial.write_text(json.dumps(runs, indent=1))
                print(f"{strategy:8} k={k:3} seed={seed}: {result['accuracy']:.3f} in {result['train_s']:.1f} s, "
                      f"{result['peak_rss_mb']:.0f} MB", file=sys.stderr)
    return runs


def report(runs, shots, task: str, backbone: str, order) -> str:
    seeds = len({r["seed"] for r in runs})
    data = "WordNet noun glosses, 8 categories" if task == "text" else \
        "10 espeak-ng keywords in noise (0-15 dB SNR), held-out voices disjoint from the training voices"
    seen = list(dict.fromkeys(r["strategy"] for r in runs))
    present = [s for s in order if s in seen] + [s for s in seen if s not in order]
    lines = [f"{backbone}, {data}; held-out accuracy, mean ± std over {seeds} seeds; train time and peak RSS of the "
             f"training process at the largest k.", "",
             "| strategy | " + " | ".join(f"k={k}" for k in shots) + " | train time | peak RSS |",
             "|---|" + "---|" * (len(shots) + 2)]
    return "\n".join(lines + table_rows(runs, present, shots)) + "\n"


def plot(runs, shots, out: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    present = list(dict.fromkeys(r["strategy"] for r in runs))
    for i, strategy in enumerate(present):
        style = dict(color=plt.cm.tab10(i % 10), marker="os^Dv<>p*hX"[i % 11])
        cells = [_cell(runs, strategy, k, "accuracy") for k in shots]
        left.errorbar(shots, [m for m, _ in cells], yerr=[s for _, s in cells], capsize=3, label=strategy, **style)
        right.scatter([_cell(runs, strategy, k, "peak_rss_mb")[0] for k in shots], [m for m, _ in cells],
                      label=strategy, **style)
    left.set(xscale="log", xlabel="training samples per class", ylabel="held-out accuracy",
             title=f"{task}: accuracy vs shots")
    left.set_xticks(shots, [str(k) for k in shots])
    left.minorticks_off()
    right.set(xlabel="peak RSS during training (MB)", ylabel="held-out accuracy", title="accuracy vs peak memory")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "study.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
