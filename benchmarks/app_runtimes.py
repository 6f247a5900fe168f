"""Step time and peak memory of the same bundles on the Python runtime and the JavaScript runtime's engines, side by
side in one run: onnxruntime (Python), onnxruntime-node, onnxruntime-web WebAssembly with 1 and 2 threads and WebGPU
in headless Chromium (SwiftShader's software adapter here: it proves the graphs run; its times are not a GPU's) —
and TensorFlow.js, the peer that trains in browsers, on the same work in the same browser: MobileNetV2 of the same
shapes built in tfjs-layers (random weights), its head-only and full step with Adam, on its WASM (1 and 2 threads)
and WebGPU backends. Fixed batches of real texture photos (random ones for TensorFlow.js); median ms per step after
the warm-up steps (`--warm-up`; 1 on the software WebGPU adapter). Memory: the Python or Node process's peak RSS;
for a browser, the peak PSS of Chromium's processes (one fresh browser per cell), sampled every 250 ms; and each
one's idle figure (libraries loaded, nothing run) as a baseline row. Linux.

    python benchmarks/app_runtimes.py --steps 6 --gpu-steps 2 --batches 8,32 --gpu-batches 8
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
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


ORT_CELLS = (("wasm", 1), ("wasm", 2), ("webgpu", 1))  # onnxruntime-web: execution provider, threads
TFJS_CELLS = (("wasm", 1), ("wasm", 2), ("webgpu", 1))  # TensorFlow.js: backend, threads
COLUMNS = ["Python onnxruntime", "onnxruntime-node", "ORT WASM 1t", "ORT WASM 2t", "ORT WebGPU (sw)", "TF.js WASM 1t",
           "TF.js WASM 2t", "TF.js WebGPU (sw)"]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def _chromium_pss_mb(root: int) -> float:
    """PSS of the Chromium processes below `root` (not the Node driver and the static server); PSS shares shared
    pages out, so processes add up."""
    tree, total, todo = _children(), 0, [root]
    while todo:
        pid = todo.pop()
        todo += tree.get(pid, [])
        try:
            if "chrom" not in Path(f"/proc/{pid}/comm").read_text():
                continue
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total += int(next(line.split()[1] for line in rollup.splitlines() if line.startswith("Pss:")))
    return total / 1024


def measured(command: list[str], **kwargs) -> tuple[str, float]:
    """(stdout, peak PSS in MB of the Chromium it starts) of a command, sampled every 250 ms while it runs."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    peak, done = [0.0], threading.Event()

    def sample() -> None:  # every 250 ms: reading PSS costs the kernel a page-table walk, which the cell would feel
        while not done.wait(0.25):
            peak[0] = max(peak[0], _chromium_pss_mb(process.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = process.communicate()
    done.set()
    sampler.join()
    if process.returncode:
        raise RuntimeError(f"{command[:3]} failed: {err[-2000:]}")
    return out, peak[0]


def own_peak_mb() -> float:
    """This process's peak RSS (VmHWM: per address space, so not the parent's, as getrusage's maxrss is after exec)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


def median_ms(times: list[float], warm_up: int) -> float:
    return statistics.median(times[warm_up:]) if times else float("nan")


def python_cell(bundle: Path, data: Path, steps: int, batch: int, warm_up: int) -> tuple[float, float]:
    script = ("import json, sys; sys.path.insert(0, sys.argv[1]); from app_runtimes import python_steps, own_peak_mb; "
              "times = python_steps(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))[1]; "
              "print(json.dumps({'times': times, 'peak_mb': own_peak_mb()}))")
    done = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), str(bundle), str(data), str(steps),
                           str(batch)], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    return median_ms(result["times"], warm_up), result["peak_mb"]


def node_cell(bundle: Path, data: Path, steps: int, batch: int, warm_up: int) -> tuple[float, float]:
    done = subprocess.run(["node", str(JS / "test" / "node-steps.mjs"), str(bundle), str(data), str(steps), str(batch)],
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    return median_ms(result["times"], warm_up), result["peak_mb"]


def browser_cell(mode_args: list[str], run: dict, warm_up: int) -> tuple[float | str, float]:
    """One run in a fresh headless Chromium (test/browser/run.mjs): ms per step or the refusal, and peak PSS."""
    out, peak = measured(["node", str(JS / "test" / "browser" / "run.mjs"), *mode_args, json.dumps([run])],
                         cwd=JS)
    result = json.loads(out.strip().splitlines()[-1])[0]
    return (median_ms(result["times"], warm_up) if "times" in result else result.get("error", "failed")), peak


def idle_row(root: Path) -> list[float]:
    """Each runtime's memory with its libraries loaded and nothing run: what the peaks include anyway."""
    python = json.loads(subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                                        "from edgeadapt.runtime.ort import onnxruntime_module; onnxruntime_module(); "
                                        "from app_runtimes import own_peak_mb; print(own_peak_mb())",
                                        str(Path(__file__).parent)], capture_output=True, text=True, check=True).stdout)
    node = json.loads(subprocess.run(["node", "--input-type=module", "-e", "await import('onnxruntime-node'); "
                                      "const s = (await import('node:fs')).readFileSync('/proc/self/status', 'utf8'); "
                                      "console.log(Number(/VmHWM:\\s+(\\d+)/.exec(s)[1]) / 1024);"], cwd=JS,
                                     capture_output=True, text=True, check=True).stdout)
    ort_page = browser_cell(["steps", str(root)], {"idle": True}, 0)[1]
    tfjs_page = browser_cell(["tfjs"], {"idle": True}, 0)[1]
    return [python, node, ort_page, ort_page, ort_page, tfjs_page, tfjs_page, tfjs_page]


