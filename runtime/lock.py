"""One trainer per bundle: an exclusive lock file holding the owner's pid; a lock whose process is gone is stale."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from edgeadapt.runtime.errors import TrainingError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def bundle_lock(lock: Path) -> Iterator[None]:
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            pid = _owner(lock)
            if pid is not None and pid != os.getpid() and _alive(pid):
                raise TrainingError(f"{lock.parent} is being trained by process {pid}; wait for it to finish or "
                                    "stop it, then retry.") from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
        except OSError as exc:
            raise TrainingError(f"cannot lock {lock.parent} for training ({exc.strerror}); make the bundle "
                                "writable.") from None
    else:
        raise TrainingError(f"cannot take the training lock {lock}; remove it if no training runs.")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)
