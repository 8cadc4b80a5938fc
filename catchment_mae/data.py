"""torch Datasets over the one preprocessing path: from the cache, or from TIFFs.

Both give the same batches: the resampled record of :mod:`catchment_mae.preprocess`
(``z`` float16, ``valid`` uint8) plus each raster's normalisation coefficients
(``image = a * z + b``), which :func:`catchment_mae.loaders.to_model_input`
applies on the training device. Shipping float16 and uint8 halves what crosses
to a GPU, and the cached and the uncached run see the same numbers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from catchment_mae.cache import Entry
from catchment_mae.errors import BadRasterError
from catchment_mae.preprocess import load_resampled, norm_coefficients
from catchment_mae.spec import PreprocessSpec


class Batch(TypedDict, total=False):
    """What a training step takes (every loader gives it; ``z`` is None for a
    batch whose rasters all failed)."""

    z: Any  # (B, C, S, S) float16: each raster standardised by its own stats
    valid: Any  # (B, 1, S, S) uint8: each pixel's valid share, in VALID_LEVELS
    coef: Any  # (B, 2, C): image = coef[:, 0] * z + coef[:, 1]
    scale: Any  # (B, K) float32: the scale vectors
    path: list[str]  # the rasters (or chips) in the batch
    failed: list[tuple[str, str]]  # rasters that failed on the way: (path, reason)
    done: float  # streamed first epoch: the share of the epoch settled


class CachedDataset(Dataset):
    """Rasters from the decode-once cache, memory-mapped; a batch is gathered
    per shard with one fancy index (``__getitems__``), not raster by raster.

    Args:
        entries: cached rasters (``shard`` and ``row`` set).
        spec: the preprocessing (its normalisation is applied per batch).
        cache_dir: the cache's directory (``SampleCache.dir``).
        maps: shards already opened, by name (shared by the first epoch's
            batches, :class:`catchment_mae.loaders.StreamedEpoch`).
        pin: gather batches into pinned memory, so copies to a CUDA device
            need not wait (for batches taken in the training process; a
            DataLoader pins its workers' batches itself).
    """

    def __init__(
        self,
        entries: Sequence[Entry],
        spec: PreprocessSpec,
        cache_dir: Path,
        maps: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
        pin: bool = False,
    ):
        self.cache_dir = Path(cache_dir)
        self.paths = [e.key.path for e in entries]
        self.shards = sorted({str(e.shard) for e in entries})
        index = {s: k for k, s in enumerate(self.shards)}
        self.shard_of = np.array([index[str(e.shard)] for e in entries], np.int64)
        self.row_of = np.array([e.row for e in entries], np.int64)
        a, b = norm_coefficients(
            np.stack([e.mean for e in entries]),
            np.stack([e.std for e in entries]),
            spec,
        )
        self.coef = np.stack([a, b], axis=1)  # [N, 2, C]
        self.scale = np.stack([e.scale for e in entries]).astype(np.float32)
        self._open = maps if maps is not None else {}
        self.pin = pin

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def nbytes(self) -> int:
        """What its images and validity take in memory."""
        if not self.paths:
            return 0
        z, valid = self._arrays(0)
        return len(self) * (z[0].nbytes + valid[0].nbytes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        """One batch (the DataLoader hands the sampler's indices over at once)."""
        idx = np.asarray(indices, np.int64)
        first_z, first_v = self._arrays(int(self.shard_of[idx[0]]))
        z = self._empty((len(idx), *first_z.shape[1:]), torch.float16)
        valid = self._empty((len(idx), *first_v.shape[1:]), torch.uint8)
        zn, vn = z.numpy(), valid.numpy()
        for shard in np.unique(self.shard_of[idx]):
            at = np.flatnonzero(self.shard_of[idx] == shard)
            zs, vs = self._arrays(int(shard))
            rows = self.row_of[idx[at]]
            zn[at], vn[at] = zs[rows], vs[rows]
        coef, scale = (
            torch.from_numpy(self.coef[idx]),
            torch.from_numpy(self.scale[idx]),
        )
        return {
            "z": z,
            "valid": valid,
            "coef": coef.pin_memory() if self.pin else coef,
            "scale": scale.pin_memory() if self.pin else scale,
            "path": [self.paths[i] for i in idx],
            "failed": [],
        }

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin)

    def _arrays(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """A shard's memory maps, opened once per process (each loader worker)."""
        stem = self.shards[shard]
        if stem not in self._open:
            self._open[stem] = (
                _open_shard_file(self.cache_dir / f"{stem}.z.npy"),
                _open_shard_file(self.cache_dir / f"{stem}.valid.npy"),
            )
        return self._open[stem]

    def __getstate__(self) -> dict[str, Any]:
        # Workers reopen the maps themselves: a pickled memmap would copy the data.
        return {**self.__dict__, "_open": {}}


def _open_shard_file(path: Path) -> np.ndarray:
    """A shard file, memory-mapped read-only. While the first pass still writes
    the shard, the file has its temporary name (``.tmp``) until it is renamed
    once, so the final name, then the temporary one, then the final one again
    cannot all miss; a map opened under either name stays good."""
    tmp = path.with_name(path.name + ".tmp")
    for name in (path, tmp):
        with contextlib.suppress(FileNotFoundError):
            return np.load(name, mmap_mode="r")
    return np.load(path, mmap_mode="r")


class RasterDataset(Dataset):
    """Rasters (or chips) read from their TIFFs every time (``--no-cache``); a
    file that fails yields its reason instead of a crash.

    Args:
        paths: the TIFF files.
        spec: how to preprocess them (shared with embedding).
        windows: per path, a chip's window (x0, y0, width, height) or None.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        spec: PreprocessSpec,
        windows: Sequence[tuple[int, int, int, int] | None] | None = None,
    ):
        self.paths = [os.fspath(p) for p in paths]
        self.windows = list(windows) if windows is not None else [None] * len(paths)
        self.spec = spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        try:
            r = load_resampled(
                path, self.spec, maxworkers=1, window=self.windows[index]
            )
        except BadRasterError as e:
            return {"failed": (path, e.reason)}
        return {
            "z": r.z,
            "valid": r.valid,
            "coef": np.stack(norm_coefficients(r.mean, r.std, self.spec)),
            "scale": r.scale,
            "path": path,
        }


def collate(items: Any) -> Batch:
    """Stacks a RasterDataset's samples (failures travel beside them as (path,
    reason)); a CachedDataset's batch comes ready and passes through."""
    if isinstance(items, dict):
        return items
    good = [it for it in items if "failed" not in it]
    batch: Batch = {
        "failed": [it["failed"] for it in items if "failed" in it],
        "path": [it["path"] for it in good],
    }
    for key in ("z", "valid", "coef", "scale"):
        batch[key] = (
            torch.from_numpy(np.stack([it[key] for it in good])) if good else None
        )
    return batch


