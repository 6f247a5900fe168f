"""`edgeadapt fleet simulate`: a fleet of N clients on this machine under Flower's simulation engine. DATA is split
into a global held-out part and N clients' shares (Dirichlet label skew); every client gets its own copy of the
bundle (graphs hard-linked, its own state and feature cache) and keeps a held-out part of its share. After the
federation, the same clients train alone for the same total epochs: the baseline a federation must beat."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgeadapt.fleet.local import (
    PREPARED,
    Member,
    accuracy_of,
    load_data,
    save_prepared,
    trainable_arrays,
    write_arrays,
)
from edgeadapt.fleet.partition import dirichlet_split
from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.data import Dataset, load_dataset, split
from edgeadapt.runtime.errors import ConfigError, TrainingError
from edgeadapt.runtime.manifest import MANIFEST_NAME
from edgeadapt.runtime.signing import SIGNATURE_NAME
from edgeadapt.runtime.state import STATE_FILE
from edgeadapt.runtime.trainer import TrainConfig

GLOBAL_HELD_OUT = 0.1  # share of DATA kept for the global model's accuracy


@dataclass(frozen=True)
class SimulationOptions:
    clients: int = 10
    rounds: int = 10
    local_epochs: int = 1
    alpha: float = 0.3  # Dirichlet concentration of the label split
    personalize_epochs: int = 1
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    clip: float = 0.0
    dp_noise: float = 0.0
    seed: int = 0
    engine: str = "auto"
    batch_size: int | None = None  # each client's (micro-)batch; None: the bundle's
    accumulate: int | None = None  # micro-batches per update; None: the bundle's
    workdir: str | None = None  # keep the clients' bundles here (default: a temporary folder)
    parallel: int | None = None  # clients trained at once (default: the CPU count)


def _client_copy(bundle: Bundle, target: Path) -> Path:
    """A bundle copy sharing the read-only graphs by hard link, with its own state and no cache or logs."""
    target.mkdir(parents=True)
    for item in bundle.path.iterdir():
        if not item.is_file() or item.name not in (*bundle.manifest.files, MANIFEST_NAME, SIGNATURE_NAME):
            continue  # the bundle's own files only: no cache, logs or lock
        if item.name == STATE_FILE:  # trained by this copy: its own
            shutil.copy2(item, target / item.name)
            continue
        try:
            os.link(item, target / item.name)
        except OSError:  # another file system
            shutil.copy2(item, target / item.name)
    return target


def prepare_workspace(bundle: Bundle, data: Dataset, root: Path, options: SimulationOptions) -> Dataset:
    """Server and client bundles plus each client's share under `root`; returns the global held-out part."""
    fleet, held_out = split(data, GLOBAL_HELD_OUT, options.seed)
    if held_out is None:
        raise ConfigError("too little data to hold some out for the global model; give more samples.")
    shares = dirichlet_split(fleet.targets, options.clients, options.alpha, options.seed)
    _client_copy(bundle, root / "server")
    save_prepared(held_out, root / "server" / f"held_out{PREPARED}")
    for client, index in enumerate(shares):
        folder = root / "clients" / str(client)
        _client_copy(bundle, folder / "bundle")
        save_prepared(fleet.subset(index), folder / f"data{PREPARED}")
    return held_out


