"""One trainer per bundle: a lock file holding the owner's pid, created with its content in one step (a complete temp
file hard-linked into place), so no other process ever sees it empty. A lock whose process is gone is stale and
taken over; one that holds no valid pid was not written by edgeadapt and is refused in one line."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator

from edgeadapt.runtime.atomic import pid_alive
from edgeadapt.runtime.errors import TrainingError

MAX_PID = 1 << 22  # Linux's pid_max ceiling; other systems stay below it


def owner(lock: Path) -> int | None:
    """The pid a lock holds; None when the lock is gone; TrainingError when it holds anything but a valid pid."""
    if lock.is_symlink():
        raise TrainingError(f"the training lock {lock} is a link, which edgeadapt never writes; delete it if no "
                            "training runs, then retry.")
    try:
        text = lock.read_text(encoding="ascii", errors="replace")[:64].strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TrainingError(f"cannot read the training lock {lock} ({exc.strerror}); make the bundle readable.") \
            from None
    if not (text.isdigit() and 0 < int(text) < MAX_PID):
        raise TrainingError(f"the training lock {lock} holds {text[:24]!r}, not a process id; it was not written by "
                            "edgeadapt: delete it if no training runs, then retry.")
    return int(text)


def _create(lock: Path) -> bool:
    """Create `lock` holding this pid, whole, or return False if it exists."""
    tmp = lock.with_name(f".{lock.name}.pid-{os.getpid()}")  # not a ".tmp-" name: trainers sweep those
    try:
        tmp.unlink(missing_ok=True)  # a link planted under this name is removed, never written through
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        try:
            os.link(tmp, lock)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            return _create_exclusive(lock)  # a file system without hard links (FAT, some phones' storage)
        return True
    except OSError as exc:
        raise TrainingError(f"cannot lock {lock.parent} for training ({exc.strerror}); make the bundle "
                            "writable.") from None
    finally:
        tmp.unlink(missing_ok=True)


def _create_exclusive(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(str(os.getpid()))
    return True


def check_unlocked(lock: Path) -> None:
    """Refuse if a live process holds `lock` (e.g. before replacing the bundle it guards)."""
    pid = owner(lock)
    if pid is not None and pid != os.getpid() and pid_alive(pid):
        raise TrainingError(f"{lock.parent} is being trained by process {pid}; wait for it to finish or stop it, "
                            "then retry.")


@contextlib.contextmanager
def bundle_lock(lock: Path) -> Iterator[None]:
    for _ in range(2):
        if _create(lock):
            break
        check_unlocked(lock)
        lock.unlink(missing_ok=True)  # stale: its process is gone
    else:
        raise TrainingError(f"cannot take the training lock {lock}; remove it if no training runs.")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
