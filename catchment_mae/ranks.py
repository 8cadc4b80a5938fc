"""Where a process stands under ``torchrun``: its rank, the world's size, its
rank on this machine, read from the variables torchrun sets.

Kept apart from ``distributed.py``, which imports torch, so that a command can
ask before it imports torch (``cmae train`` starts its readers' forkserver
first).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the group (rank 0 of 1 when alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """The process that writes outputs, logs and progress."""
        return self.rank == 0

    @property
    def local_main(self) -> bool:
        """The first process on this machine: it builds the machine's cache."""
        return self.local_rank == 0


def ranks_from_env() -> Ranks:
    """The ranks torchrun set, or a single process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        return Ranks()
    return Ranks(rank, world, local) if world > 1 else Ranks()


def is_main_process() -> bool:
    """False in every torchrun process but rank 0 (which prints the results)."""
    return ranks_from_env().main
