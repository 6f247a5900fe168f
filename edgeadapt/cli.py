"""The `edgeadapt` command: composes the device commands (runtime/cli.py) and the host commands (toolchain/cli.py).
Importing it needs neither torch nor onnx; each command imports what it uses."""

from __future__ import annotations

import os
import sys

import typer

from edgeadapt.runtime.errors import EdgeAdaptError

app = typer.Typer(help="Export pretrained backbones to portable ONNX training bundles and adapt them on the device.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def _register() -> None:
    from edgeadapt.devices import cli as devices_cli
    from edgeadapt.fleet import cli as fleet_cli
    from edgeadapt.runtime import cli as device_cli
    from edgeadapt.toolchain import cli as host_cli

    host_cli.register(app)
    device_cli.register(app)
    devices_cli.register(app)
    fleet_cli.register(app)


_register()


def main() -> None:
    try:
        app()
    except EdgeAdaptError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted; saved state is intact (training resumes with --resume).", err=True)
        sys.exit(130)
    except OSError as exc:  # disk full, permissions: the environment, not a bug
        where = f" ({exc.filename})" if exc.filename else ""
        typer.echo(f"error: {exc.strerror or exc}{where}; free space or fix permissions and retry.", err=True)
        sys.exit(1)
    except Exception as exc:  # a bug: one line by default, the traceback on request
        if os.environ.get("EDGEADAPT_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        typer.echo(f"internal error: {type(exc).__name__}: {first} (a bug in edgeadapt; rerun with "
                   "EDGEADAPT_DEBUG=1 for the traceback and report it)", err=True)
        sys.exit(3)
