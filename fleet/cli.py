"""`edgeadapt fleet simulate | server | client`: thin over edgeadapt.fleet; Flower is imported by the commands
only, so `edgeadapt` works without it and `fleet` says in one line how to install it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

fleet_app = typer.Typer(help="Federated rounds over a fleet of devices with Flower (pip install 'edgeadapt\\[fleet]').",
                        no_args_is_help=True)

_STRATEGY = typer.Option("fedavg", "--strategy", help="fedavg | fedprox (Flower's strategies).")
_MU = typer.Option(0.01, "--proximal-mu", help="FedProx's proximal weight.")
_CLIP = typer.Option(0.0, "--clip", help="Clip each client's update to this L2 norm (0: no clipping).")
_NOISE = typer.Option(0.0, "--dp-noise", help="With --clip: Gaussian noise multiplier (Flower's central DP).")
_BATCH = typer.Option(None, "--batch-size", help="Each client's (micro-)batch (default: the bundle's).")
_ACCUMULATE = typer.Option(None, "--accumulate", help="Micro-batches per update: an effective batch of N × batch "
                           "within one micro-batch's memory (default: the bundle's).")
_PERSONALIZE = typer.Option(1, "--personalize-epochs", help="Local epochs from the global model when evaluating.")


def _pct(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def _print_rounds(report: dict) -> None:
    from rich.table import Table

    from edgeadapt.runtime.cli import console

    table = Table("round", "global acc", "client acc mean/min", "personalized mean/min", "clients", "bytes up",
                  "bytes down", "seconds", title="fleet rounds")
    for r in report["rounds"]:
        table.add_row(str(r["round"]), _pct(r["global_accuracy"]),
                      f"{_pct(r['client_accuracy_mean'])} / {_pct(r['client_accuracy_min'])}",
                      f"{_pct(r['personalized_accuracy_mean'])} / {_pct(r['personalized_accuracy_min'])}",
                      str(r["clients"]), f"{r['bytes_up']:,}", f"{r['bytes_down']:,}", f"{r['seconds']:.1f}")
    console().print(table)


@fleet_app.command()
def simulate(bundle: Path = typer.Argument(..., help="Bundle folder (left unchanged: clients train copies)."),
             data: Path = typer.Argument(..., help="Data split over the clients: image folder, .npz or .csv."),
             clients: int = typer.Option(10, "--clients"), rounds: int = typer.Option(10, "--rounds"),
             local_epochs: int = typer.Option(1, "--local-epochs"),
             non_iid: float = typer.Option(0.3, "--non-iid", help="Dirichlet alpha of the label split."),
             personalize_epochs: int = _PERSONALIZE, strategy: str = _STRATEGY, proximal_mu: float = _MU,
             clip: float = _CLIP, dp_noise: float = _NOISE, seed: int = typer.Option(0, "--seed"),
             engine: str = typer.Option("auto", "--engine"),
             batch_size: Optional[int] = _BATCH, accumulate: Optional[int] = _ACCUMULATE,
             workdir: Optional[Path] = typer.Option(None, "--workdir", help="Keep the clients' bundles here."),
             as_json: bool = typer.Option(False, "--json")):
    """Simulate a fleet on this machine with Flower's simulation engine; compare with clients training alone."""
    from edgeadapt.fleet.simulate import SimulationOptions
    from edgeadapt.fleet.simulate import simulate as run

    options = SimulationOptions(clients=clients, rounds=rounds, local_epochs=local_epochs, alpha=non_iid,
                                personalize_epochs=personalize_epochs, strategy=strategy, proximal_mu=proximal_mu,
                                clip=clip, dp_noise=dp_noise, seed=seed, engine=engine, batch_size=batch_size,
                                accumulate=accumulate, workdir=str(workdir) if workdir else None)
    report = run(bundle, data, options)
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    _print_rounds(report)
    last, alone = report["rounds"][-1], report["local_only"]
    typer.echo(f"local only ({alone['epochs']} epochs each): client accuracy mean {_pct(alone['client_accuracy_mean'])}"
               f", min {_pct(alone['client_accuracy_min'])}")
    typer.echo(f"federated: global {_pct(last['global_accuracy'])}, personalized mean "
               f"{_pct(last['personalized_accuracy_mean'])}; {report['seconds']:.0f} s in all")


@fleet_app.command()
def server(bundle: Path = typer.Argument(..., help="Bundle folder: holds the global model after every round."),
           rounds: int = typer.Option(3, "--rounds"), local_epochs: int = typer.Option(1, "--local-epochs"),
           min_clients: int = typer.Option(2, "--min-clients", help="Clients needed to start a round."),
           data: Optional[Path] = typer.Option(None, "--data", help="Held-out data for the global accuracy."),
           personalize_epochs: int = _PERSONALIZE, strategy: str = _STRATEGY, proximal_mu: float = _MU,
           clip: float = _CLIP, dp_noise: float = _NOISE,
           round_timeout: float = typer.Option(600.0, "--round-timeout",
                                               help="Seconds a round waits for clients that went silent."),
           host: str = typer.Option("127.0.0.1", "--host"), port: int = typer.Option(9092, "--port"),
           report: Optional[Path] = typer.Option(None, "--report", help="Write the per-round JSON report here."),
           as_json: bool = typer.Option(False, "--json")):
    """Run a Flower SuperLink and the federation on it; clients join with `edgeadapt fleet client`."""
    from edgeadapt.fleet import flower

    flower()
    from edgeadapt.fleet.apps import ServerSettings
    from edgeadapt.fleet.deployment import serve
    from edgeadapt.runtime.bundle import Bundle

    Bundle.open(bundle)
    settings = ServerSettings(bundle=str(bundle), rounds=rounds, local_epochs=local_epochs,
                              personalize_epochs=personalize_epochs, strategy=strategy, proximal_mu=proximal_mu,
                              clip=clip, dp_noise=dp_noise, min_clients=min_clients,
                              eval_data=str(data) if data else "", report=str(report.resolve()) if report else "",
                              round_timeout=round_timeout)
    typer.echo(f"fleet server on {host}:{port}: waiting for {min_clients} clients "
               f"(edgeadapt fleet client BUNDLE DATA --server {host}:{port})", err=True)
    result = serve(settings, host, port)  # Flower's log: fleet_server.log in the bundle
    if as_json:
        typer.echo(json.dumps(result, indent=1))
    else:
        _print_rounds(result)
        typer.echo(f"global model after round {len(result['rounds'])}: {bundle} (edgeadapt evaluate/deploy)")


@fleet_app.command()
def client(bundle: Path = typer.Argument(..., help="This device's copy of the server's bundle."),
           data: Path = typer.Argument(..., help="This device's data (never leaves it)."),
           server: str = typer.Option(..., "--server", help="The fleet server's HOST:PORT."),
           engine: str = typer.Option("auto", "--engine"), device: str = typer.Option("cpu", "--device"),
           threads: Optional[int] = typer.Option(None, "--threads"),
           batch_size: Optional[int] = _BATCH, accumulate: Optional[int] = _ACCUMULATE):
    """Join a fleet as a Flower SuperNode; runs until stopped (Ctrl-C)."""
    from edgeadapt.fleet import flower

    flower()
    from edgeadapt.fleet.deployment import join

    typer.echo(f"fleet client: joining {server} as a Flower SuperNode (Flower's log: {bundle / 'fleet_client.log'})",
               err=True)
    raise typer.Exit(join(str(bundle), str(data), server, engine, device, threads, batch_size=batch_size,
                          accumulate=accumulate))


def register(app: typer.Typer) -> None:
    app.add_typer(fleet_app, name="fleet")
