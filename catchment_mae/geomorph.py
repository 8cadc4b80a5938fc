"""Terrain numbers computed by hand: a catchment's attributes, and the simple
features that ``cmae eval --baseline`` sets beside an embedding.

Both work on the ground: every slope and area uses the raster's true pixel
spacing in metres (the ground rule of ``--scale ground``), never its pixel
counts alone. numpy only.

Attributes (the labels of the real-terrain benchmark, :mod:`catchment_mae.catchments`):
``log10_area_km2``, ``mean_slope`` (mean gradient magnitude, m/m),
``log10_slope``, ``mean_elevation``, ``relief`` (max - min),
``elongation`` (Schumm's ratio: the diameter of the circle of the basin's area
over the basin's length, the longest distance from its outlet) and
``hypsometric_integral`` ((mean - min) / relief).

Baseline features (24 numbers per raster, :func:`handmade_features`): the log
valid pixel count, the log bounding-box height and width in pixels, elevation
mean, std, 5th and 95th percentiles, a 16-bin histogram of the slopes between
neighbouring pixels (their absolute difference over their distance on the
ground; log-spaced bins, shares summing to 1) and the log pixel size in metres.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from catchment_mae.errors import BadRasterError
from catchment_mae.raster import Raster, ground_extent_m

ATTRIBUTES = (
    "log10_area_km2", "mean_slope", "log10_slope", "mean_elevation", "relief",
    "elongation", "hypsometric_integral",
)  # fmt: skip
# Slopes between neighbours from 1e-4 to 10 m/m, log-spaced; the outer bins take
# the rest.
SLOPE_EDGES = np.concatenate([[0.0], np.logspace(-4, 1, 15), [np.inf]])
FEATURES = (
    "log_valid_pixels", "log_height_px", "log_width_px", "mean", "std", "p5", "p95",
    *(f"slope_hist_{i:02d}" for i in range(len(SLOPE_EDGES) - 1)),
    "log_pixel_m",
)  # fmt: skip


def spacing_m(raster: Raster) -> tuple[float, float]:
    """(metres per pixel down, across) of a raster as read (an overview or a
    decimated read has larger pixels than the file's)."""
    h_m, w_m = ground_extent_m(raster.info)
    h, w = raster.data.shape[-2:]
    return h_m / h, w_m / w


# Rows of a raster whose slopes are computed at once: the temporaries of a strip
# stay a few MB however large the raster (the reader's memory budget holds).
SLOPE_STRIP_ROWS = 256


def slope(
    z: np.ndarray, valid: np.ndarray, dy: float, dx: float, dtype: Any = np.float64
) -> np.ndarray:
    """Gradient magnitude (m/m) by central differences (one-sided at the edges),
    as ``dtype``; NaN where a neighbour it needs is nodata. Computed in strips of
    rows, so its temporaries are a strip's, not the raster's."""
    h, w = z.shape
    out = np.full((h, w), np.nan, dtype)
    if h < 2 or w < 2:
        return out
    for top in range(0, h, SLOPE_STRIP_ROWS):
        lo, hi = max(top - 1, 0), min(top + SLOPE_STRIP_ROWS + 1, h)
        zz = np.where(valid[lo:hi], z[lo:hi].astype(dtype), np.nan)
        with np.errstate(invalid="ignore"):
            gy, gx = np.gradient(zz, dy, dx)
            strip = np.hypot(gy, gx)
        end = min(top + SLOPE_STRIP_ROWS, h)
        out[top:end] = strip[top - lo : top - lo + end - top]
    return out


def attributes(
    z: np.ndarray,
    valid: np.ndarray,
    dy: float,
    dx: float,
    outlet: tuple[int, int] | None = None,
) -> dict[str, float]:
    """A catchment's attributes (module docstring) from its elevations (H, W) and
    validity; ``outlet`` (row, column) is where its length is measured from (the
    lowest valid pixel when None)."""
    vals = z[valid].astype(np.float64)
    if vals.size == 0:
        raise ValueError("no valid pixel")
    area_m2 = vals.size * dy * dx
    s = slope(z, valid, dy, dx)
    mean_slope = float(np.nanmean(s)) if np.isfinite(s).any() else 0.0
    lo, hi, mean = float(vals.min()), float(vals.max()), float(vals.mean())
    rows, cols = np.nonzero(valid)
    if outlet is None:
        k = int(np.argmin(vals))
        outlet = (int(rows[k]), int(cols[k]))
    length = float(np.hypot((rows - outlet[0]) * dy, (cols - outlet[1]) * dx).max())
    length = max(length, math.sqrt(dy * dx))  # one pixel at least
    return {
        "log10_area_km2": math.log10(area_m2 / 1e6),
        "mean_slope": mean_slope,
        "log10_slope": math.log10(max(mean_slope, 1e-6)),
        "mean_elevation": mean,
        "relief": hi - lo,
        "elongation": 2.0 * math.sqrt(area_m2 / math.pi) / length,
        "hypsometric_integral": (mean - lo) / (hi - lo) if hi > lo else 0.5,
    }


def handmade_features(raster: Raster) -> np.ndarray:
    """The baseline's 24 numbers for one raster (first band), float64.

    A raster without usable georeferencing has no pixel size: its last feature
    is NaN (the caller decides; ``cmae eval`` fills such columns)."""
    z, valid = raster.data[0].astype(np.float64), raster.valid
    vals = z[valid]
    if vals.size == 0:
        raise BadRasterError(raster.info.path, "has no valid pixel")
    rows, cols = np.nonzero(valid)
    height = rows.max() - rows.min() + 1
    width = cols.max() - cols.min() + 1
    try:
        dy, dx = spacing_m(raster)
        log_pixel = math.log(math.sqrt(dy * dx))
    except BadRasterError:  # slopes in elevation units per pixel
        dy = dx = 1.0
        log_pixel = math.nan
    rise = [
        np.abs(np.diff(z, axis=0))[valid[:-1, :] & valid[1:, :]] / dy,
        np.abs(np.diff(z, axis=1))[valid[:, :-1] & valid[:, 1:]] / dx,
    ]
    s = np.concatenate(rise)
    hist = np.histogram(s, SLOPE_EDGES)[0] / max(s.size, 1)
    p5, p95 = np.percentile(vals, [5, 95])
    return np.array(
        [
            math.log(vals.size), math.log(height), math.log(width),
            vals.mean(), vals.std(), p5, p95, *hist, log_pixel,
        ],
        dtype=np.float64,
    )  # fmt: skip
