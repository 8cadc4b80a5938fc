"""Reading a planned zone (:class:`catchment_mae.zones.Zone`) from its tiles:
the window of the mosaic, every pixel outside the polygon nodata (no torch).

The polygon's mask is a scanline fill over the sampled pixel centres; the
window is read tile by tile with ``read_raster(window=..., step=...)``, each
tile's share starting on the zone's own sampling steps, so a zone decimated
above the pixel budget takes the same pixels as its clipped file would.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from catchment_mae.budget import Budget
from catchment_mae.errors import BadRasterError
from catchment_mae.geotiff import chip_geo
from catchment_mae.pages import steps
from catchment_mae.raster import ALL_NODATA, Raster, RasterInfo, read_raster
from catchment_mae.zones import NO_CENTRE, Tile, Zone, require_shapely


def read_zone(
    root: str | os.PathLike[str],
    zone: Zone,
    *,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    max_pixels: int,
    max_memory_mb: int,
    in_chans: int | None = None,
    within: str | os.PathLike[str] | None = None,
) -> tuple[Raster, int]:
    """The zone's window of the mosaic, pixels outside its polygon invalid
    (what ``read_raster`` gives for the zone clipped to its own GeoTIFF), and
    how many of the pixels read lie inside the polygon.

    Raises:
        BadRasterError: naming the zone and why it cannot be read.
    """
    if zone.error is not None or zone.geo is None:
        raise BadRasterError(zone.key, zone.error or "was not planned")
    col, row, w, h = zone.window
    n = in_chans or (len(bands) if bands else 1)
    limit = min(max_pixels, Budget(max_memory_mb).pixels(n, 8, n))
    ky, kx = (1, 1) if w * h <= limit else steps(h, w, limit)
    inside = _inside(zone, ky, kx)
    if not inside.any():
        raise BadRasterError(zone.key, NO_CENTRE)
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    inside = inside[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    col, row = col + cols[0] * kx, row + rows[0] * ky
    w = min(w - cols[0] * kx, (cols[-1] - cols[0]) * kx + 1)
    h = min(h - rows[0] * ky, (rows[-1] - rows[0]) * ky + 1)
    data: np.ndarray | None = None
    valid = np.zeros(inside.shape, bool)
    first: Raster | None = None
    for tile in zone.tiles:
        part = _tile_part(tile, (col, row, w, h), ky, kx)
        if part is None:
            continue
        window, (i0, j0) = part
        try:
            r = read_raster(
                Path(root) / tile.rel, bands=bands, nodata=nodata,
                max_pixels=max_pixels, max_memory_mb=max_memory_mb,
                in_chans=in_chans, window=window, step=(ky, kx), within=within,
            )  # fmt: skip
        except BadRasterError as e:
            if e.reason == ALL_NODATA:  # empty tiles of a sparse file
                continue
            raise BadRasterError(zone.key, f"tile {tile.rel}: {e.reason}") from e
        if data is None:
            data = np.zeros((r.data.shape[0], *inside.shape), np.float32)
            first = r
        elif r.data.shape[0] != data.shape[0]:
            raise BadRasterError(zone.key, f"tile {tile.rel} has another band count")
        rh = min(r.valid.shape[0], inside.shape[0] - i0)
        rw = min(r.valid.shape[1], inside.shape[1] - j0)
        # Where tiles overlap (a pixel's border shared, nodata at a tile's
        # edge), a pixel holds the data of any tile that has it.
        has = r.valid[:rh, :rw]
        np.copyto(data[:, i0 : i0 + rh, j0 : j0 + rw], r.data[:, :rh, :rw], where=has)
        valid[i0 : i0 + rh, j0 : j0 + rw] |= has
    if data is None or first is None:
        raise BadRasterError(zone.key, "covers no pixel with data")
    valid &= inside
    info = RasterInfo(
        path=zone.key,
        height=h,
        width=w,
        bands=first.info.bands,
        dtype=first.info.dtype,
        nodata=first.info.nodata,
        read_height=inside.shape[0],
        read_width=inside.shape[1],
        level=-max(ky, kx) if max(ky, kx) > 1 else 0,
        geo=chip_geo(zone.geo, (col, row, w, h)),
    )
    return Raster(data=data, valid=valid, info=info), int(inside.sum())


def _inside(zone: Zone, ky: int, kx: int) -> np.ndarray:
    """Whether each sampled pixel centre of the zone's window lies inside (or
    on the edge of) its polygon: (rows, cols) bool."""
    shapely = require_shapely()
    assert zone.geo is not None and zone.geo.transform is not None
    c, a, _, f, _, e = zone.geo.transform
    col, row, w, h = zone.window
    rings = shapely.get_rings(shapely.get_parts(shapely.from_wkb(zone.wkb)))
    # Sampled pixel centre (i, j) at (j, i) in these coordinates.
    coords = [
        np.column_stack(
            [
                ((xy[:, 0] - c) / a - col - 0.5) / kx,
                ((xy[:, 1] - f) / e - row - 0.5) / ky,
            ]
        )
        for xy in (shapely.get_coordinates(r) for r in rings)
    ]
    return scanline(coords, -(-h // ky), -(-w // kx))


def scanline(rings: Sequence[np.ndarray], rows: int, cols: int) -> np.ndarray:
    """Which integer points (j, i) of a rows x cols grid lie inside the closed
    ``rings`` (even-odd: holes and several parts alike) or on one of their
    edges: (rows, cols) bool.

    A scanline fill: every edge crossing row i toggles the points right of it,
    then the points exactly on an edge are added. Its time is the crossings'
    plus the grid's, not points times vertices (testing each pixel centre
    against the polygon took two thirds of embed-zones' reading time).
    """
    toggles = np.zeros((rows, cols + 1), np.uint8)  # 1: an odd count of crossings
    on_edge: list[tuple[np.ndarray, np.ndarray]] = []
    for ring in rings:
        (s1, t1), (s2, t2) = ring[:-1].T, ring[1:].T
        lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
        first = np.clip(np.ceil(lo), 0, rows).astype(np.int64)  # rows lo <= i < hi
        last = np.clip(np.ceil(hi), 0, rows).astype(np.int64)
        n = np.maximum(last - first, 0)
        edge = np.repeat(np.arange(len(n)), n)
        i = first[edge] + np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        s = s1[edge] + (i - t1[edge]) * (s2[edge] - s1[edge]) / (t2[edge] - t1[edge])
        at = (i, np.clip(np.ceil(s), 0, cols).astype(np.int64))
        np.bitwise_xor.at(toggles, at, 1)
        exact = np.abs(s - np.rint(s)) < 1e-9  # a point on a sloping edge
        on_edge.append((i[exact], np.rint(s[exact]).astype(np.int64)))
        vertex = (np.abs(s1 - np.rint(s1)) < 1e-9) & (np.abs(t1 - np.rint(t1)) < 1e-9)
        on_edge.append(
            (np.rint(t1[vertex]).astype(np.int64), np.rint(s1[vertex]).astype(np.int64))
        )
        flat = (t1 == t2) & (np.abs(t1 - np.rint(t1)) < 1e-9)  # along a row
        for k in np.flatnonzero(flat):
            r = int(np.rint(t1[k]))
            j0 = max(int(np.ceil(min(s1[k], s2[k]) - 1e-9)), 0)
            j1 = min(int(np.floor(max(s1[k], s2[k]) + 1e-9)), cols - 1)
            if 0 <= r < rows and j0 <= j1:
                on_edge.append((np.full(j1 - j0 + 1, r), np.arange(j0, j1 + 1)))
    # Parity along each row, as uint8 (a sum in int32 took ten times longer).
    inside = np.bitwise_xor.accumulate(toggles, axis=1)[:, :cols].astype(bool)
    for i, j in on_edge:
        keep = (i >= 0) & (i < rows) & (j >= 0) & (j < cols)
        inside[i[keep], j[keep]] = True
    return inside


def _tile_part(
    tile: Tile, window: tuple[int, int, int, int], ky: int, kx: int
) -> tuple[tuple[int, int, int, int], tuple[int, int]] | None:
    """The tile's share of the sampled window: its window in the tile's pixels
    (from the first sampled pixel inside the tile) and where its first pixel
    goes in the sampled array (row, column); None when it holds none."""
    col, row, w, h = window
    span = []
    for start, length, t0, tlen, k in (
        (col, w, tile.col, tile.width, kx),
        (row, h, tile.row, tile.height, ky),
    ):
        lo, hi = max(start, t0), min(start + length, t0 + tlen)  # grid pixels
        first = start + -(-(lo - start) // k) * k  # sampled, on the zone's steps
        if first >= hi:
            return None
        span.append((first - t0, hi - first, (first - start) // k))
    (x0, ww, j0), (y0, hh, i0) = span
    return (x0, y0, ww, hh), (i0, j0)
