"""Training under ``torchrun``: one process per device, DistributedDataParallel.

``torchrun --nproc_per_node N -m catchment_mae.cli.main train ...`` starts N
copies of ``cmae train``; each reads RANK, WORLD_SIZE and LOCAL_RANK from the
environment torchrun sets, joins the group (gloo on CPUs, NCCL on GPUs) and
trains on its share of every global batch. Without those variables nothing here
does anything: one process trains as before.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from catchment_mae.interrupt import ignore_interrupts
from catchment_mae.ranks import Ranks

# The first pass (reading every raster into the cache) runs on the first rank of
# each machine while the others wait at a barrier; a large archive takes hours.
FIRST_PASS_TIMEOUT = datetime.timedelta(hours=12)


def start(ranks: Ranks, device: torch.device) -> torch.device:
    """Joins the process group; returns this rank's device (``cuda:LOCAL_RANK``
    on GPUs)."""
    if not ranks.active:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=FIRST_PASS_TIMEOUT
        )
    return device


def stop(ranks: Ranks) -> None:
    """Leaves the group, the rank's last act: from here on interrupts are
    dropped, as a second one cut short would leave the group's threads to abort
    the process at exit (``interrupt.ignore_interrupts``)."""
    if ranks.active and dist.is_initialized():
        ignore_interrupts()
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.active:
        dist.barrier()


def all_finite(finite: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """True where every rank's loss was finite: gradients are averaged over the
    ranks, so one rank's non-finite loss spoils every rank's step."""
    if not ranks.active:
        return finite
    flag = finite.to(torch.int32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag[0].bool()


def sum_over_ranks(
    values: list[float], ranks: Ranks, device: torch.device
) -> list[float]:
    """Element-wise sums over the ranks (one small all-reduce)."""
    if not ranks.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def wrap(model: torch.nn.Module, ranks: Ranks, device: torch.device) -> Any:
    """The model in DistributedDataParallel (every parameter takes part in every
    step, the scale MLP included: no unused-parameter search)."""
    if not ranks.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def launch(nproc: int, argv: list[str]) -> int:
    """Runs ``cmae ARGV`` in ``nproc`` processes on this machine, as ``torchrun
    --standalone --nproc_per_node NPROC -m catchment_mae.cli.main ARGV`` does;
    returns the exit code (the first failing rank's, 130 when interrupted).

    Each process gets an equal share of the cores as its torch threads. The
    processes report their own errors (rank 0 alone for an interruption), so
    torchrun's warnings and its traceback on Ctrl-C are not shown.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from catchment_mae.workers import available_cores

    for name in list(logging.root.manager.loggerDict):  # each sets its own level
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, available_cores() // nproc)))
    args = get_args_parser().parse_args(
        [
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            "--module",
            "catchment_mae.cli.main",
            *argv,
        ]  # fmt: skip
    )
    try:
        run(args)
    except SignalException:
        return 130
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        return 130 if 130 in codes else next((c for c in codes if c), 1)
    return 0
