"""Footprints for the embeddings table: the raster's outline in OGC:CRS84 as WKB.

An archive mixes UTM zones, so each footprint is reprojected (pyproj) to
longitude/latitude; the edges are densified first so a long edge stays close to
its true curve after reprojection. The result, with the GeoParquet 1.1 ``geo``
metadata of :func:`geoparquet_metadata`, is read as geometry by
``geopandas.read_parquet`` and DuckDB. numpy + pyproj only (no torch).

A raster without georeferencing, or whose CRS PROJ cannot resolve, gets no
footprint (nulls in the table), never an error.
"""

from __future__ import annotations

import functools
import logging
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from catchment_mae.raster import GeoInfo

log = logging.getLogger(__name__)

FOOTPRINT_CRS = "OGC:CRS84"  # longitude, latitude on WGS84
POINTS_PER_EDGE = 8  # segments each raster edge is cut into before reprojecting


@dataclass
class Footprint:
    """What the table holds about where a raster lies."""

    crs: str | None = None  # native CRS as read ("EPSG:32633", a citation, ...)
    pixel_size_x: float | None = None  # native CRS units
    pixel_size_y: float | None = None
    wkb: bytes | None = None  # Polygon in OGC:CRS84
    bbox: tuple[float, float, float, float] | None = None  # of wkb: x/y min, max


def footprint(geo: GeoInfo, height: int, width: int) -> Footprint:
    """The footprint of a ``height`` x ``width`` raster with georeferencing ``geo``."""
    fp = Footprint(crs=geo.crs)
    if geo.pixel_size is not None:
        fp.pixel_size_x, fp.pixel_size_y = (float(v) for v in geo.pixel_size)
    if geo.transform is None or geo.crs is None:
        return fp
    transformer = _to_crs84(geo.crs)
    if transformer is None:
        return fp
    with np.errstate(all="ignore"):  # an infinite pixel scale: inf * 0
        ring = _ring(geo.transform, height, width)
    if not np.isfinite(ring).all():
        log.debug("footprint in %s: corners not finite: none", geo.crs)
        return fp
    try:
        lon, lat = transformer.transform(ring[:, 0], ring[:, 1], errcheck=True)
    except Exception as e:  # outside the CRS's area, PROJ errors: no footprint
        log.debug("footprint in %s failed: %s", geo.crs, e)
        return fp
    xy = np.column_stack([lon, lat]).astype(np.float64)
    if not _on_earth(xy):  # e.g. pixel coordinates tagged as EPSG:4326
        log.debug("footprint in %s is not on the globe: none", geo.crs)
        return fp
    if _signed_area(xy) < 0:
        xy = xy[::-1]  # exterior ring counter-clockwise (GeoParquet orientation)
    fp.wkb = polygon_wkb(xy)
    fp.bbox = (
        float(xy[:, 0].min()),
        float(xy[:, 1].min()),
        float(xy[:, 0].max()),
        float(xy[:, 1].max()),
    )
    return fp


def polygon_wkb(ring: np.ndarray) -> bytes:
    """ISO WKB (little-endian) of a one-ring Polygon; ``ring`` is closed, (n, 2)."""
    return struct.pack("<BIII", 1, 3, 1, len(ring)) + ring.astype("<f8").tobytes()


def geoparquet_metadata(
    bbox: tuple[float, float, float, float] | None,
) -> dict[str, Any]:
    """The GeoParquet 1.1 ``geo`` metadata of the ``geometry`` column whose
    footprints together cover ``bbox`` (None: every footprint is null)."""
    column: dict[str, Any] = {
        "encoding": "WKB",
        "geometry_types": ["Polygon"] if bbox else [],
        "crs": _crs84_projjson(),
        "orientation": "counterclockwise",
        "edges": "planar",
        "covering": {
            "bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}
        },
    }
    if bbox:
        column["bbox"] = [float(v) for v in bbox]
    return {
        "version": "1.1.0",
        "primary_column": "geometry",
        "columns": {"geometry": column},
    }


def _ring(transform: tuple[float, ...], height: int, width: int) -> np.ndarray:
    """The raster's outline in its CRS, densified, closed: (4 * n + 1, 2)."""
    c, a, b, f, d, e = transform
    t = np.linspace(0.0, 1.0, POINTS_PER_EDGE, endpoint=False)
    cols = np.concatenate([t * width, np.full_like(t, width), (1 - t) * width, 0 * t])
    rows = np.concatenate(
        [0 * t, t * height, np.full_like(t, height), (1 - t) * height]
    )
    cols, rows = np.append(cols, cols[0]), np.append(rows, rows[0])
    return np.column_stack([c + a * cols + b * rows, f + d * cols + e * rows])


def _on_earth(xy: np.ndarray) -> bool:
    tol = 1e-6
    return bool(
        np.isfinite(xy).all()
        and (np.abs(xy[:, 0]) <= 180 + tol).all()
        and (np.abs(xy[:, 1]) <= 90 + tol).all()
    )


def _signed_area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


@functools.lru_cache(maxsize=256)
def _to_crs84(crs: str) -> Any:
    """A cached transformer from ``crs`` to OGC:CRS84, or None when unresolvable.

    A CRS on WGS 84 (UTM zones, Web Mercator, ...) goes to its own geographic CRS
    (axes as OGC:CRS84), which needs no search for a datum transformation:
    about a sixth of the time a zone, which an archive spread over many zones
    pays in every reader process.
    """
    try:
        from pyproj import CRS, Transformer
        from pyproj.exceptions import ProjError
    except ImportError:  # pyproj is in the base install; be safe anyway
        log.warning("pyproj is not installed: no footprints in the table")
        return None
    try:
        source = CRS.from_user_input(crs)
        geodetic = source.geodetic_crs
        target: Any = FOOTPRINT_CRS
        if geodetic is not None and geodetic.equals(_wgs84(), ignore_axis_order=True):
            target = geodetic
        return Transformer.from_crs(source, target, always_xy=True)
    except (ProjError, RecursionError, ValueError) as e:
        # CRSError is a ProjError; user-defined CRSs raise others, and a
        # citation of JSON nested 1,200 deep made pyproj's parser recurse out.
        log.debug("CRS %.80r cannot be resolved: no footprint (%s)", crs, e)
        return None


@functools.cache
def _wgs84() -> Any:
    from pyproj import CRS

    return CRS("EPSG:4326")


@functools.cache
def _crs84_projjson() -> dict[str, Any] | None:
    try:
        from pyproj import CRS
    except ImportError:
        return None  # GeoParquet: a missing crs means OGC:CRS84 anyway
    return CRS(FOOTPRINT_CRS).to_json_dict()
