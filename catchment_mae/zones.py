"""Zones (``cmae embed-zones``): one raster per polygon, cut from a mosaic of
tiles (no torch).

A user has basin outlines and a DEM mosaic. Each polygon is read as the
catchment it outlines would be if it had been clipped to its own GeoTIFF: the
smallest window of the mosaic's pixel grid holding every pixel whose centre lies
inside it (or on its edge), read from every tile it touches (only the strips or
tiles of that window are decoded), the pixels outside the polygon nodata. That
array goes through the one preprocessing path (:func:`catchment_mae.preprocess.
resample`), so its embedding is the one ``cmae embed-dir`` gives the clipped
file, and its ground extent is its scale input.

1. :func:`read_zones` reads the polygons (GeoPackage, GeoJSON, Shapefile,
   FlatGeobuf with pyogrio; GeoParquet with pyarrow), their attributes and CRS.
2. :func:`mosaic` reads the tiles' headers and groups them into grids: tiles of
   one CRS, pixel size and pixel phase (a mosaic's tiles share one).
3. :func:`plan_zone` repairs a polygon (``make_valid``), reprojects it to each
   grid, picks the grid that covers most of it (recorded in the row's ``crs``)
   and its window; what cannot be read is a reason.
4. :func:`catchment_mae.zone_reader.read_zone` (in reader processes) reads
   and masks the window.

Windows are read at full resolution, as embed-dir reads a clipped file without
overviews; above ``max_pixels`` (or the memory budget) every k-th row and
column of the window is read, as embed-dir decimates such a file.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from catchment_mae.errors import BadRasterError, CmaeError, NoInputError
from catchment_mae.raster import (
    GeoInfo,
    find_tiffs,
    header,
)

log = logging.getLogger(__name__)

ZONES_EXTRA = "pip install 'catchment-mae[zones]'"
CRS84 = "OGC:CRS84"
# Edges are cut into at least this many pieces before a polygon is reprojected
# to another CRS, so a long straight edge follows its true curve.
SEGMENTS = 256
GEOPARQUET_SUFFIXES = (".parquet", ".geoparquet")
NO_CENTRE = "covers no pixel centre of the rasters"


def require_shapely() -> Any:
    try:
        import shapely
    except ImportError as e:
        raise CmaeError(f"polygons need shapely: {ZONES_EXTRA}") from e
    return shapely


# ------------------------------------------------------------------ the zones
@dataclass
class ZoneFile:
    """The polygons of a zones file: one key (text) per feature, its geometry
    (WKB, in ``crs``) and the file's attribute columns, in the file's order."""

    path: Path
    crs: str  # as pyproj reads it (PROJJSON or WKT or "EPSG:n")
    keys: list[str]
    wkb: list[bytes | None]
    attributes: pa.Table
    id_column: str | None

    def __len__(self) -> int:
        return len(self.keys)


def read_zones(path: str | os.PathLike[str], id_column: str | None = None) -> ZoneFile:
    """Reads a zones file.

    Args:
        path: a GeoPackage, GeoJSON, Shapefile, FlatGeobuf (any format GDAL
            reads as vectors) or GeoParquet file.
        id_column: the attribute naming each polygon (unique, never empty);
            None: the features are numbered from 1 in the file's order.

    Raises:
        NoInputError: the file is missing, unreadable or holds no feature.
        CmaeError: the id column is missing, empty somewhere or not unique.
    """
    path = Path(path)
    if not path.exists():
        raise NoInputError(f"{path}: zones file does not exist")
    if _is_parquet(path):
        table, geometry, crs = _read_geoparquet(path)
    else:
        table, geometry, crs = _read_ogr(path)
    if table.num_rows == 0:
        raise NoInputError(f"{path}: holds no feature")
    wkb = table.column(geometry).to_pylist()
    attributes = table.drop_columns([geometry])
    if id_column is None:
        keys = [str(i + 1) for i in range(table.num_rows)]
    else:
        keys = _ids(path, attributes, id_column)
    return ZoneFile(path, crs, keys, wkb, attributes, id_column)


def _is_parquet(path: Path) -> bool:
    """By its first bytes (a file opened by descriptor has no suffix)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PAR1"
    except OSError:
        return path.suffix.lower() in GEOPARQUET_SUFFIXES


