"""Non-IID splits for simulated fleets: each class's samples shared out over the clients by Dirichlet(alpha) weights
(small alpha: each client sees few classes; large alpha: close to IID)."""

from __future__ import annotations

import numpy as np

from edgeadapt.runtime.errors import ConfigError


def dirichlet_split(labels: np.ndarray, clients: int, alpha: float, seed: int = 0,
                    min_size: int = 10) -> list[np.ndarray]:
    """Sample indices per client; redrawn (seeded) until every client has at least `min_size` samples."""
    if clients < 1 or alpha <= 0:
        raise ConfigError("--clients must be >= 1 and --non-iid ALPHA > 0.")
    if len(labels) < clients * min_size:
        raise ConfigError(f"{len(labels)} samples are too few for {clients} clients (at least {min_size} each); "
                          "give more data or fewer clients.")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        shares: list[list[int]] = [[] for _ in range(clients)]
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(members)).astype(int)[:-1]
            for client, part in enumerate(np.split(members, cuts)):
                shares[client].extend(part.tolist())
        if min(len(s) for s in shares) >= min_size:
            return [np.sort(np.asarray(s, np.int64)) for s in shares]
    raise ConfigError(f"no Dirichlet({alpha}) split gives each of {clients} clients {min_size} samples; raise "
                      "--non-iid or give more data.")
