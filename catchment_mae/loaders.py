"""DataLoaders for training, and the step from a batch to model input on the device.

One loader per split lives for the whole run: its worker processes persist
across epochs (``persistent_workers``) and each epoch only re-seeds the sampler.
On CUDA, batches are pinned and copied without blocking; normalisation (an
affine map per raster and channel) and the random flips run on the device. A
cache that fits in the GPU's memory is held there instead (:class:`DeviceLoader`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from catchment_mae.cache import Entry
from catchment_mae.data import (
    Batch,
    CachedDataset,
    EpochSampler,
    RasterDataset,
    collate,
)
from catchment_mae.errors import ConfigError
from catchment_mae.pass_thread import PassInThread
from catchment_mae.prepare import Prepared
from catchment_mae.preprocess import VALID_LEVELS, norm_refusal
from catchment_mae.spec import PreprocessSpec
from catchment_mae.workers import limit_worker_threads, start_context

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
    on_gpu: bool | None = False,
) -> DataLoader | DeviceLoader:
    """A loader whose workers persist; call ``loader.sampler.set_epoch(e)``.

    Under torchrun, ``batch_size`` is this rank's share of the global batch and
    the sampler gives each rank its part of every global batch. On CUDA, a
    cached dataset is held in the GPU's memory as :func:`hold_on_gpu` says."""
    sampler = EpochSampler(
        len(dataset),
        seed,
        shuffle,
        rank,
        world,
        batch_size,  # type: ignore[arg-type]
    )
    if (
        device.type == "cuda"
        and isinstance(dataset, CachedDataset)
        and hold_on_gpu(dataset, device, on_gpu)
    ):
        return DeviceLoader(dataset, batch_size, sampler, device)
    workers = loader_workers(num_workers, len(dataset))  # type: ignore[arg-type]
    # Off the main thread (a web UI job), the process has other threads: forking
    # it could copy a held lock into the workers; start them from a clean server
    # (the readers', which has our modules imported).
    off_main = threading.current_thread() is not threading.main_thread()
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        multiprocessing_context=start_context() if workers and off_main else None,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_init_worker,
        drop_last=False,
    )


# The share of the GPU's free memory a cache may take to be held there; the rest
# stays the model's (its activations grow with the batch). Asked for with
# --cache-on-gpu, it may take up to GPU_CACHE_MOST; beyond, it is refused.
GPU_CACHE_SHARE = 0.25
GPU_CACHE_MOST = 0.5


def hold_on_gpu(
    dataset: CachedDataset, device: torch.device, asked: bool | None
) -> bool:
    """Whether to hold ``dataset`` in the GPU's memory: never when ``asked`` is
    False; by default (None) when it takes at most GPU_CACHE_SHARE of the free
    memory; asked for (True), when it takes at most GPU_CACHE_MOST.

    Raises:
        ConfigError: asked for, and it takes more than GPU_CACHE_MOST.
    """
    if asked is False:
        return False
    free, _ = torch.cuda.mem_get_info(device)
    if asked is None:
        return dataset.nbytes <= GPU_CACHE_SHARE * free
    if dataset.nbytes > GPU_CACHE_MOST * free:
        raise ConfigError(
            f"cache_on_gpu: the cached rasters take {dataset.nbytes / 2**20:.0f}"
            f" MB, more than half of the GPU's {free / 2**20:.0f} MB free (the "
            "rest is the model's); train with --no-cache-on-gpu",
            key="cache_on_gpu",
        )
    return True


class DeviceLoader:
    """A cached dataset held in the device's memory and batched there: during an
    epoch nothing crosses from the host (no loader workers, no pinning, no
    copies), each batch is one gather on the device. It yields the batches a
    DataLoader over the same dataset and sampler would.

    Loader workers, whose batches cross shared and pinned memory, feed a fast
    GPU's steps at about half their in-memory rate at large batches; held on
    the GPU, the cache feeds them at about 0.95 (benchmarks/README.md).

    Args:
        dataset: the cached rasters (read once, in chunks, onto ``device``).
        batch_size: samples per batch.
        sampler: the epoch's order (``set_epoch`` as for a DataLoader).
        device: where to hold them.
    """

    CHUNK = 1024  # rasters moved at a time: bounds the host memory it takes

    def __init__(
        self,
        dataset: CachedDataset,
        batch_size: int,
        sampler: EpochSampler,
        device: torch.device,
    ) -> None:
        self.dataset, self.batch_size, self.sampler = dataset, batch_size, sampler
        self.device = device
        n = len(dataset)
        self.z: torch.Tensor | None = None
        for lo in range(0, n, self.CHUNK):
            chunk = dataset.__getitems__(range(lo, min(lo + self.CHUNK, n)))
            if self.z is None:  # allocated once: no second copy while filling
                self.z = chunk["z"].new_empty((n, *chunk["z"].shape[1:]), device=device)
                self.valid = chunk["valid"].new_empty(
                    (n, *chunk["valid"].shape[1:]), device=device
                )
            self.z[lo : lo + len(chunk["z"])] = chunk["z"].to(device)
            self.valid[lo : lo + len(chunk["valid"])] = chunk["valid"].to(device)
        self.coef = torch.from_numpy(dataset.coef).to(device)
        self.scale = torch.from_numpy(dataset.scale).to(device)
        log.info("holding %d cached samples on %s (%.0f MB)", n, device,
                 dataset.nbytes / 2**20)  # fmt: skip

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        on_device = order.to(self.device, non_blocking=True)
        paths = self.dataset.paths
        for lo in range(0, len(order), self.batch_size):
            idx = on_device[lo : lo + self.batch_size]
            yield {
                "z": self.z[idx],
                "valid": self.valid[idx],
                "coef": self.coef[idx],
                "scale": self.scale[idx],
                "path": [paths[i] for i in order[lo : lo + self.batch_size].tolist()],
                "failed": [],
            }