def _read_ogr(path: Path) -> tuple[pa.Table, str, str]:
    try:
        import pyogrio
    except ImportError as e:
        raise CmaeError(f"{path}: reading zones needs pyogrio: {ZONES_EXTRA}") from e
    try:
        with warnings.catch_warnings():  # GDAL's remarks (a file's name) are not ours
            warnings.simplefilter("ignore", RuntimeWarning)
            meta, table = pyogrio.read_arrow(path)
    except Exception as e:  # pyogrio's DataSourceError and GDAL's own
        raise NoInputError(f"{path}: {_ogr_reason(e, path)}") from e
    geometry = next(
        (
            f.name
            for f in table.schema
            if (f.metadata or {}).get(b"ARROW:extension:name") == b"geoarrow.wkb"
        ),
        meta.get("geometry_name") or "wkb_geometry",
    )
    if geometry not in table.column_names:
        raise NoInputError(f"{path}: holds no geometry column")
    if not meta.get("crs"):
        raise NoInputError(f"{path}: states no CRS (a .prj beside a Shapefile, say)")
    return table, geometry, str(meta["crs"])


def _read_geoparquet(path: Path) -> tuple[pa.Table, str, str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # ArrowInvalid, OSError: not Parquet
        raise NoInputError(
            f"{path}: cannot read as GeoParquet: {_first_line(e)}"
        ) from e
    try:
        geo = json.loads((table.schema.metadata or {})[b"geo"])
        geometry = geo["primary_column"]
        column = geo["columns"][geometry]
    except (KeyError, TypeError, ValueError) as e:
        raise NoInputError(f"{path}: Parquet without GeoParquet metadata") from e
    if column.get("encoding", "WKB").upper() != "WKB":
        raise NoInputError(f"{path}: geometry encoded as {column['encoding']}, not WKB")
    crs = column.get("crs", CRS84)  # GeoParquet: absent means OGC:CRS84
    if crs is None:
        raise NoInputError(f"{path}: its geometry has no CRS")
    return table, geometry, crs if isinstance(crs, str) else json.dumps(crs)


def _ids(path: Path, attributes: pa.Table, id_column: str) -> list[str]:
    if id_column not in attributes.column_names:
        names = ", ".join(attributes.column_names) or "none"
        raise CmaeError(f"{path}: no column {id_column!r} (columns: {names})")
    values = attributes.column(id_column).to_pylist()
    keys = ["" if v is None else str(v) for v in values]
    if "" in keys:
        raise CmaeError(
            f"{path}: column {id_column!r} is empty in feature {keys.index('') + 1}"
        )
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        twice = next(k for k in keys if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise CmaeError(f"{path}: column {id_column!r} is not unique ({twice!r} twice)")
    return keys


def _ogr_reason(e: BaseException, path: Path) -> str:
    """Why GDAL could not read a zones file, in our words (its own text names
    the file again and suggests driver prefixes)."""
    text = _first_line(e)
    if "not recognized as being in a supported file format" in text:
        return (
            "not a zones file (GeoPackage, GeoJSON, Shapefile, FlatGeobuf, another "
            "vector format GDAL reads, or GeoParquet)"
        )
    text = text.replace(f"'{path}'", "").replace(str(path), "").split(";")[0]
    return f"cannot read as polygons: {text.strip(' :.') or type(e).__name__}"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ------------------------------------------------------------------ the mosaic
@dataclass(frozen=True)
class Tile:
    """One tile of a grid: its file and its place in the grid's pixels."""

    rel: str
    col: int  # of its first pixel, in the grid
    row: int
    width: int
    height: int


@dataclass
class Grid:
    """Tiles of one CRS, pixel size and phase; pixels counted from the first
    tile's corner (``geo`` is that tile's georeferencing)."""

    crs: str
    geo: GeoInfo
    tiles: list[Tile] = field(default_factory=list)
    _tree: Any = None

    @property
    def transform(self) -> tuple[float, ...]:
        assert self.geo.transform is not None
        return self.geo.transform

    def place(self, transform: tuple[float, ...]) -> tuple[int, int] | None:
        """Where a tile with ``transform`` starts in this grid's pixels, or None
        when it is not on this grid."""
        c, a, _, f, _, e = self.transform
        c2, a2, b2, f2, d2, e2 = transform
        if (
            b2
            or d2
            or not (
                math.isclose(a, a2, rel_tol=1e-9) and math.isclose(e, e2, rel_tol=1e-9)
            )
        ):
            return None
        col, row = (c2 - c) / a, (f2 - f) / e
        if abs(col - round(col)) > 1e-3 or abs(row - round(row)) > 1e-3:
            return None
        return round(col), round(row)

    def boxes(self) -> Any:
        """The tiles' outlines in the grid's CRS, and an STRtree over them."""
        if self._tree is None:
            shapely = require_shapely()
            c, a, _, f, _, e = self.transform
            outlines = [
                shapely.box(
                    c + a * t.col,
                    f + e * (t.row + t.height),
                    c + a * (t.col + t.width),
                    f + e * t.row,
                )  # fmt: skip
                for t in self.tiles
            ]
            self._tree = shapely.STRtree(outlines)
        return self._tree


def mosaic(
    source: Path, recursive: bool = True, within: Path | None = None
) -> tuple[list[Grid], list[str]]:
    """The grids of the TIFFs under the folder ``source`` (or of the one TIFF
    ``source``) from their headers, most tiles first, tiles named relative to
    the folder (the TIFF's); and one line for each file that cannot take part
    (no georeferencing, a rotated grid, an unreadable header).

    Raises:
        NoInputError: no georeferenced TIFF there.
    """
    grids: list[Grid] = []
    skipped: list[str] = []
    one = source.is_file()
    root = source.parent if one else source
    paths = [source] if one else find_tiffs(root, recursive, within=within)
    for path in paths:
        rel = path.relative_to(root).as_posix()
        try:
            height, width, _, geo = header(path, within)
        except BadRasterError as e:
            skipped.append(f"{rel}: {e.reason}")
            continue
        t = geo.transform
        if t is None or geo.crs is None or geo.pixel_size is None:
            skipped.append(f"{rel}: has no georeferencing")
            continue
        if t[2] or t[4]:
            skipped.append(f"{rel}: a rotated grid is not read as a mosaic tile")
            continue
        for grid in grids:
            at = grid.place(t) if grid.crs == geo.crs else None
            if at is not None:
                grid.tiles.append(Tile(rel, at[0], at[1], width, height))
                break
        else:
            grids.append(Grid(geo.crs, geo, [Tile(rel, 0, 0, width, height)]))
    if not grids and one:
        why = skipped[0].split(": ", 1)[-1] if skipped else "not a georeferenced TIFF"
        raise NoInputError(f"{source}: {why}")
    if not grids:
        raise NoInputError(f"{root}: no georeferenced .tif/.tiff files found")
    return sorted(grids, key=lambda g: -len(g.tiles)), skipped


# ------------------------------------------------------------ planning a zone
@dataclass(frozen=True)
class Zone:
    """One polygon's work: where to read it (a window of a grid and the tiles
    it touches), its outline there (WKB) and in OGC:CRS84 for its row; or why
    it cannot be read (``error``)."""

    key: str
    wkb84: bytes | None = None
    bbox84: tuple[float, float, float, float] | None = None
    error: str | None = None
    crs: str | None = None
    geo: GeoInfo | None = None  # the grid's
    tiles: tuple[Tile, ...] = ()
    window: tuple[int, int, int, int] = (0, 0, 0, 0)  # col, row, width, height
    wkb: bytes | None = None  # in the grid's CRS
    # One chip of the zone (embed-zones --chips): its place among the zone's
    # chips, and the polygon's area inside it (its weight in the zone's mean).
    part: int | None = None
    parts: int = 1
    weight: float = 1.0

    @property
    def last(self) -> bool:
        """The zone's last chip (or the zone itself, read whole)."""
        return self.part is None or self.part == self.parts - 1

    @property
    def fingerprint(self) -> str:
        """What a row keeps of its zone: its outline (an edited polygon is
        embedded again)."""
        return hashlib.sha1(self.wkb84 or b"").hexdigest()


@functools.lru_cache(maxsize=64)
def _transformer(src: str, dst: str) -> Any:
    from pyproj import Transformer

    return Transformer.from_crs(src, dst, always_xy=True)


def _reproject(geom: Any, src: str, dst: str) -> Any:
    shapely = require_shapely()
    if src == dst:
        return geom
    xmin, ymin, xmax, ymax = shapely.bounds(geom)
    step = math.hypot(xmax - xmin, ymax - ymin) / SEGMENTS
    if step > 0:
        geom = shapely.segmentize(geom, step)
    out = shapely.transform(geom, _transformer(src, dst).transform, interleaved=False)
    if not np.isfinite(shapely.get_coordinates(out)).all():
        raise ValueError("outside the CRS's area of use")
    return out


def polygonal(geom: Any) -> tuple[Any, str | None]:
    """The polygonal part of a geometry, repaired (``make_valid``), or None and
    why it has none."""
    shapely = require_shapely()
    if geom is None or shapely.is_empty(geom):
        return None, "has an empty geometry"
    if not shapely.is_valid(geom):
        geom = shapely.make_valid(geom)
    parts = [p for p in shapely.get_parts(geom) if shapely.get_type_id(p) in (3, 6)]
    parts = [q for p in parts for q in shapely.get_parts(p)]  # multipolygons apart
    parts = [p for p in parts if shapely.area(p) > 0]
    if not parts:
        kind = shapely.get_type_id(geom)
        if kind not in (3, 6, 7):  # a point or line: no polygon to repair
            return None, f"is a {geom.geom_type}, not a polygon"
        return None, "is not a polygon (no area once repaired)"
    if len(parts) == 1:
        return parts[0], None
    return shapely.multipolygons(parts), None


def plan_zone(key: str, wkb: bytes | None, src_crs: str, grids: Sequence[Grid]) -> Zone:
    """Where and how a zone is read (or why it cannot be)."""
    shapely = require_shapely()
    try:
        geom = shapely.from_wkb(wkb) if wkb is not None else None
    except Exception as e:  # GEOSException: not WKB
        return Zone(key, error=f"has a geometry that cannot be read ({_first_line(e)})")
    geom, reason = polygonal(geom)
    if geom is None:
        return Zone(key, error=reason)
    try:
        g84 = shapely.orient_polygons(_reproject(geom, src_crs, CRS84))
    except Exception as e:  # PROJ errors, a CRS it cannot use
        return Zone(key, error=f"cannot be reprojected to OGC:CRS84 ({_first_line(e)})")
    wkb84, bbox84 = shapely.to_wkb(g84), tuple(float(v) for v in shapely.bounds(g84))
    best: tuple[float, Grid, Any] | None = None
    for grid in grids:
        try:
            g = _reproject(geom, src_crs, grid.crs)
        except Exception:  # outside this CRS's area: another grid may hold it
            continue
        tree = grid.boxes()
        hits = tree.query(g, predicate="intersects")
        if len(hits) == 0:
            continue
        covered = float(
            np.sum(shapely.area(shapely.intersection(tree.geometries[hits], g)))
        )
        if best is None or covered / shapely.area(g) > best[0] + 1e-9:
            best = (covered / shapely.area(g), grid, g)
    if best is None:
        return Zone(key, wkb84, bbox84, error="lies outside the rasters")
    _, grid, g = best
    window = _window(g, grid)
    if window is None:
        return Zone(key, wkb84, bbox84, error=NO_CENTRE)
    tiles = tuple(t for t in grid.tiles if _overlaps(t, window))
    return Zone(
        key, wkb84, bbox84, None, grid.crs, grid.geo, tiles, window, shapely.to_wkb(g)
    )


def _window(geom: Any, grid: Grid) -> tuple[int, int, int, int] | None:
    """The grid pixels whose centres may lie inside ``geom`` (its bounds),
    within the grid's tiles: (col, row, width, height), or None."""
    c, a, _, f, _, e = grid.transform
    xmin, ymin, xmax, ymax = require_shapely().bounds(geom)
    cols = sorted(((xmin - c) / a - 0.5, (xmax - c) / a - 0.5))
    rows = sorted(((ymin - f) / e - 0.5, (ymax - f) / e - 0.5))
    col0, col1 = math.ceil(cols[0]), math.floor(cols[1])
    row0, row1 = math.ceil(rows[0]), math.floor(rows[1])
    col0 = max(col0, min(t.col for t in grid.tiles))
    row0 = max(row0, min(t.row for t in grid.tiles))
    col1 = min(col1, max(t.col + t.width for t in grid.tiles) - 1)
    row1 = min(row1, max(t.row + t.height for t in grid.tiles) - 1)
    if col1 < col0 or row1 < row0:
        return None
    return col0, row0, col1 - col0 + 1, row1 - row0 + 1


def iter_zones(zones: ZoneFile, grids: Sequence[Grid]) -> Iterator[Zone]:
    """Every zone of the file, planned, in the file's order."""
    for key, wkb in zip(zones.keys, zones.wkb, strict=True):
        yield plan_zone(key, wkb, zones.crs, grids)


def zone_chips(zone: Zone, size: int) -> list[Zone]:
    """A planned zone cut into chips of ``size`` x ``size`` grid pixels (edge
    chips shifted inside, as embed-dir --tile cuts a raster), those that
    overlap its polygon, each weighted by the polygon's area inside it; the
    zone itself when it fails or fits in one chip."""
    from catchment_mae.chips import grid

    col, row, w, h = zone.window
    if zone.error is not None or (w <= size and h <= size):
        return [zone]
    shapely = require_shapely()
    assert zone.geo is not None and zone.geo.transform is not None
    c, a, _, f, _, e = zone.geo.transform
    geom = shapely.from_wkb(zone.wkb)
    windows, weights = [], []
    for y in grid(h, size, size):
        for x in grid(w, size, size):
            cw, ch = min(size, w), min(size, h)
            x0, y0 = col + x, row + y
            box = shapely.box(
                c + a * x0, f + e * (y0 + ch), c + a * (x0 + cw), f + e * y0
            )
            area = float(shapely.area(shapely.intersection(box, geom)))
            if area > 0:
                windows.append((x0, y0, cw, ch))
                weights.append(area)
    tiles = zone.tiles
    return [
        dataclasses.replace(
            zone,
            window=window,
            part=i,
            parts=len(windows),
            weight=weight,
            tiles=tuple(t for t in tiles if _overlaps(t, window)),
        )  # fmt: skip
        for i, (window, weight) in enumerate(zip(windows, weights, strict=True))
    ]


def _overlaps(tile: Tile, window: tuple[int, int, int, int]) -> bool:
    col, row, w, h = window
    return (
        tile.col < col + w and col < tile.col + tile.width
        and tile.row < row + h and row < tile.row + tile.height
    )  # fmt: skip
