"""The Flower side: a ClientApp over `Member` and a ServerApp running one of Flower's strategies, for both Flower
engines (simulation and SuperLink/SuperNode deployment). Messages carry only the trainable tensors (ArrayRecord by
parameter name) and the bundle's fingerprint, which every client checks before it touches its state."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp import strategy as strategies

from edgeadapt.fleet.local import (
    Member,
    accuracy_of,
    check_fingerprint,
    fingerprint,
    load_data,
    trainable_arrays,
    write_arrays,
)
from edgeadapt.runtime.atomic import atomic_write_text
from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.errors import ConfigError, EdgeAdaptError
from edgeadapt.runtime.trainer import TrainConfig

STRATEGIES = ("fedavg", "fedprox")
REFUSED_FILE = "fleet_refused.txt"


# ---- client ---------------------------------------------------------------------------------------------------

def _arrays(message: Message) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in message.content["arrays"].items()}


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def _admit(member: Member, config) -> None:
    """Refuse a global model meant for another bundle; the refusal is also left in the bundle (REFUSED_FILE) for
    `edgeadapt fleet client`, which stops with that one line."""
    try:
        check_fingerprint(member.bundle, config)
    except ConfigError as exc:
        atomic_write_text(member.bundle.path / REFUSED_FILE, str(exc))
        raise


def make_client_app(member_for: Callable[[Context], Member]) -> ClientApp:
    """A ClientApp whose member (bundle + data) comes from the node's context."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        member, config = member_for(context), message.content["config"]
        _admit(member, config)
        trained = member.train_on(_arrays(message), int(config["local-epochs"]), seed=int(config["server-round"]),
                                  proximal_mu=float(config.get("proximal-mu", 0.0)))
        metrics = MetricRecord({"num-examples": len(member.train)})
        return Message(RecordDict({"arrays": _record(trained), "metrics": metrics}), reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        """The global model on the member's held-out data, then personalized (local epochs from it) and measured
        again; the member's bundle keeps the personalized model, the one its device uses."""
        member, config = member_for(context), message.content["config"]
        _admit(member, config)
        arrays = _arrays(message)
        write_arrays(member.bundle, arrays)
        before = member.accuracy()
        epochs = int(config.get("personalize-epochs", 1))
        after = before
        if epochs:
            member.personalize(arrays, epochs, seed=int(config["server-round"]))
            after = member.accuracy()
        metrics = MetricRecord({"num-examples": len(member.held_out), "accuracy": before,
                                "personalized-accuracy": after})
        return Message(RecordDict({"metrics": metrics}), reply_to=message)

    return app


def member_from_node(context: Context) -> Member:
    """Deployment: the SuperNode's `--node-config "bundle='…' data='…'"` (set by `edgeadapt fleet client`)."""
    node = context.node_config
    if "bundle" not in node or "data" not in node:
        raise ConfigError("this SuperNode has no bundle/data node config; start it with `edgeadapt fleet client "
                          "BUNDLE DATA --server HOST:PORT`.")
    counts = {key: int(node[key]) for key in ("threads", "batch_size", "accumulate") if key in node}
    config = TrainConfig(engine=str(node.get("engine", "auto")), device=str(node.get("device", "cpu")), **counts)
    return Member.open(str(node["bundle"]), str(node["data"]), config)


# ---- server ---------------------------------------------------------------------------------------------------

@dataclass
class ServerSettings:
    bundle: str
    rounds: int = 3
    local_epochs: int = 1
    personalize_epochs: int = 1
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    clip: float = 0.0  # update clipping norm (0: none); with dp_noise, Flower's central DP
    dp_noise: float = 0.0
    min_clients: int = 2
    fraction: float = 1.0
    eval_data: str = ""  # held-out data for the global accuracy (optional)
    report: str = ""  # JSON report written after every round (optional)
    round_timeout: float = 600.0

    @classmethod
    def from_run_config(cls, config: dict) -> "ServerSettings":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{key.replace("-", "_"): value for key, value in config.items() if key.replace("-", "_") in known})

    def check(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown --strategy '{self.strategy}'; choose one of {', '.join(STRATEGIES)}.")
        if self.rounds < 1 or self.local_epochs < 1 or self.min_clients < 1 or self.personalize_epochs < 0:
            raise ConfigError("--rounds, --local-epochs and --min-clients must be >= 1, --personalize-epochs >= 0.")
        if self.dp_noise and not self.clip:
            raise ConfigError("--dp-noise needs --clip: Gaussian noise is scaled to the clipping norm.")


def build_strategy(settings: ServerSettings):
    """FedAvg or FedProx from Flower; with --clip, wrapped in Flower's server-side fixed clipping (noise 0: plain
    update clipping; --dp-noise σ: central differential privacy)."""
    common = dict(fraction_train=settings.fraction, fraction_evaluate=settings.fraction,
                  min_train_nodes=settings.min_clients, min_evaluate_nodes=settings.min_clients,
                  min_available_nodes=settings.min_clients, evaluate_metrics_aggr_fn=client_metrics)
    chosen = strategies.FedProx(proximal_mu=settings.proximal_mu, **common) if settings.strategy == "fedprox" \
        else strategies.FedAvg(**common)
    if settings.clip:
        chosen = strategies.DifferentialPrivacyServerSideFixedClipping(
            chosen, noise_multiplier=settings.dp_noise, clipping_norm=settings.clip,
            num_sampled_clients=settings.min_clients)
    return chosen


def client_metrics(replies: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Client accuracies as the fleet sees them: unweighted mean and the worst client, before/after personalizing."""
    rows = [next(iter(reply.metric_records.values())) for reply in replies]
    before = [float(row["accuracy"]) for row in rows]
    after = [float(row["personalized-accuracy"]) for row in rows]
    return MetricRecord({"client-accuracy-mean": float(np.mean(before)), "client-accuracy-min": min(before),
                         "personalized-accuracy-mean": float(np.mean(after)), "personalized-accuracy-min": min(after),
                         "clients": len(rows)})


def _payload_bytes(message: Message) -> int:
    if message.has_error():
        return 0
    return sum(record.count_bytes() for record in message.content.array_records.values())


class CountingGrid:
    """The Grid the strategy talks to, counting the parameter bytes that go down to and come up from clients."""

    def __init__(self, grid: Grid):
        self._grid, self.down, self.up = grid, 0, 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.down += sum(_payload_bytes(m) for m in messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.up += sum(_payload_bytes(r) for r in replies)
        return replies

    def __getattr__(self, name):
        return getattr(self._grid, name)


@dataclass
class RoundLog:
    """Per-round numbers, filled by the strategy's hooks and written as JSON after every round."""

    path: Path | None
    rounds: list[dict] = field(default_factory=list)
    initial_accuracy: float | None = None
    clients: dict = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def close_round(self, number: int, grid: CountingGrid, global_accuracy: float | None) -> None:
        now = time.monotonic()
        entry = {"round": number, "global_accuracy": global_accuracy,
                 "client_accuracy_mean": self.clients.get("client-accuracy-mean"),
                 "client_accuracy_min": self.clients.get("client-accuracy-min"),
                 "personalized_accuracy_mean": self.clients.get("personalized-accuracy-mean"),
                 "personalized_accuracy_min": self.clients.get("personalized-accuracy-min"),
                 "clients": self.clients.get("clients", 0), "bytes_up": grid.up, "bytes_down": grid.down,
                 "seconds": round(now - self.started, 3)}
        self.rounds.append(entry)
        grid.up = grid.down = 0
        self.started, self.clients = now, {}
        self.write()

    def write(self) -> None:
        if self.path is not None:
            atomic_write_text(self.path, json.dumps({"initial_global_accuracy": self.initial_accuracy,
                                                     "rounds": self.rounds}, indent=1))


def run_server(grid: Grid, settings: ServerSettings) -> RoundLog:
    """Run the federation; after every round the global model is the server bundle's state (so `evaluate`,
    `deploy` and `train` work on it) and the round's numbers are in the report."""
    settings.check()
    bundle = Bundle.open(settings.bundle)
    held_out = load_data(settings.eval_data, bundle) if settings.eval_data else None
    judging = TrainConfig(val_split=0.0).for_bundle(bundle.manifest)
    log, counting = RoundLog(Path(settings.report) if settings.report else None), CountingGrid(grid)
    chosen = build_strategy(settings)
    aggregate = chosen.aggregate_evaluate

    def remember_clients(server_round, replies):
        metrics = aggregate(server_round, replies)
        log.clients = dict(metrics or {})
        return metrics

    chosen.aggregate_evaluate = remember_clients

    def global_model(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        write_arrays(bundle, {name: array.numpy() for name, array in arrays.items()})
        accuracy = accuracy_of(bundle, held_out, judging) if held_out is not None else None
        if server_round == 0:
            log.initial_accuracy = accuracy
            log.started = time.monotonic()
        else:
            log.close_round(server_round, counting, accuracy)
        return MetricRecord({"accuracy": accuracy} if accuracy is not None else {})

    shared = ConfigRecord({**fingerprint(bundle), "local-epochs": settings.local_epochs,
                           "personalize-epochs": settings.personalize_epochs})
    chosen.start(counting, _record(trainable_arrays(bundle)), num_rounds=settings.rounds,
                 timeout=settings.round_timeout, train_config=shared, evaluate_config=ConfigRecord(dict(shared)),
                 evaluate_fn=global_model)
    return log


def make_server_app(settings_for: Callable[[Context], ServerSettings]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = settings_for(context)
        try:
            run_server(grid, settings)
        except EdgeAdaptError as exc:  # for `fleet server`, which waits on the report
            if settings.report:
                report = Path(settings.report)
                done = json.loads(report.read_text()) if report.is_file() else {"rounds": []}
                atomic_write_text(report, json.dumps({**done, "error": str(exc)}))
            raise

    return app
