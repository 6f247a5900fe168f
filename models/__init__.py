"""The zoo of edge backbones: a registry of small factories with their specs as data (host side, needs torch)."""
