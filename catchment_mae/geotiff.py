"""GeoTIFF tags: a raster's georeferencing and its size on the ground.

numpy only (with the tags tifffile parsed): the batch runner imports this
without torch. Malformed tags give no georeferencing, never an error: the
pixels are still read.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from catchment_mae.errors import BadRasterError

log = logging.getLogger(__name__)

# GeoTIFF keys and units (GeoTIFF 1.1 spec, section 7).
_USER_DEFINED = 32767
_LINEAR_UNITS_M = {9001: 1.0, 9002: 0.3048, 9003: 1200 / 3937, 9036: 1000.0}
_WEB_MERCATOR = {3857, 3785, 900913, 102100, 102113}


@dataclass
class GeoInfo:
    """Georeferencing read from GeoTIFF tags; all fields may be None."""

    crs: str | None = None  # "EPSG:32612", or the citation of a user-defined CRS
    epsg: int | None = None
    crs_kind: str | None = None  # "projected" | "geographic" | None
    linear_unit_m: float | None = None  # metres per CRS unit (projected CRS)
    pixel_size: tuple[float, float] | None = None  # (x, y) in CRS units, positive
    bounds: tuple[float, float, float, float] | None = None  # minx, miny, maxx, maxy
    transform: tuple[float, ...] | None = None  # GDAL order: c, a, b, f, d, e


def geo_info(page: Any, height: int, width: int) -> GeoInfo:
    """Georeferencing from the GeoTIFF tags; malformed tags give none (the
    pixels are still read), never an error."""
    try:
        return _parse_geo(page, height, width)
    except Exception as e:  # GeoKeys of any shape: no georeferencing, no failure
        log.debug("%s: unreadable georeferencing: %s", page.parent.filename, e)
        return GeoInfo()


def _parse_geo(page: Any, height: int, width: int) -> GeoInfo:
    tags = page.tags
    keys: dict[str, Any] = {}
    if 34735 in tags:
        try:
            keys = dict(page.geotiff_tags or {})
        except Exception as e:  # malformed GeoKeys must not lose the pixels
            log.debug("%s: unreadable GeoKeys: %s", page.parent.filename, e)
    transform = _transform(tags, keys)
    geo = GeoInfo()
    if transform is not None:
        c, a, b, f, d, e = transform
        if int(keys.get("GTRasterTypeGeoKey", 1)) == 2:  # PixelIsPoint: GDAL's shift
            c, f = c - 0.5 * a - 0.5 * b, f - 0.5 * d - 0.5 * e
        geo.transform = (c, a, b, f, d, e)
        geo.pixel_size = (math.hypot(a, d), math.hypot(b, e))
        xs = [
            c + a * i + b * j
            for i, j in ((0, 0), (width, 0), (0, height), (width, height))
        ]
        ys = [
            f + d * i + e * j
            for i, j in ((0, 0), (width, 0), (0, height), (width, height))
        ]
        geo.bounds = (min(xs), min(ys), max(xs), max(ys))
    model = int(keys.get("GTModelTypeGeoKey", 0) or 0)
    projected = int(keys.get("ProjectedCSTypeGeoKey", 0) or 0)
    geographic = int(keys.get("GeographicTypeGeoKey", 0) or 0)
    if model == 1:
        geo.crs_kind = "projected"
        unit = int(keys.get("ProjLinearUnitsGeoKey", 9001) or 9001)
        geo.linear_unit_m = _LINEAR_UNITS_M.get(unit)
        if projected and projected != _USER_DEFINED:
            geo.epsg = projected
    elif model == 2:
        geo.crs_kind = "geographic"
        if geographic and geographic != _USER_DEFINED:
            geo.epsg = geographic
    if geo.epsg is not None:
        geo.crs = f"EPSG:{geo.epsg}"
    elif geo.crs_kind is not None:
        citation = keys.get("PCSCitationGeoKey") or keys.get("GTCitationGeoKey")
        geo.crs = str(citation) if citation else "user-defined"
    return geo


def _transform(tags: Any, keys: dict[str, Any]) -> tuple[float, ...] | None:
    """The affine geotransform in GDAL order, from the GeoTIFF model tags; None
    when they are missing, too short, or not finite numbers."""
    m = _numbers(tags.get(34264))  # ModelTransformationTag
    if len(m) >= 8:
        t = (m[3], m[0], m[1], m[7], m[4], m[5])
        return t if all(math.isfinite(v) for v in t) else None
    scale = _numbers(tags.get(33550))  # ModelPixelScaleTag
    tie = _numbers(tags.get(33922))  # ModelTiepointTag
    if len(tie) < 6 or len(scale) < 2:
        return None
    sx, sy = scale[0], scale[1]
    i, j, _, x, y, _ = tie[:6]
    if not (sx > 0 and sy > 0) or not all(math.isfinite(v) for v in (i, j, x, y)):
        return None
    return (x - i * sx, sx, 0.0, y + j * sy, 0.0, -sy)


def _numbers(tag: Any) -> list[float]:
    """A numeric tag's values as floats (one value or many); [] when absent or
    not numbers."""
    if tag is None:
        return []
    try:
        return [float(v) for v in np.atleast_1d(np.asarray(tag.value, dtype=float))]
    except (TypeError, ValueError):
        return []


class Placed(Protocol):
    """What :func:`ground_extent_m` reads of a raster's info (raster.RasterInfo)."""

    path: str
    height: int
    width: int
    geo: GeoInfo


