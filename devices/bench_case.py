"""One benchmark case, run in a fresh process (`python -m edgeadapt.devices.bench_case BUNDLE BATCH THREADS ...`):
import cost, training-step latency and peak RSS, then batch-1 inference latency per available backend. Prints one
JSON line. The bundle is not modified (nothing is saved)."""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    return _status_mb("VmRSS") or float("nan")


def peak_rss_mb() -> float:
    """Peak RSS of this address space. Not ru_maxrss: Linux carries that across execve, so a process started by a
    large parent would report the parent's size as its own peak."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batch(bundle, batch: int, seed: int = 0):
    """Example inputs of the bundle's kind (token ids of real sentences for text) and random labels."""
    from edgeadapt.runtime.metrics import dummy_targets

    manifest = bundle.manifest
    rng = np.random.default_rng(seed)
    x = bundle.examples(batch, seed)
    y = dummy_targets(manifest, batch)
    if manifest.loss == "cross_entropy":
        y = rng.integers(0, manifest.num_outputs, batch).astype(np.int64)
    return x, y


def time_training(bundle, batch: int, threads: int, steps: int, warmup: int, engine: str = "auto",
                  device: str = "cpu", split: bool = False, accumulate: int = 1) -> list[float]:
    """Step times of the engine `train` would open (same factory, same session options). A split bundle's path in
    an uncached epoch is prefix inference, then a suffix step. `accumulate` > 1: each time is one update of that
    many micro-batches of `batch` (`train --accumulate`)."""
    from edgeadapt.runtime.engines import open_engine
    from edgeadapt.runtime.prefix import PrefixRunner
    from edgeadapt.runtime.training_target import PREFIX_BATCH

    opened = open_engine(bundle, bundle.graphs(split, accumulating=accumulate > 1), engine, device, threads)
    state = bundle.load_state()
    opened.load(state)
    runner = PrefixRunner(bundle.read_graph(bundle.manifest.split.prefix_model), threads=threads,
                          statistics=state.statistics) if split else None
    x, y = _batch(bundle, batch)
    chunk = min(PREFIX_BATCH, batch)  # as the trainer extracts features
    times = []
    for i in range(warmup + steps):
        started = time.perf_counter()
        for k in range(accumulate):
            inputs = np.concatenate([runner(x[j:j + chunk]) for j in range(0, len(x), chunk)]) if runner else x
            if k + 1 < accumulate:
                opened.accumulate(inputs, y, 1 / accumulate)
            else:
                opened.train_step(inputs, y, 1e-4, 1 / accumulate)
        if i >= warmup:
            times.append((time.perf_counter() - started) * 1000)
    return times


def _latency(run, x, repeats: int = 20) -> float:
    run(x)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - started) * 1000)
    return float(np.median(times))


def inference_latencies(bundle, threads: int) -> dict[str, float]:
    """Batch-1 latency (ms, median) of the deployed model on every backend present here."""
    from edgeadapt.runtime.deploy import export_onnx, inference_prefix

    x, _ = _batch(bundle, 1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model.onnx"
        export_onnx(bundle, model)
        results.update(_latencies(model, x, threads))
        if bundle.manifest.split is not None:  # where the frozen prefix could run
            prefix = Path(tmp) / "prefix.onnx"
            prefix.write_bytes(inference_prefix(bundle))
            results.update({f"prefix {k}": v for k, v in _latencies(prefix, x, threads).items()})
    return results


def _latencies(model: Path, x, threads: int) -> dict[str, float]:
    from edgeadapt.runtime.ort import onnxruntime_module

    ort = onnxruntime_module()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return {"onnxruntime-cpu": _latency(lambda a: session.run(None, {"input": a}), x),
            **_openvino_latencies(model, x, threads)}


def _openvino_latencies(model: Path, x, threads: int) -> dict[str, float]:
    from edgeadapt.runtime.errors import BackendError
    from edgeadapt.runtime.ov import openvino_module

    try:
        openvino = openvino_module()
    except BackendError:
        return {}
    core = openvino.Core()
    results = {}
    for device in ("CPU", "GPU", "NPU"):
        if device in core.available_devices:
            config = {"INFERENCE_NUM_THREADS": threads} if device == "CPU" else {}
            compiled = core.compile_model(str(model), device, config)
            results[f"openvino-{device.lower()}"] = _latency(lambda a: compiled(a), x)
    return results


def _option(argv: list[str], name: str, default: str) -> str:
    return argv[argv.index(name) + 1] if name in argv else default


def main(argv: list[str]) -> None:  # imports inside the functions: the import cost is what is measured
    """BUNDLE BATCH THREADS STEPS WARMUP [--split] [--no-inference] [--engine E] [--device D] [--accumulate N]"""
    bundle_path, batch, threads, steps, warmup = argv[0], *map(int, argv[1:5])
    engine, device = _option(argv, "--engine", "auto"), _option(argv, "--device", "cpu")
    started = time.perf_counter()
    from edgeadapt.runtime.bundle import Bundle
    from edgeadapt.runtime.engines import resolve_engine
    from edgeadapt.runtime.ort import onnxruntime_module, training_api

    onnxruntime_module() if resolve_engine(engine, device) != "ort-training" else training_api()
    import_s, import_rss = time.perf_counter() - started, rss_mb()
    bundle = Bundle.open(bundle_path)
    split = "--split" in argv and bundle.manifest.split is not None
    times = time_training(bundle, batch, threads, steps, warmup, engine, device, split,
                          int(_option(argv, "--accumulate", "1")))
    peak = peak_rss_mb()
    result = {"step_ms": times, "import_s": import_s, "import_rss_mb": import_rss, "peak_rss_mb": peak}
    if "--no-inference" not in argv:
        result["inference_ms"] = inference_latencies(bundle, threads)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
