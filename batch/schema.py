"""The embeddings table's schema: one :class:`Row` per raster (or chip), its
Arrow types, and the keys of the table's metadata. The reader fills rows,
the writer stores them, the runner and the plan read them back; none of them
spells a column but through this module. No torch here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pyarrow as pa

from catchment_mae.errors import CmaeError
from catchment_mae.geo import Footprint
from catchment_mae.io import text_path
from catchment_mae.raster import RasterInfo

# Keys of the table's key-value metadata (besides GeoParquet's "geo").
CMAE_VERSION = "cmae_version"  # the cmae that wrote it
FORMAT_VERSION = "cmae_format_version"  # of the encoder's metadata
MODEL = "model"  # the encoder's file name
MODEL_SHA256 = "model_sha256"  # the encoder's file: rows of two models never mix
MODEL_METADATA = "model_metadata"  # the encoder's own metadata (runtime.MetaKey)
CREATED = "created"  # when the run started (ISO 8601, UTC)
CHIP_GRID = "chip_grid"  # embed-dir --tile: how the chips were cut
LISTING = "listing"  # the folder, shard and depth the rows were listed from
ZONES = "zones"  # embed-zones: the zones file, its CRS and id column


def key_values(arrow_schema: pa.Schema) -> dict[str, str]:
    """A table's key-value metadata as text (the keys above, GeoParquet's
    "geo"); bytes that are not UTF-8 are replaced."""
    return {
        k.decode(errors="replace"): v.decode(errors="replace")
        for k, v in (arrow_schema.metadata or {}).items()
    }


def vectors(emb: pa.Array, where: object) -> pa.FixedSizeListArray:
    """An embedding column as embed-dir writes it (a fixed-size list of
    float32), also from a table another tool wrote again: pandas and DuckDB
    write lists without a fixed size. CmaeError, naming ``where``, when the
    column holds no lists of numbers or its rows differ in length (not one
    model's)."""
    import pyarrow.compute as pc

    kind = emb.type
    if pa.types.is_fixed_size_list(kind) and kind.value_type == pa.float32():
        return emb
    check_vectors(kind, where)
    if pa.types.is_fixed_size_list(kind):
        return emb.cast(pa.list_(pa.float32(), kind.list_size))
    lengths = pc.unique(pc.list_value_length(emb).drop_null()).to_pylist()
    if len(lengths) > 1:
        shown = ", ".join(map(str, sorted(lengths)[:4]))
        raise CmaeError(
            f"{where}: its embeddings differ in length ({shown}): not one model's"
        )
    return emb.cast(pa.list_(pa.float32(), lengths[0] if lengths else 0))


def check_vectors(kind: pa.DataType, where: object) -> None:
    """CmaeError, naming ``where``, unless an embedding column of type ``kind``
    holds lists of numbers."""
    t = pa.types
    lists = t.is_list(kind) or t.is_large_list(kind) or t.is_fixed_size_list(kind)
    if not lists or not (
        t.is_floating(kind.value_type) or t.is_integer(kind.value_type)
    ):
        raise CmaeError(f"{where}: its embedding column holds {kind}, not vectors")


BBOX = pa.struct([(k, pa.float64()) for k in ("xmin", "ymin", "xmax", "ymax")])


@dataclass
class Row:
    """One raster's row of the table, its embedding apart (this module owns
    the columns: readers fill a Row, nothing else spells them).

    A failed file has its path, what its ``stat`` gave and ``error``; every other
    field is None.
    """

    path: str  # relative to the input directory, forward slashes
    # A chip (embed-dir --tile): its place in the raster's grid and its pixel
    # window (full resolution); None in a table of whole rasters.
    tile_row: int | None = None
    tile_col: int | None = None
    x0: int | None = None
    y0: int | None = None
    tile_width: int | None = None
    tile_height: int | None = None
    height: int | None = None  # of the original raster
    width: int | None = None
    bands: int | None = None  # as stored, alpha excluded
    dtype: str | None = None
    nodata_fraction: float | None = None  # share of invalid pixels as read
    file_size: int | None = None
    mtime: float | None = None  # seconds since the epoch
    crs: str | None = None  # the native CRS as the file states it
    pixel_size_x: float | None = None  # native CRS units
    pixel_size_y: float | None = None
    geometry: bytes | None = None  # WKB Polygon in OGC:CRS84 (a chip's own)
    bbox: tuple[float, float, float, float] | None = None  # of geometry
    error: str | None = None  # why the file failed

    def __post_init__(self) -> None:
        self.path = text_path(self.path)  # a name that is not UTF-8: escaped

    @classmethod
    def of_raster(
        cls,
        path: str,
        info: RasterInfo,
        nodata_fraction: float,
        where: Footprint,
        stat: tuple[int | None, float | None] = (None, None),
    ) -> Row:
        """The row of a raster that was read (``stat``: its size and mtime)."""
        return cls(
            path=path,
            height=info.height,
            width=info.width,
            bands=info.bands,
            dtype=info.dtype,
            nodata_fraction=nodata_fraction,
            file_size=stat[0],
            mtime=stat[1],
            crs=where.crs,
            pixel_size_x=where.pixel_size_x,
            pixel_size_y=where.pixel_size_y,
            geometry=where.wkb,
            bbox=where.bbox,
        )


# Arrow types of Row's fields, in the table's order, with the embedding second.
TYPES: dict[str, pa.DataType] = {
    "path": pa.string(),
    "tile_row": pa.int32(),
    "tile_col": pa.int32(),
    "x0": pa.int64(),
    "y0": pa.int64(),
    "tile_width": pa.int32(),
    "tile_height": pa.int32(),
    "height": pa.int64(),
    "width": pa.int64(),
    "bands": pa.int32(),
    "dtype": pa.string(),
    "nodata_fraction": pa.float32(),
    "file_size": pa.int64(),
    "mtime": pa.timestamp("us", tz="UTC"),
    "crs": pa.string(),
    "pixel_size_x": pa.float64(),
    "pixel_size_y": pa.float64(),
    "geometry": pa.binary(),  # WKB Polygon, OGC:CRS84
    "bbox": BBOX,  # GeoParquet 1.1 covering of geometry
    "error": pa.string(),
}
ROW_FIELDS = tuple(f.name for f in dataclasses.fields(Row))
ROW_COLUMNS = ("embedding", *ROW_FIELDS)  # a table of zones adds the zones' own
VALID_FRACTION = "valid_fraction"  # a table of zones': 1 - nodata_fraction
assert ROW_FIELDS == tuple(TYPES), "Row and the schema must list the same columns"
TILE_FIELDS = ("tile_row", "tile_col", "x0", "y0", "tile_width", "tile_height")


def schema(dim: int, tiled: bool = False) -> pa.Schema:
    """The table's columns, in order (documented in the README); a table of
    chips has the tile columns after ``embedding``."""
    fields = [pa.field("path", pa.string(), nullable=False)]
    fields.append(pa.field("embedding", pa.list_(pa.float32(), dim)))
    fields += [
        pa.field(name, TYPES[name])
        for name in ROW_FIELDS[1:]
        if tiled or name not in TILE_FIELDS
    ]
    return pa.schema(fields)


def column(name: str, rows: list[Row]) -> pa.Array:
    values = [getattr(r, name) for r in rows]
    if name == "mtime":
        values = [None if v is None else int(v * 1e6) for v in values]
    elif name == "bbox":
        keys = ("xmin", "ymin", "xmax", "ymax")
        values = [
            None if v is None else dict(zip(keys, v, strict=True)) for v in values
        ]
    return pa.array(values, TYPES[name])
