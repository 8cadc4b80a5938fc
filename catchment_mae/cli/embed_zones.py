"""``cmae embed-zones``: one embedding per polygon, from a mosaic of tiles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from catchment_mae.cli import options
from catchment_mae.cli.embed_dir import _total_of, report, with_bar


@click.command(
    "embed-zones",
    short_help="Embed each polygon of a zones file from a raster mosaic (no torch).",
)
@click.argument("rasters", type=click.Path(path_type=Path))
@click.option(
    "--zones",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The polygons: GeoPackage, GeoJSON, Shapefile, FlatGeobuf or GeoParquet.",
)
@click.option(
    "--id",
    "id_column",
    metavar="COLUMN",
    help="The zones' column naming each polygon (unique); it becomes the row's "
    "path. Default: the features' numbers from 1.",
)
@click.option(
    "--chips",
    type=click.IntRange(min=8),
    metavar="PIXELS",
    help="Embed each zone larger than PIXELS x PIXELS (the rasters' pixels) as "
    "chips of that size, read one at a time, and keep the mean of their "
    "embeddings weighted by the zone's area in each (recorded in the table's "
    "metadata): for basins far larger than the model's input.",
)
@options.onnx_model_opt
@options.table_run_opts("zone", "the zone's id")
@options.recursive_opt
@options.json_opt
@click.pass_context
def embed_zones(
    ctx: click.Context,
    rasters: Path,
    zones: Path,
    id_column: str | None,
    chips: int | None,
    model: Path,
    out: Path,
    batch_size: int,
    num_workers: int | None,
    device: str,
    shard: tuple[int, int] | None,
    rows_per_part: int,
    timeout: float,
    recursive: bool | None,
    overwrite: bool,
    stac: bool,
    as_json: bool,
) -> None:
    """Embed each polygon of ZONES from the tiles under RASTERS (a folder of
    tiles, or one raster) and write one row per polygon to OUT.

    Each polygon is read, through windows of every tile it touches, as the
    catchment it outlines would be clipped to its own GeoTIFF (the pixels whose
    centres lie inside it; the rest nodata) and embedded as embed-dir embeds
    that file. Polygons are reprojected to the tiles' CRS; where tiles come in
    several CRSs, each polygon is read from those covering most of it (the
    row's crs). Invalid polygons are repaired.

    Rows: embed-dir's columns (path: the zone's id; geometry: its polygon in
    OGC:CRS84; nodata_fraction: the share of its pixels without data), then
    valid_fraction and the zones' own columns. Zones that cannot be read
    (outside the rasters, too small) get a row with the reason in `error`.
    Running the same command again continues: zones with an unchanged polygon
    are kept.

    \b
    Examples:
      cmae embed-zones dem_tiles/ --zones basins.gpkg --id gauge_id \\
          --model m.onnx --out basins.parquet
      cmae embed-zones dem.tif --zones hydrobasins.shp --model m.onnx --out z.parquet
    """
    if num_workers != 0:
        from catchment_mae.workers import prestart

        prestart("catchment_mae.batch.reader")  # beside the imports below

    def run(bar: Any) -> Any:
        from catchment_mae.batch.zone_runner import embed_zones as zones_run

        return zones_run(
            rasters, zones, model, out, id_column=id_column, chips=chips,
            batch_size=batch_size, num_workers=num_workers, device=device,
            shard=shard, recursive=recursive is not False, overwrite=overwrite,
            rows_per_part=rows_per_part, timeout=timeout,
            on_item=lambda item: bar.update(1), on_total=_total_of(bar),
        )  # fmt: skip

    summary = with_bar(ctx, "chip" if chips else "zone", as_json, run)
    report(summary, model, stac, as_json)