def row(root: Path, name: str, backbone: str, preset: str, size: int, batch: int, steps: int,
        gpu_steps: int, gpu: bool, warm_up: int) -> list[tuple[float | str, float] | None]:
    bundle, data = root / name, root / "data.npz"
    cells = [python_cell(bundle, data, steps, batch, warm_up), node_cell(bundle, data, steps, batch, warm_up)]
    for ep, threads in ORT_CELLS:
        webgpu = ep == "webgpu"
        cells.append(None if webgpu and not gpu else browser_cell(["steps", str(root)], {
            "bundle": name, "data": "data.npz", "ep": [ep], "threads": threads,
            "steps": gpu_steps if webgpu else steps, "batch": batch}, 1 if webgpu else warm_up))
    for backend, threads in TFJS_CELLS:
        webgpu = backend == "webgpu"
        cells.append(None if backbone != "mobilenet_v2" or (webgpu and not gpu) else browser_cell(["tfjs"], {
            "backend": backend, "threads": threads, "preset": preset, "size": size, "classes": 4, "batch": batch,
            "steps": gpu_steps if webgpu else steps}, 1 if webgpu else warm_up))
    return cells


def shown_ms(cell) -> str:
    if cell is None:
        return "–"  # not run: no TF.js model of that backbone, or WebGPU at another batch
    return f"{cell[0]:.1f}" if isinstance(cell[0], float) else f"refused: {cell[0][:60]}"


def ratio(a, b) -> str:
    return f"{a[0] / b[0]:.2f}" if a and b and isinstance(a[0], float) and isinstance(b[0], float) else "–"


def print_tables(rows, idle: list[float]) -> None:
    print("Milliseconds per training step (median):\n")
    print("| bundle | batch | " + " | ".join(COLUMNS) + " | node / Python | ORT WASM 2t / node | ORT / TF.js WASM 2t |")
    print("|---|---|" + "---|" * (len(COLUMNS) + 3))
    for label, batch, cells in rows:
        print(f"| {label} | {batch} | " + " | ".join(shown_ms(c) for c in cells) + " | " +
              " | ".join([ratio(cells[1], cells[0]), ratio(cells[3], cells[1]), ratio(cells[3], cells[6])]) + " |")
    print("\nPeak memory, MB (Python and Node: the process's peak RSS; browsers: the peak PSS of Chromium's "
          "processes):\n")
    print("| bundle | batch | " + " | ".join(COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    print("| idle: libraries loaded, nothing run | – | " + " | ".join(f"{m:.0f}" for m in idle) + " |")
    for label, batch, cells in rows:
        print(f"| {label} | {batch} | " + " | ".join("–" if c is None else f"{c[1]:.0f}" for c in cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--gpu-steps", type=int, default=2, help="steps on the (software) WebGPU adapter")
    parser.add_argument("--warm-up", type=int, default=2, help="steps left out of the median (WebGPU: 1); a fresh "
                        "browser runs WebAssembly on its baseline compiler until V8 has tiered it up")
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--gpu-batches", default="8", help="batches WebGPU runs at (a software adapter is slow)")
    parser.add_argument("--backbones", default="tiny_cnn,mobilenet_v2")
    args = parser.parse_args()
    from edgeadapt.toolchain.build import HeadRequest
    from edgeadapt.toolchain.export import ExportOptions, export_bundle

    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        texture_npz(root / "data.npz", max(batches))
        shutil.rmtree(root / "textures", ignore_errors=True)
        idle = idle_row(root)
        for backbone, preset, size in [c for c in CASES if c[0] in args.backbones.split(",")]:
            name = f"{backbone}-{preset}"
            export_bundle(ExportOptions(out=root / name, backbone=backbone, trainable=preset, input_size=(size,),
                                        head=HeadRequest(num_classes=4), validate=False,
                                        weights="imagenet" if backbone == "mobilenet_v2" else None))
            for batch in batches:
                cells = row(root, name, backbone, preset, size, batch, args.steps, args.gpu_steps,
                            str(batch) in args.gpu_batches.split(","), args.warm_up)
                rows.append((f"{backbone} {preset} {size}px", batch, cells))
                print(rows[-1], file=sys.stderr, flush=True)
    print_tables(rows, idle)


if __name__ == "__main__":
    main()
