"""Nodata as GDAL reads and compares it."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def gdal_nodata(page: Any) -> float | None:
    tag = page.tags.get(42113)  # GDAL_NODATA, ASCII
    if tag is None:
        return None
    text = str(tag.value).strip().strip("\x00").strip()
    try:
        return float(text)
    except ValueError:
        log.warning(
            "%s: ignoring unparsable GDAL_NODATA %r", page.parent.filename, text
        )
        return None


def equals_nodata(arr: np.ndarray, value: float) -> np.ndarray | None:
    """Where ``arr`` holds ``value`` as GDAL compares it: cast to the data type,
    and for floats within GDAL's ``ARE_REAL_EQUAL`` (a few float32 steps, as
    ``|a - b| < 2 eps32 |a + b|``), so a float64 raster's overview that stores
    its nodata rounded through float32 (-1.2676506002282294e30 under a tag of
    -1.26765060000000006e30, rio-tiler's full-earth COG) is still nodata.

    Returns None when the value cannot occur in that type (e.g. -9999 in uint8),
    and for NaN, which the finite check covers.
    """
    if math.isnan(value):
        return None
    dt = arr.dtype
    if dt.kind in "iu":
        info = np.iinfo(dt)
        if value != int(value) if math.isfinite(value) else True:
            return None
        if not info.min <= value <= info.max:
            return None
        return arr == dt.type(int(value))
    if dt.kind == "f":
        with np.errstate(over="ignore"):
            cast = dt.type(value)
        if not np.isfinite(cast):
            return None
        tolerance = 4 * float(np.finfo(np.float32).eps) * abs(float(cast))
        if tolerance == 0:
            return arr == cast
        with np.errstate(over="ignore", invalid="ignore"):
            return np.abs(arr - cast) <= dt.type(tolerance)
    if dt.kind == "b":
        return arr == bool(value)
    return None