class EpochSampler(Sampler[int]):
    """A permutation of the dataset drawn from ``(seed, epoch)`` (``set_epoch``),
    so loader workers can persist across epochs and a resumed run still sees
    the same order (DistributedSampler's idea, on one process).

    Under torchrun (``world`` > 1), rank r takes the r-th ``batch`` of every
    global batch of ``batch * world`` items of that permutation, so N processes
    see the global batches one process would (the last one is filled up from the
    start, as DistributedSampler pads): every rank takes the same number of steps.
    """

    def __init__(
        self, n: int, seed: int, shuffle: bool, rank: int = 0, world: int = 1,
        batch: int = 1,
    ) -> None:  # fmt: skip
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0
        self.rank, self.world, self.batch = rank, world, batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):  # type: ignore[no-untyped-def]
        if not self.shuffle:
            order = list(range(self.n))
        else:
            gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=gen).tolist()
        if self.world == 1:
            return iter(order)
        size = self.batch * self.world
        steps = -(-self.n // size)
        padded = (order * (steps * size // max(self.n, 1) + 1))[: steps * size]
        lo = self.rank * self.batch
        return iter(
            i
            for s in range(steps)
            for i in padded[s * size + lo : s * size + lo + self.batch]
        )

    def __len__(self) -> int:
        if self.world == 1:
            return self.n
        return -(-self.n // (self.batch * self.world)) * self.batch


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch: its shuffle, flips and masks depend on nothing else."""
    return (seed * 1_000_003 + epoch) % (2**63)