def _threads(options: SimulationOptions) -> int:
    return max(1, (os.cpu_count() or 1) // (options.parallel or os.cpu_count() or 1))


def simulation_member(root: Path, client: int, options: SimulationOptions) -> Member:
    folder = root / "clients" / str(client)
    config = TrainConfig(engine=options.engine, threads=_threads(options), batch_size=options.batch_size,
                         accumulate=options.accumulate)
    return Member.open(folder / "bundle", folder / f"data{PREPARED}", config)


def local_only(root: Path, initial: dict, options: SimulationOptions) -> dict:
    """Each client alone from the initial model for rounds × local epochs on its own train part, measured on its
    own held-out part and on the global held-out part (through a copy of the server bundle, whose feature cache
    already holds that part)."""
    judge = Bundle.open(shutil.copytree(root / "server", root / "local-only-judge"))
    held_out = load_data(root / "server" / f"held_out{PREPARED}", judge)
    own, overall = [], []
    for client in range(options.clients):
        member = simulation_member(root, client, options)
        trained = member.train_on(initial, options.rounds * options.local_epochs, seed=options.seed)
        own.append(member.accuracy())
        write_arrays(judge, trained)
        overall.append(accuracy_of(judge, held_out, member.config))
    return {"client_accuracy_mean": float(np.mean(own)), "client_accuracy_min": float(np.min(own)),
            "global_accuracy_mean": float(np.mean(overall)), "global_accuracy_max": float(np.max(overall)),
            "epochs": options.rounds * options.local_epochs}


def simulate(bundle: Bundle | str | Path, data: Dataset | str | Path,
             options: SimulationOptions = SimulationOptions()) -> dict:
    from edgeadapt.fleet import flower

    flower()
    from edgeadapt.fleet.apps import ServerSettings

    started = time.monotonic()
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    dataset = data if isinstance(data, Dataset) else load_dataset(data, bundle)
    settings = ServerSettings(bundle="", rounds=options.rounds, local_epochs=options.local_epochs,
                              personalize_epochs=options.personalize_epochs, strategy=options.strategy,
                              proximal_mu=options.proximal_mu, clip=options.clip, dp_noise=options.dp_noise,
                              min_clients=options.clients)
    settings.check()
    if options.strategy == "fedprox" and options.engine == "ort-training":
        raise ConfigError("FedProx's proximal pull needs an engine whose parameters the trainer can pull; the "
                          "ort-training engine keeps its own: use --engine onnxruntime or openvino.")
    with tempfile.TemporaryDirectory(prefix="edgeadapt-fleet-") as scratch:
        root = Path(options.workdir) if options.workdir else Path(scratch)
        if options.workdir and root.exists() and any(root.iterdir()):
            raise ConfigError(f"--workdir {root} is not empty; give a new or empty folder.")
        root.mkdir(parents=True, exist_ok=True)
        prepare_workspace(bundle, dataset, root, options)
        settings = replace(settings, bundle=str(root / "server"),
                           eval_data=str(root / "server" / f"held_out{PREPARED}"),
                           report=str(root / "report.json"))
        _run_flower(root, settings, options)
        if not (root / "report.json").is_file():
            raise TrainingError("the simulation ended without a report; rerun with EDGEADAPT_DEBUG=1 to see "
                                "Flower's log.")
        report = json.loads((root / "report.json").read_text())
        federated_seconds = time.monotonic() - started
        initial = trainable_arrays(bundle)
        report["local_only"] = local_only(root, initial, options)
        report.update(clients=options.clients, alpha=options.alpha, local_epochs=options.local_epochs,
                      strategy=options.strategy, bundle=str(bundle.path),
                      trainable_bytes=int(sum(a.nbytes for a in initial.values())),
                      federated_seconds=round(federated_seconds, 1),
                      seconds=round(time.monotonic() - started, 1))
    return report


def _run_flower(root: Path, settings, options: SimulationOptions) -> None:
    """Flower's simulation engine (Ray backend): one virtual SuperNode per client."""
    from flwr.simulation import run_simulation

    from edgeadapt.fleet.apps import make_client_app, make_server_app

    def member_for(context) -> Member:
        return simulation_member(root, int(context.node_config["partition-id"]), options)

    parallel = options.parallel or os.cpu_count() or 1
    if not os.environ.get("EDGEADAPT_DEBUG"):  # Flower's per-message INFO lines; the report says what matters
        logging.getLogger("flwr").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": parallel, "include_dashboard": False, "log_to_driver": False,
                             "logging_level": "error"}}
    run_simulation(make_server_app(lambda context: settings), make_client_app(member_for),
                   num_supernodes=options.clients, backend_config=backend,
                   verbose_logging=bool(os.environ.get("EDGEADAPT_DEBUG")))

