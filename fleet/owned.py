"""Child processes that die with their owner. `spawn(command)` starts `python -m edgeadapt.fleet.owned OWNER --
COMMAND…`, a watchdog that runs COMMAND and, when the owner dies (even by SIGKILL: Linux delivers the watchdog a
parent-death signal; elsewhere it notices within a poll), when it is told to stop (SIGTERM, SIGINT) or when COMMAND
exits, stops COMMAND and every process it started: its own process group and, on Linux, every descendant (it is
their child subreaper, so processes that left the group are still found). SIGTERM first, SIGKILL after a grace."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time

GRACE_SECONDS = 10.0
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36


def spawn(command: list[str], **popen) -> subprocess.Popen:
    """Start `command` under a watchdog tied to this process; the Popen is the watchdog's (a process-group
    leader: `os.killpg(p.pid, SIGTERM)` stops it all)."""
    watchdog = [sys.executable, "-m", "edgeadapt.fleet.owned", str(os.getpid()), "--", *command]
    return subprocess.Popen(watchdog, start_new_session=True, **popen)


def _prctl(option: int, value: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # without prctl the watchdog polls its parent instead


def _processes() -> dict[int, tuple[int, int]]:
    """pid → (parent pid, process group) of every process (Linux /proc; elsewhere empty)."""
    table: dict[int, tuple[int, int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
            table[int(entry)] = (int(fields[1]), int(fields[2]))
        except (OSError, ValueError, IndexError):
            continue
    return table


def _owned() -> set[int]:
    """Every other process in this watchdog's group or below it."""
    me, table = os.getpid(), _processes()
    found = {pid for pid, (_, group) in table.items() if group == os.getpgrp()}
    frontier = [me]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _) in table.items() if ppid == parent and pid not in found]
        found.update(children)
        frontier += children
    return found - {me}


def _signal_all(sig: int) -> int:
    """Send `sig` to every owned process (never this watchdog); how many there were."""
    targets = _owned()
    if not targets and sig == signal.SIGTERM and not sys.platform.startswith("linux"):
        try:
            os.killpg(os.getpgrp(), sig)  # no /proc: the group (this watchdog ignores SIGTERM by now)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in targets:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    _reap()
    return len(targets)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _stop_everything() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's SIGTERM is for the others
    deadline = time.monotonic() + GRACE_SECONDS
    left = _signal_all(signal.SIGTERM)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        _reap()
        left = len(_owned())
    if left:
        _signal_all(signal.SIGKILL)
        time.sleep(0.1)
        _reap()


def watch(owner: int, command: list[str]) -> int:
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    stop = {"now": os.getppid() != owner}  # the owner may have died before the parent-death signal was set
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.update(now=True))
    child = subprocess.Popen(command)
    code = 0
    while not stop["now"]:
        code = child.poll()
        if code is not None or os.getppid() != owner:
            break
        time.sleep(0.2)
    _stop_everything()
    return child.returncode if child.returncode is not None else (code or 0)


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--" or not argv[1].isdigit():
        print("usage: python -m edgeadapt.fleet.owned OWNER_PID -- COMMAND [ARG…]", file=sys.stderr)
        return 2
    return watch(int(argv[1]), argv[3:])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