def ground_extent_m(info: Placed) -> tuple[float, float]:
    """The raster's (height, width) on the ground in metres.

    Projected CRS: pixel size times the CRS unit; Web Mercator is corrected by
    cos(latitude) at the raster's centre. Geographic CRS: degrees converted at the
    raster's centre latitude on the WGS84 ellipsoid.

    Raises:
        BadRasterError: without usable georeferencing.
    """
    geo = info.geo
    if geo.pixel_size is None or geo.bounds is None or geo.crs_kind is None:
        raise BadRasterError(
            info.path, "has no usable georeferencing (needed for --scale ground)"
        )
    px, py = geo.pixel_size
    h_units, w_units = info.height * py, info.width * px
    minx, miny, maxx, maxy = geo.bounds
    if geo.crs_kind == "geographic":
        lat = math.radians(min(max((miny + maxy) / 2, -90.0), 90.0))
        # Metres per degree on WGS84 (series expansion, accurate to ~1 cm).
        m_lat = 111132.92 - 559.82 * math.cos(2 * lat) + 1.175 * math.cos(4 * lat)
        m_lon = 111412.84 * math.cos(lat) - 93.5 * math.cos(3 * lat)
        return h_units * m_lat, w_units * abs(m_lon)
    if geo.linear_unit_m is None:
        raise BadRasterError(
            info.path,
            "has a projected CRS in an unknown unit (needed for --scale ground)",
        )
    h_m, w_m = h_units * geo.linear_unit_m, w_units * geo.linear_unit_m
    if geo.epsg in _WEB_MERCATOR:
        y = (miny + maxy) / 2 * geo.linear_unit_m
        y = min(max(y / 6378137.0, -700.0), 700.0)  # math.exp overflows past ~709
        lat = 2 * math.atan(math.exp(y)) - math.pi / 2
        h_m, w_m = h_m * math.cos(lat), w_m * math.cos(lat)
    if not (math.isfinite(h_m) and math.isfinite(w_m) and h_m > 0 and w_m > 0):
        raise BadRasterError(
            info.path, "has a ground size that is not a positive number (damaged "
            "georeferencing; needed for --scale ground)"
        )  # fmt: skip
    return h_m, w_m


def chip_geo(geo: GeoInfo, window: tuple[int, int, int, int]) -> GeoInfo:
    """The georeferencing of a chip: the transform moved to its corner."""
    if geo.transform is None:
        return geo
    x0, y0, w, h = window
    c, a, b, f, d, e = geo.transform
    c, f = c + a * x0 + b * y0, f + d * x0 + e * y0
    xs = [c + a * i + b * j for i, j in ((0, 0), (w, 0), (0, h), (w, h))]
    ys = [f + d * i + e * j for i, j in ((0, 0), (w, 0), (0, h), (w, h))]
    return dataclasses.replace(
        geo,
        transform=(c, a, b, f, d, e),
        bounds=(min(xs), min(ys), max(xs), max(ys)),
    )
