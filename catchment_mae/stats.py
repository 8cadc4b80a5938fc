"""Per-channel statistics of valid pixels, streamed over a directory (numpy only)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from catchment_mae.errors import BadRasterError, NoInputError
from catchment_mae.preprocess import check_usable
from catchment_mae.raster import (
    DEFAULT_MAX_MEMORY_MB,
    DEFAULT_MAX_PIXELS,
    find_tiffs,
    read_raster,
)

log = logging.getLogger(__name__)


@dataclass
class RunningStats:
    """Per-channel count, mean and M2, merged file by file (Chan et al., 1979).

    Exact for any number of files with O(channels) memory, and stable where a
    sum of squares in float64 would cancel (DEM altitudes in the thousands).
    """

    count: np.ndarray | None = None  # [C] int64
    mean: np.ndarray | None = None  # [C] float64
    m2: np.ndarray | None = None  # [C] float64

    def update(self, data: np.ndarray, valid: np.ndarray) -> None:
        """Adds the valid pixels of a (C, H, W) array."""
        vals = data[:, valid].astype(np.float64)  # [C, N]
        n = vals.shape[1]
        if n == 0:
            return
        mean = vals.mean(axis=1)
        self.merge(n, mean, np.sqrt(((vals - mean[:, None]) ** 2).sum(axis=1) / n))

    def merge(self, n: int, mean: np.ndarray, std: np.ndarray) -> None:
        """Adds a set of ``n`` pixels with per-channel ``mean`` and (population)
        ``std``: a raster's own statistics, as the training cache keeps them."""
        if n == 0:
            return
        mean = np.asarray(mean, np.float64)
        m2 = np.asarray(std, np.float64) ** 2 * n
        if self.count is None:
            self.count = np.full(len(mean), n, dtype=np.int64)
            self.mean, self.m2 = mean, m2
            return
        assert self.mean is not None and self.m2 is not None
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> np.ndarray:
        assert self.count is not None and self.m2 is not None
        return np.sqrt(self.m2 / self.count)


@dataclass
class ScanResult:
    """What a pass over a directory found."""

    files: list[Path] = field(default_factory=list)  # usable rasters, sorted
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    bands: int | None = None
    stats: RunningStats = field(default_factory=RunningStats)

    @property
    def mean(self) -> list[float]:
        assert self.stats.mean is not None
        return [float(v) for v in self.stats.mean]

    @property
    def std(self) -> list[float]:
        return [float(v) for v in self.stats.std]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "files": len(self.files),
            "failed": len(self.failed),
            "bands": self.bands,
            "failures": [{"path": p, "reason": r} for p, r in self.failed],
        }
        if self.stats.count is not None:
            out.update(
                mean=self.mean, std=self.std, valid_pixels=self.stats.count.tolist()
            )
        return out


def scan(
    paths: Iterable[str | os.PathLike[str]],
    *,
    bands: list[int] | None = None,
    nodata: float | None = None,
    in_chans: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_memory_mb: int = DEFAULT_MAX_MEMORY_MB,
    on_file: Callable[[Path, str | None], None] | None = None,
) -> ScanResult:
    """Reads every raster once: checks it, and merges its valid-pixel statistics.

    Only one raster is in memory at a time. A bad file is recorded with its reason
    and the pass goes on. ``in_chans`` (or, when None, the first good raster's band
    count) is the band count every raster must have.

    Args:
        on_file: called after each file with its path and the failure reason (or
            None): progress bars and strict modes hook in here.
    """
    result = ScanResult()
    for path in paths:
        path = Path(path)
        reason: str | None = None
        try:
            raster = read_raster(
                path,
                bands=bands,
                nodata=nodata,
                max_pixels=max_pixels,
                max_memory_mb=max_memory_mb,
            )
            check_usable(raster, in_chans if in_chans is not None else result.bands)
            result.stats.update(raster.data, raster.valid)
            result.files.append(path)
            result.bands = raster.data.shape[0]
        except BadRasterError as e:
            reason = e.reason
            result.failed.append((str(path), e.reason))
            log.warning("skipped %s", e)
        if on_file is not None:
            on_file(path, reason)
    return result


def scan_dir(
    input_dir: str | os.PathLike[str], recursive: bool = True, **kwargs: Any
) -> ScanResult:
    """:func:`scan` over the TIFFs of a directory; NoInputError when it has none."""
    paths = list(find_tiffs(input_dir, recursive=recursive))
    if not paths:
        raise NoInputError(f"{input_dir}: no .tif/.tiff files found")
    result = scan(paths, **kwargs)
    if not result.files:
        raise NoInputError(
            f"{input_dir}: none of the {len(paths)} TIFF file(s) could be used "
            f"(first: {result.failed[0][0]}: {result.failed[0][1]})"
        )
    return result
