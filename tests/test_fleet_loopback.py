"""Real Flower processes on 127.0.0.1: `edgeadapt fleet server` (SuperLink + ServerApp) and three `edgeadapt fleet
client` (SuperNode + ClientApp). A client killed mid-round does not stop the round; restarted, it joins the next.
A client with another bundle is refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the fleet extra: pip install 'edgeadapt[fleet]'")

from edgeadapt.fleet.deployment import free_port  # noqa: E402
from edgeadapt.fleet.local import trainable_arrays  # noqa: E402
from edgeadapt.runtime.bundle import Bundle  # noqa: E402
from edgeadapt.runtime.inference import evaluate  # noqa: E402

pytestmark = pytest.mark.slow
FLOWER = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-serverapp", "flwr-clientapp",
          "edgeadapt.fleet.owned")


def flower_processes() -> set[int]:
    """Flower's processes (and edgeadapt's watchdogs over them) running now, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and any(name in command for name in FLOWER) and int(entry.name) != os.getpid():
            found.add(int(entry.name))
    return found


@pytest.fixture(autouse=True)
def nothing_left_running():
    """Every Flower process a test started is gone within 30 s of its end."""
    before = flower_processes()
    yield
    deadline = time.monotonic() + 30
    while (left := flower_processes() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left running: {left}"


def _start(*args, **kwargs) -> subprocess.Popen:
    """A process in its own session: killing the session kills the whole device (SuperNode, ClientApp)."""
    return subprocess.Popen([sys.executable, "-m", "edgeadapt", "fleet", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.communicate()


def _wait_for(predicate, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def shares(digits, tmp_path) -> list[Path]:
    data = np.load(digits["train"])
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"share{i}.npz")
        np.savez(paths[-1], x=data["x"][i * 400:(i + 1) * 400], y=data["y"][i * 400:(i + 1) * 400])
    return paths


def test_three_clients_two_rounds_with_a_client_killed_mid_round(bundle_factory, digits, shares, tmp_path):
    source = bundle_factory("tiny_mlp", "full")
    server_bundle = shutil.copytree(source, tmp_path / "server")
    devices = [shutil.copytree(source, tmp_path / f"device{i}") for i in range(3)]
    port = free_port()
    server = _start("server", server_bundle, "--rounds", 2, "--min-clients", 3, "--local-epochs", 100,
                    "--personalize-epochs", 0, "--data", digits["test"], "--port", port, "--json")
    clients = [_start("client", devices[i], shares[i], "--server", f"127.0.0.1:{port}") for i in range(3)]
    try:
        lock = devices[0] / "train.lock"
        _wait_for(lock.exists, 150)  # device 0 took the round-1 model and is training on it
        _kill(clients[0])
        clients[0] = _start("client", devices[0], shares[0], "--server", f"127.0.0.1:{port}")
        out, err = server.communicate(timeout=240)
    finally:
        for process in (*clients, server):
            _kill(process)
    assert server.returncode == 0, err[-3000:]
    first, second = json.loads(out)["rounds"]
    update = sum(p.size * 4 for p in Bundle.open(source).manifest.portable.layout)
    replies = lambda r: round(r["bytes_up"] / update)  # noqa: E731  (Flower adds a few % of framing)
    assert replies(first) == 2  # the killed device's update never came; the round finished without it
    assert replies(second) == 3 and second["clients"] == 3  # restarted, it took part in round 2
    # the server bundle holds the global model after the last round: `evaluate` agrees with the report
    metrics = evaluate(server_bundle, digits["test"])
    assert abs(metrics.accuracy - second["global_accuracy"]) < 1e-9
    assert not np.array_equal(np.concatenate([a.ravel() for a in trainable_arrays(Bundle.open(server_bundle))
                                              .values()]),
                              np.concatenate([a.ravel() for a in trainable_arrays(Bundle.open(source)).values()]))


def test_client_with_another_bundle_is_refused_in_one_line(bundle_factory, shares, tmp_path):
    server_bundle = shutil.copytree(bundle_factory("tiny_mlp", "full"), tmp_path / "server")
    foreign = shutil.copytree(bundle_factory("tiny_mlp", "head"), tmp_path / "foreign")
    port = free_port()
    server = _start("server", server_bundle, "--rounds", 1, "--min-clients", 1, "--port", port)
    try:
        client = _start("client", foreign, shares[0], "--server", f"127.0.0.1:{port}")
        _, err = client.communicate(timeout=120)
    finally:
        _kill(server)
    assert client.returncode == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: this client's bundle") and "server's bundle" in last
    assert "Traceback" not in err


def test_a_server_killed_by_sigkill_takes_its_flower_processes_with_it(bundle_factory, digits, tmp_path):
    bundle = tmp_path / "server"
    shutil.copytree(bundle_factory("tiny_mlp", "head"), bundle)
    before = flower_processes()
    server = _start("server", bundle, "--rounds", "5", "--min-clients", "2", "--port", free_port())
    _wait_for(lambda: len(flower_processes() - before) >= 3, 60)  # watchdog, SuperLink, its SuperExec
    os.kill(server.pid, signal.SIGKILL)  # the server alone: nothing else is signalled
    server.communicate()
    _wait_for(lambda: not flower_processes() - before, 30)
