"""Fleet personalization on Flower: federated rounds over edgeadapt bundles (only trainable tensors travel), a
simulation on one machine, and real SuperLink/SuperNode processes. Flower is the optional extra `edgeadapt[fleet]`;
nothing here imports torch."""

from __future__ import annotations

from edgeadapt.runtime.errors import ConfigError

INSTALL_HINT = "pip install 'edgeadapt[fleet]'"


def flower():
    """The `flwr` package, or one line saying how to install it."""
    try:
        import flwr
    except ImportError:
        raise ConfigError(f"fleet commands need Flower, which is not installed: {INSTALL_HINT}") from None
    return flwr
