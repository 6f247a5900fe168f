"""A process racing for a bundle's training lock (test_sealed.py): a module of its own, so that each spawned racer
imports the lock alone, not the test module's onnx and toolchain."""

from __future__ import annotations

import os
import time
from pathlib import Path


def take_lock_and_report(path: str, barrier, results) -> None:
    from edgeadapt.runtime.errors import TrainingError
    from edgeadapt.runtime.lock import bundle_lock

    barrier.wait()
    try:
        with bundle_lock(Path(path)):
            started = time.monotonic()
            content = Path(path).read_text()
            time.sleep(0.3)
            results.put(("won", started, time.monotonic(), content == str(os.getpid())))
    except TrainingError:
        results.put(("refused", 0.0, 0.0, True))