class StreamedEpoch:
    """The first epoch's batches as the first pass reads the rasters into the
    cache (:class:`catchment_mae.pass_thread.PassInThread`): a step need not wait
    for the whole pass, only for its own batch.

    A batch is ``batch_size`` samples of ``train`` (positions in the pass's
    list) in the order the pass settles them, gathered from the shards' memory
    maps here (a shard still being written included); the last may be smaller.
    Samples that fixed normalisation refuses (:func:`norm_refusal`) are left
    out, as the pass's screening leaves them out of later epochs. ``len`` is
    the steps were every sample to be read well; as some fail, each batch says
    how far through the epoch it takes the schedule (``done``: the share of the
    training samples settled, read well or not, once it is taken), so the
    learning rate still ends the epoch where it should. If no training sample
    could be read, the others are trained on (as the later epochs' split does).

    Args:
        stream: the pass, started with ``order`` and a cache.
        train: positions of the training samples.
        spec: the preprocessing, its normalisation known (fixed with
            norm_mean/norm_std, or per-raster).
        batch_size: samples per batch.
        pin: gather the batches into pinned memory (training on CUDA).
    """

    def __init__(
        self,
        stream: PassInThread,
        train: set[int],
        spec: PreprocessSpec,
        batch_size: int,
        pin: bool = False,
    ) -> None:
        self.stream, self.train, self.spec = stream, train, spec
        self.batch_size, self.pin = batch_size, pin

    def __len__(self) -> int:
        return max(1, -(-len(self.train) // self.batch_size))

    def __iter__(self) -> Iterator[Batch]:
        # How many training samples the pass settles up to each one (its order).
        settled = {
            p: k + 1
            for k, p in enumerate(p for p in self.stream.order if p in self.train)
        }
        n = max(len(self.train), 1)
        maps: dict[str, Any] = {}
        batch: list[Entry] = []
        others: list[Entry] = []
        trained = False
        for position, entry in self.stream.samples():
            if norm_refusal(entry.mean, entry.std, self.spec):
                continue
            if position not in self.train:
                if not trained:  # trained on only if no training sample reads
                    others.append(entry)
                continue
            batch.append(entry)
            if len(batch) == self.batch_size:
                yield self._gather(batch, maps, settled[position] / n)
                batch, trained = [], True
        if not trained and not batch:
            batch = others
        for lo in range(0, len(batch), self.batch_size):
            done = min(lo + self.batch_size, len(batch)) / len(batch)
            yield self._gather(batch[lo : lo + self.batch_size], maps, done)

    def _gather(self, batch: list[Entry], maps: dict[str, Any], done: float) -> Batch:
        ds = CachedDataset(batch, self.spec, self.stream.cache_dir, maps, self.pin)
        try:
            return {**ds.__getitems__(range(len(batch))), "done": done}
        except FileNotFoundError:
            # A pass that failed removes its unfinished shards: its error says
            # why (a full disk, say), not the missing file.
            failure = self.stream.failure()
            if failure is not None:
                raise failure from None
            raise


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
    sys.excepthook = _quiet_report


def _quiet_report(kind: type[BaseException], error: BaseException, tb: Any) -> None:
    """What a worker's background threads report, logged in one line at debug
    (its main thread's errors are reported as before).

    A worker hands each batch's shared memory over through multiprocessing's
    resource sharer, whose thread reports its errors to ``sys.excepthook``;
    stopped in the middle of a hand-over, the main process reset the connection
    and the worker printed that thread's traceback under the one-line message
    (once in CI, under load). Errors of the work itself reach the main process
    through the DataLoader, as before."""
    if threading.current_thread() is threading.main_thread():
        sys.__excepthook__(kind, error, tb)
    else:
        log.debug("loader worker: %s: %s", kind.__name__, error)


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
