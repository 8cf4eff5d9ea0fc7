"""Every registered policy, grouped by the MALLOC level it acts on (importing this registers them)."""

from kvrec.compression.policies import baseline, crosslayer, lowrank, merging, precision, pruning

__all__ = ["baseline", "crosslayer", "lowrank", "merging", "precision", "pruning"]
