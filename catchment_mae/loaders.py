"""DataLoaders for training, and the step from a batch to model input on the device.

One loader per split lives for the whole run: its worker processes persist
across epochs (``persistent_workers``) and each epoch only re-seeds the sampler.
On CUDA, batches are pinned and copied without blocking; normalisation (an
affine map per raster and channel) and the random flips run on the device.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from catchment_mae.data import (
    CachedDataset,
    EpochSampler,
    RasterDataset,
    collate,
)
from catchment_mae.prepare import Prepared
from catchment_mae.preprocess import VALID_LEVELS, PreprocessSpec, limit_worker_threads

log = logging.getLogger(__name__)


def make_dataset(
    prepared: Prepared, indices: Sequence[int], spec: PreprocessSpec
) -> Dataset:
    """The rasters ``indices`` of a first pass: from its cache, or their TIFFs."""
    if prepared.cache is not None:
        entries = [prepared.entries[i] for i in indices]
        return CachedDataset(entries, spec, prepared.cache.dir)
    items = prepared.items
    return RasterDataset(
        [items[i][0] for i in indices], spec, [items[i][1] for i in indices]
    )


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    num_workers: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
) -> DataLoader:
    """A loader whose workers persist; call ``loader.sampler.set_epoch(e)``.

    Under torchrun, ``batch_size`` is this rank's share of the global batch and
    the sampler gives each rank its part of every global batch."""
    workers = loader_workers(num_workers, len(dataset))  # type: ignore[arg-type]
    # Off the main thread (a web UI job), the process has other threads: forking
    # it could copy a held lock into the workers; start them from a clean server.
    off_main = threading.current_thread() is not threading.main_thread()
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(
            len(dataset),
            seed,
            shuffle,
            rank,
            world,
            batch_size,  # type: ignore[arg-type]
        ),
        num_workers=workers,
        persistent_workers=workers > 0,
        multiprocessing_context="forkserver" if workers and off_main else None,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_init_worker,
        drop_last=False,
    )


def loader_workers(requested: int, n_files: int) -> int:
    """Data-loading processes: at most one per available core (and per file).

    More workers than cores only oversubscribe the CPU that the training step
    needs too (and make torch warn).
    """
    cores = (
        len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count()
    )
    workers = min(requested, n_files, cores or 1)
    if workers < requested:
        log.debug(
            "num_workers %d -> %d (%s cores, %d files)",
            requested,
            workers,
            cores,
            n_files,
        )
    return workers


def _init_worker(worker_id: int) -> None:
    """One thread per data-loading process (the cores are shared with training),
    and quiet stops: a terminal's Ctrl-C or a ``timeout`` signals the whole
    process group, workers included. A worker ignores SIGINT (the main process
    stops it) and leaves WORKER_GRACE seconds after SIGTERM, with exit code 0.

    Killed by the signal, a worker made the DataLoader print a traceback; leaving
    at once, it raced the main process, which could fail with "DataLoader worker
    exited unexpectedly" instead of stopping (once in CI, under load); ignoring
    SIGTERM, it outlived a main process that exits (multiprocessing stops
    daemon workers with SIGTERM).
    """
    limit_worker_threads()
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _leave_soon)


WORKER_GRACE = 2.0  # seconds a worker keeps serving after SIGTERM


def _leave_soon(*_: object) -> None:
    timer = threading.Timer(WORKER_GRACE, os._exit, (0,))
    timer.daemon = True
    timer.start()


def to_model_input(
    batch: dict, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``images`` (B, C, S, S), ``valid`` (B, 1, S, S) float32 and ``scale``
    (B, 2) on ``device``, normalised there: the numbers of
    :func:`catchment_mae.preprocess.normalise`."""
    z = batch["z"].to(device, non_blocking=True)
    levels = batch["valid"].to(device, non_blocking=True)
    coef = batch["coef"].to(device, non_blocking=True)
    scale = batch["scale"].to(device, non_blocking=True)
    a, b = coef[:, 0, :, None, None], coef[:, 1, :, None, None]
    images = torch.where(levels > 0, z.float() * a + b, 0.0)
    return images, levels.float() / VALID_LEVELS, scale


def random_flips(
    images: torch.Tensor, valid: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flips each image (and its validity) left-right and up-down at random, on
    the images' device (the coin tosses come from ``gen``, a CPU generator, so a
    run flips the same way on any device)."""
    b = images.shape[0]
    for dim in (-1, -2):
        flip = torch.rand(b, generator=gen) < 0.5
        flip = flip.to(images.device, non_blocking=True)[:, None, None, None]
        images = torch.where(flip, images.flip(dim), images)
        valid = torch.where(flip, valid.flip(dim), valid)
    return images, valid
