"""Device commands: `devices` (profiles and what this machine offers) and `bench`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from edgeadapt.runtime.engines import ENGINES


def available_here() -> dict[str, list[str]]:
    """Training engines this machine really has, with their devices (`--engine`, `--device`)."""
    from edgeadapt.runtime.engines import available

    return available()


def devices():
    """List device profiles, and show what this machine really offers."""
    from rich.table import Table

    from edgeadapt.devices.profiles import load_profiles
    from edgeadapt.runtime.cli import console

    table = Table("profile", "cores/threads", "train budget", "training", "inference", "notes")
    for p in load_profiles().values():
        table.add_row(p.name, f"{p.cores}/{p.threads}", f"{p.memory_budget_mb:,} MB", p.training_backend,
                      ", ".join(p.inference_backends), p.notes)
    out = console()
    out.print(table)
    engines = Table("engine (--engine)", "devices here (--device)", title="this machine")
    here = available_here()
    for name in ("onnxruntime", "openvino", "ort-training"):
        engines.add_row(name, ", ".join(here[name]) if name in here else _missing(name))
    out.print(engines)


def _missing(engine: str) -> str:
    return {"onnxruntime": "not installed", "openvino": "not installed (pip install openvino)",
            "ort-training": "not installed (pip install 'edgeadapt[ort-training]'; x86_64, Python <= 3.11)"}[engine]


def bench_command(
    bundles: List[Path] = typer.Argument(..., help="Bundles to measure."),
    profile: str = typer.Option("host", "--profile", help="Device profile (threads, memory budget)."),
    batch_sizes: str = typer.Option("8,32", "--batch-sizes"),
    steps: int = typer.Option(5, "--steps"),
    warmup: int = typer.Option(2, "--warmup"),
    split: bool = typer.Option(False, "--split", help="Split bundles: time prefix inference + suffix training."),
    engine: str = typer.Option("auto", "--engine", help=" | ".join(ENGINES) + "."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, gpu, npu, … (see `edgeadapt devices`)."),
    as_json: bool = typer.Option(False, "--json"),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Write latency and memory plots (PNG)."),
):
    """Training-step latency, peak memory (measured and predicted) and inference latency per backend."""
    from edgeadapt.devices.bench import bench, cases_json, plot
    from edgeadapt.devices.profiles import get_profile
    from edgeadapt.runtime.errors import ConfigError

    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--batch-sizes must be whole numbers separated by commas, got '{batch_sizes}'.") from None
    chosen = get_profile(profile)
    cases = bench(bundles, sizes, chosen, steps, warmup, split, engine, device)
    if plot_path:
        written = plot(cases, plot_path)
        typer.echo(f"plots written to {written}", err=as_json)
    if as_json:
        typer.echo(cases_json(cases, chosen))
        return
    _print_table(cases, chosen)


def _print_table(cases, profile) -> None:
    from rich.table import Table

    from edgeadapt.runtime.cli import console

    table = Table("preset", "batch", "step p50/p95 ms", "samples/s", "peak RSS MB", "planner MB", "import",
                  "artifacts MB", "inference b1 ms", title=f"profile {profile.name} ({profile.threads} threads, "
                                                           f"budget {profile.memory_budget_mb:,} MB)")
    for c in cases:
        table.add_row(c.preset, str(c.batch_size), f"{c.step_ms_p50:.0f}/{c.step_ms_p95:.0f}", f"{c.samples_per_s:.1f}",
                      f"{c.peak_rss_mb:.0f}", f"{c.predicted_peak_mb:.0f}" + ("" if c.fits_budget else " (over)"),
                      f"{c.import_s:.2f}s/{c.import_rss_mb:.0f}MB", f"{c.artifact_mb:.1f}",
                      ", ".join(f"{k} {v:.1f}" for k, v in c.inference_ms.items()))
    console().print(table)


def register(app: typer.Typer) -> None:
    app.command()(devices)
    app.command("bench")(bench_command)
