"""Which process writes: under DDP every rank ends the run, and rank 0 alone writes files.

Lightning's ``rank_zero_only`` holds the rank once Lightning is imported (its strategies set it when a run trains);
a run that never imported Lightning reads the launcher's environment the way Lightning does, so a static merge
needs no Lightning to know it.
"""

from __future__ import annotations

import os

from lightning_utilities.core.rank_zero import rank_zero_only  # the object Lightning sets; not Lightning itself

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")  # Lightning's order


def is_rank_zero() -> bool:
    rank = getattr(rank_zero_only, "rank", None)
    if rank is None:
        rank = next((int(os.environ[k]) for k in RANK_VARIABLES if k in os.environ), 0)
    return rank == 0
