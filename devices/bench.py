"""`edgeadapt bench`: per bundle and batch size, a fresh process limited to the profile's threads measures the
training step (p50/p95, samples/s), peak and post-import RSS, and batch-1 inference per backend; the planner's
prediction and the artifact sizes sit beside them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgeadapt.devices.planner import planned_peak
from edgeadapt.devices.profiles import DeviceProfile
from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.engines import resolve_engine
from edgeadapt.runtime.errors import EdgeAdaptError

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class BenchCase:
    bundle: str
    backbone: str
    preset: str
    batch_size: int
    input_size: list[int]
    threads: int
    step_ms_p50: float
    step_ms_p95: float
    samples_per_s: float
    peak_rss_mb: float
    import_rss_mb: float
    import_s: float
    predicted_peak_mb: float
    artifact_mb: float
    fits_budget: bool
    inference_ms: dict[str, float] = field(default_factory=dict)


def run_case(bundle: Path, batch: int, threads: int, steps: int, warmup: int, split: bool = False,
             engine: str = "auto", device: str = "cpu", inference: bool = True, accumulate: int = 1) -> dict:
    env = {**os.environ, **{name: str(threads) for name in THREAD_VARIABLES}}
    # `-m` puts the working folder first on sys.path: run from a neutral one, so that an installed edgeadapt is
    # not shadowed by a source checkout's `edgeadapt/` folder the user happens to stand in
    command = [sys.executable, "-m", "edgeadapt.devices.bench_case", str(Path(bundle).resolve()), str(batch),
               str(threads),
               str(steps), str(warmup), "--engine", engine, "--device", device] + (["--split"] if split else []) + \
        ([] if inference else ["--no-inference"]) + ["--accumulate", str(accumulate)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600, cwd=tempfile.gettempdir())
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["killed"])[-1]
        raise EdgeAdaptError(f"benchmark of {bundle} at batch {batch} failed ({last[:160]}); "
                             "try a smaller --batch-sizes.")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench(bundles: list[Path], batch_sizes: list[int], profile: DeviceProfile, steps: int = 5,
          warmup: int = 2, split: bool = False, engine: str = "auto", device: str = "cpu") -> list[BenchCase]:
    """`split`: for split bundles, time edgeadapt's split path (prefix inference + suffix step) and plan it."""
    cases = []
    for path in bundles:
        bundle = Bundle.open(path)
        m = bundle.manifest
        artifact_mb = sum(f.stat().st_size for f in bundle.path.iterdir() if f.is_file()) / 2**20
        is_split = split and m.split is not None
        for batch in batch_sizes:
            raw = run_case(bundle.path, batch, profile.threads, steps, warmup, is_split, engine, device)
            predicted = planned_peak(m, batch, is_split, engine=resolve_engine(engine, device))
            p50 = float(np.median(raw["step_ms"]))
            cases.append(BenchCase(
                str(path), m.backbone, m.preset + (" (split)" if is_split else ""), batch, m.input.shape[1:],
                profile.threads, p50,
                float(np.percentile(raw["step_ms"], 95)), batch * 1000 / p50, raw["peak_rss_mb"], raw["import_rss_mb"],
                raw["import_s"], predicted, artifact_mb, predicted <= profile.memory_budget_mb,
                raw.get("inference_ms", {})))
    return cases


def cases_json(cases: list[BenchCase], profile: DeviceProfile) -> str:
    return json.dumps({"profile": asdict(profile), "cases": [asdict(c) for c in cases]}, indent=2)


def plot(cases: list[BenchCase], path: Path) -> Path:
    """Latency and memory bars as a PNG at `path` (a folder: bench.png in it; no suffix: .png added); returns
    where it went."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{c.preset}\nb{c.batch_size}" for c in cases]
    x = np.arange(len(cases))
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(8, len(cases) * 1.3), 4.5))
    left.bar(x, [c.step_ms_p50 for c in cases], color="#4477aa")
    left.errorbar(x, [c.step_ms_p50 for c in cases],
                  yerr=[[0] * len(cases), [c.step_ms_p95 - c.step_ms_p50 for c in cases]], fmt="none", color="k")
    left.set(title="training step (p50, whisker to p95)", ylabel="ms", xticks=x, xticklabels=labels)
    right.bar(x - 0.2, [c.peak_rss_mb for c in cases], 0.4, label="measured peak RSS", color="#228833")
    right.bar(x + 0.2, [c.predicted_peak_mb for c in cases], 0.4, label="planner", color="#ccbb44")
    right.set(title="training memory", ylabel="MB", xticks=x, xticklabels=labels)
    right.legend()
    fig.suptitle(f"{cases[0].backbone}, {'x'.join(map(str, cases[0].input_size))}, {cases[0].threads} threads")
    fig.tight_layout()
    path = Path(path) / "bench.png" if Path(path).is_dir() else Path(path)
    path = path if path.suffix else path.with_suffix(".png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.resolve()
