"""A row of a cache shard, written by the reader process that read its raster
(the shards are memory-mapped ``.npy`` files; :mod:`catchment_mae.cache` owns
them)."""

from __future__ import annotations

import errno
import os
import zlib
from dataclasses import dataclass

import numpy as np

from catchment_mae.preprocess import Resampled


@dataclass(frozen=True)
class ShardTarget:
    """Where a reader process writes one raster: a row of a shard being built."""

    z: str  # the shard's .npy files (temporary names until committed)
    valid: str
    row: int


def write_row(target: ShardTarget, r: Resampled) -> int:
    """Writes ``r`` into its shard row; returns the row's CRC-32.

    Raises:
        OSError: the row's blocks cannot be had (the disk is full).
    """
    z, valid = _open_rw(target.z), _open_rw(target.valid)
    _reserve(target.z, z, target.row)
    _reserve(target.valid, valid, target.row)
    z[target.row] = r.z
    valid[target.row] = r.valid
    return zlib.crc32(valid[target.row], zlib.crc32(z[target.row]))


def _reserve(path: str, mm: np.memmap, row: int) -> None:
    """Reserves the blocks of ``row`` of the memory-mapped shard file, where the
    OS can: a full disk is then an OSError here, not a SIGBUS that kills the
    reader process at its first write (each raster was blamed on it). Only the
    rows written take space: a shard's rows of failed rasters stay holes."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, mm.offset + row * mm.strides[0], mm.strides[0])
    except OSError as e:  # a file system that cannot say: written as it comes
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
    finally:
        os.close(fd)


_rw: dict[str, np.memmap] = {}


def _open_rw(path: str) -> np.memmap:
    """A shard file opened for writing, kept open by this process (a few)."""
    mm = _rw.get(path)
    if mm is None:
        if len(_rw) >= 8:
            _rw.pop(next(iter(_rw)))
        mm = _rw[path] = np.lib.format.open_memmap(path, mode="r+")
    return mm


def forget(*paths: str | os.PathLike[str]) -> None:
    """Closes this process's maps of shard files (renamed or removed now)."""
    for path in paths:
        _rw.pop(str(path), None)
