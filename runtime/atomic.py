"""Crash-safe file operations: write to a temp file in the same folder, fsync, rename, fsync the folder."""

from __future__ import annotations

import contextlib
import os
import shutil
from glob import escape as glob_escape
from pathlib import Path
from typing import Callable, Iterator

from edgeadapt.runtime.errors import EdgeAdaptError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Let `write(tmp)` produce the file, then move it over `path` in one step; on any failure `path` is untouched."""
    path = Path(path)
    tmp = _temp_name(path)
    tmp.unlink(missing_ok=True)  # a link planted under this name is removed, never written through
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        raise EdgeAdaptError(f"cannot write {path} ({exc.strerror or exc}); the previous file is intact: free space "
                             "or fix permissions and retry.") from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_copy(src: Path, dst: Path) -> None:
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def check_output_dir(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise EdgeAdaptError(f"{out} exists and is not empty; choose another --out or pass --force to replace it.")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (a process we may not signal exists too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale_siblings(out: Path) -> None:
    """Delete `.OUT.staging-PID` / `.OUT.old-PID` folders left by a process that was killed (its PID is gone)."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return
    for kind in ("staging", "old"):
        for leftover in out.parent.glob(f".{glob_escape(out.name)}.{kind}-*"):
            pid = leftover.name.rpartition("-")[2]
            if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() and not leftover.is_symlink() \
                    else leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield an empty sibling folder to fill; on success it replaces `out` in one rename, on failure it vanishes
    (and a killed run's leftovers are swept by the next one)."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out)
    staging = out.with_name(f".{out.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        for file in staging.rglob("*"):
            if file.is_file():
                fsync_file(file)
        _swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(staging: Path, out: Path) -> None:
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.rename(out, old)
    os.rename(staging, out)
    fsync_dir(out.parent)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()
