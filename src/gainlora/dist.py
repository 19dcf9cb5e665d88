"""Where this process stands among the ranks of a run: the one place that asks.

Two questions with different answers before training starts:
- ``is_main()``: should this process write the run directory? Lightning launches every rank with
  its rank in the environment and records it in ``rank_zero_only.rank`` before any process group
  exists, so this is right from the entry point on.
- ``shard()``: (rank, world size) of the initialised process group, for collective work (feature
  collection, prediction gathering); (0, 1) when there is none, so one process takes everything.
"""
from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_only


def is_main() -> bool:
    """Global rank 0 (also true in a single-process run)."""
    return rank_zero_only.rank == 0


def distributed() -> bool:
    """Is an initialised process group of more than one rank present?"""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def shard() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) outside one."""
    if not distributed():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()
