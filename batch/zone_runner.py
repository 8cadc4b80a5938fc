"""``cmae embed-zones``: one embedding per polygon of a zones file, read from a
mosaic of raster tiles (no torch).

The run is embed-dir's (:func:`.runner.run_embedding`: the readers, the
model, the parts, resuming, sharding, Ctrl-C and the summary); only its work
differs: zones planned by :class:`.plan.ZonePlan` instead of files, each read
by :func:`catchment_mae.zones.read_zone` in a reader process. The table has
embed-dir's columns (``path`` holds the zone's key, ``geometry`` its polygon,
``nodata_fraction`` the share of its pixels without data), then the zones
file's own columns.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catchment_mae.batch import schema as table
from catchment_mae.batch.mapper import Mapper
from catchment_mae.batch.plan import ZonePlan, check_input
from catchment_mae.batch.reader import Item, failed_zone_row
from catchment_mae.batch.runner import How, Run, RunSummary, run_embedding
from catchment_mae.batch.schema import Row
from catchment_mae.batch.writer import (
    ROWS_PER_PART,
    PartSink,
    clear_parts,
    read_previous,
    remove_stale_temps,
)
from catchment_mae.raster import ALL_NODATA
from catchment_mae.workers import READ_TIMEOUT
from catchment_mae.zones import NO_CENTRE, Zone, ZoneFile, mosaic, read_zones

log = logging.getLogger(__name__)

ZONE_PREFIX = "zone_"  # a zones file's column named like one of ours
CHIP_MEAN = "the mean of its chips' embeddings, weighted by the zone's area in each"


def embed_zones(
    rasters: str | os.PathLike[str],
    zones: str | os.PathLike[str],
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    id_column: str | None = None,
    chips: int | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    device: str = "auto",
    shard: tuple[int, int] | None = None,
    recursive: bool = True,
    overwrite: bool = False,
    rows_per_part: int = ROWS_PER_PART,
    timeout: float | None = READ_TIMEOUT,
    within: str | os.PathLike[str] | None = None,
    on_item: Callable[[Item], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> RunSummary:
    """Embeds every polygon of ``zones`` from the tiles under ``rasters``.

    Running it again continues: zones embedded with the same model whose
    polygon is unchanged are kept; failed zones are tried again. The other
    arguments are embed_dir's.

    Args:
        rasters: a folder of tiles (a mosaic; tiles in several CRSs are
            grouped, each polygon read from the grid covering most of it), or
            one raster.
        zones: the polygons (GeoPackage, GeoJSON, Shapefile, FlatGeobuf,
            GeoParquet).
        id_column: the zones' column naming each (unique); default: the
            features' numbers from 1.
        chips: embed each zone larger than ``chips`` x ``chips`` grid pixels
            as chips of that size (read one at a time: memory stays flat
            however large the basin) and keep the mean of their embeddings,
            each weighted by the polygon's area inside it (ChipMean).

    Raises:
        NoInputError: no rasters, no zones (nothing is written).
        CmaeError: the zones cannot be used as asked (no such id column, ...).
        NothingEmbeddedError: every zone failed (the table is written).
        EmbedInterrupted: Ctrl-C or SIGTERM (the rows so far are kept).
    """
    source = Path(rasters)
    root = source.parent if source.is_file() else source
    check_input(root)
    zone_file = read_zones(zones, id_column)  # its errors before anything starts
    # A progress bar counts what is read: with chips, there is no total.
    how = How(batch_size, num_workers, device, overwrite, timeout, within,
              on_item, None if chips else on_total, unit="zone",
              combine=ChipMean() if chips else None)  # fmt: skip

    def start(mapper: Mapper, out: Path) -> Run:
        return start_zone_run(
            source, zone_file, out, mapper, overwrite, shard, recursive, within,
            rows_per_part, chips,
        )  # fmt: skip

    return run_embedding(root, model, Path(out), start, how)


def start_zone_run(
    source: Path,
    zones: ZoneFile,
    out: Path,
    mapper: Mapper,
    overwrite: bool,
    shard: tuple[int, int] | None,
    recursive: bool,
    within: str | os.PathLike[str] | None,
    rows_per_part: int,
    chips: int | None = None,
) -> Run:
    """What an embed-zones run starts from (runner.start_run's counterpart)."""
    fence = Path(within) if within is not None else None
    grids, skipped = mosaic(source, recursive, fence)
    for line in skipped:
        log.warning("not read as a tile: %s", line)
    real = zones.path.resolve()  # a descriptor's /proc path: the file's own
    listing = {
        "root": str(source.resolve()),
        "zones": str(real),
        "id": zones.id_column,
        "shard": list(shard) if shard else None,
        "recursive": recursive,
        "chips": chips,
    }
    recorded: dict[str, Any] = {
        "file": real.name,
        "crs": zones.crs,
        "id": zones.id_column,
    }
    if chips:
        recorded["chips"] = {"size": chips, "unit": "px", "embedding": CHIP_MEAN}
    metadata = {**mapper.metadata, table.LISTING: listing, table.ZONES: recorded}
    previous = None if overwrite else read_previous(out, mapper.sha256, None, listing)
    plan = ZonePlan(zones, grids, previous, shard, chips)
    if overwrite:
        clear_parts(out)
    remove_stale_temps(out)
    sink = PartSink(out, mapper.dim, metadata, rows_per_part)
    return Run(previous, plan, sink, plan, metadata, None, zone_columns(zones))


class ChipMean:
    """Combines the rows of a zone's chips, as they come in order, into the
    zone's row: the mean of their embeddings weighted by the polygon's area in
    each chip. Chips with no pixel of the zone (a sliver of its outline) or
    only nodata take no part; any other failure fails the zone with its
    reason (a mean of the chips that could be read would not be the zone's)."""

    SKIPPED = (NO_CENTRE, ALL_NODATA)

    def __init__(self) -> None:
        self.parts: list[tuple[Zone, Row, np.ndarray | None]] = []

    def __call__(
        self, zone: Any, row: Row, embedding: np.ndarray | None
    ) -> tuple[Row, np.ndarray | None] | None:
        if not isinstance(zone, Zone) or zone.part is None:
            return row, embedding
        self.parts.append((zone, row, embedding))
        if not zone.last:
            return None
        parts, self.parts = self.parts, []
        failed = [
            r.error for _, r, e in parts if e is None and r.error not in self.SKIPPED
        ]
        good = [(z.weight, r, e) for z, r, e in parts if e is not None]
        if failed or not good:
            reason = failed[0] if failed else (parts[0][1].error or NO_CENTRE)
            return failed_zone_row(parts[0][0], reason), None
        weights = np.array([w for w, _, _ in good], np.float64)
        weights /= weights.sum()
        mean = np.einsum("n,nd->d", weights, np.stack([e for _, _, e in good]))
        windows = [z.window for z, _, _ in parts]
        x0, y0 = min(w[0] for w in windows), min(w[1] for w in windows)
        x1 = max(w[0] + w[2] for w in windows)
        y1 = max(w[1] + w[3] for w in windows)
        nodata = float(
            sum(
                w * (r.nodata_fraction or 0.0)
                for w, (_, r, _) in zip(weights, good, strict=True)
            )
        )
        row = dataclasses.replace(
            good[0][1], height=y1 - y0, width=x1 - x0, nodata_fraction=nodata
        )
        return row, mean.astype(np.float32)


def zone_columns(zones: ZoneFile) -> Callable[[pa.Table], pa.Table]:
    """What adds ``valid_fraction`` and the zones file's own columns to the
    merged rows (by key), and says in its GeoParquet metadata that geometries
    are polygons or multipolygons."""
    position = {k: i for i, k in enumerate(zones.keys)}

    def add(result: pa.Table) -> pa.Table:
        take = pa.array(
            [position[k] for k in result.column("path").to_pylist()], pa.int64()
        )
        attributes = zones.attributes.take(take)
        # The share of the polygon's pixels with data (nodata_fraction's
        # complement), as users of zonal statistics look for it.
        nodata = result.column("nodata_fraction")
        result = result.append_column(
            table.VALID_FRACTION, pc.subtract(pa.scalar(1.0, pa.float32()), nodata)
        )
        for name in attributes.column_names:
            column = attributes.column(name)
            if isinstance(column.type, pa.ExtensionType):
                column = column.cast(column.type.storage_type)
            label = ZONE_PREFIX + name if name in result.column_names else name
            result = result.append_column(label, column)
        meta = dict(result.schema.metadata or {})
        geo: dict[str, Any] = json.loads(meta[b"geo"])
        if geo["columns"]["geometry"]["geometry_types"]:
            geo["columns"]["geometry"]["geometry_types"] = ["MultiPolygon", "Polygon"]
        meta[b"geo"] = json.dumps(geo).encode()
        return result.replace_schema_metadata(meta)

    return add
