"""``cmae embed-dir``: stream a TIFF directory through onnxruntime into Parquet."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from catchment_mae.cli import options


@click.command(
    "embed-dir", short_help="Embed a TIFF directory into a Parquet table (no torch)."
)
@click.argument("input_dir", type=click.Path(path_type=Path))
@options.onnx_model_opt
@options.table_run_opts("raster", "the relative path")
@options.tile_opts(
    tile_help="Embed chips of PIXELS x PIXELS (full resolution) instead of whole "
    "rasters: one row per chip with tile_row, tile_col, x0, y0, tile_width, "
    "tile_height and the chip's own footprint. Edge chips are shifted inside.",
    stride_help="Pixels between chips (default: --tile, no overlap).",
    max_nodata_help="With --tile or --tile-m: skip (and count) chips with more "
    "nodata than this share (default 1); all-nodata chips are always skipped.",
)
@click.option(
    "--tile-m",
    type=click.FloatRange(min=0, min_open=True),
    metavar="METRES",
    help="Like --tile, in ground metres: each raster's chips are as many of its "
    "pixels as cover METRES (by its georeferencing, the rule of --scale ground); a "
    "raster without georeferencing gets a row saying so.",
)
@click.option(
    "--stride-m",
    type=click.FloatRange(min=0, min_open=True),
    metavar="METRES",
    help="With --tile-m: metres between chips (default: --tile-m).",
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="local",
    metavar="[ADDRESS]",
    help="Run on Ray Data: a local Ray with --ray alone, or the cluster at ADDRESS "
    "(HOST:6379, ray://HOST:10001, auto). Needs the ray extra.",
)
@options.recursive_opt
@options.json_opt
@click.pass_context
def embed_dir(
    ctx: click.Context,
    input_dir: Path,
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
    as_json: bool,
    tile: int | None,
    stride: int | None,
    max_nodata: float | None,
    tile_m: float | None,
    stride_m: float | None,
    ray_address: str | None,
    stac: bool,
) -> None:
    """Embed every TIFF under INPUT_DIR with MODEL and write one row per raster to
    OUT: path, embedding, height, width, bands, dtype, nodata_fraction, file_size,
    mtime, crs, pixel_size_x, pixel_size_y, geometry (footprint, WKB in
    OGC:CRS84), bbox, error. Files that fail get a row with a null embedding and
    the reason in `error`; the run goes on. Running the same command again
    continues: only missing, changed or failed files are embedded (--overwrite
    starts over).

    \b
    Examples:
      cmae embed-dir dems/ --model catchments.onnx --out embeddings.parquet
      cmae embed-dir /archive --model m.onnx --out part2.parquet --shard 2/8 --json
      cmae embed-dir /shared/archive --model m.onnx --out e.parquet --ray auto
      cmae embed-dir scenes/ --model m.onnx --out chips.parquet --tile 512
    """
    if ray_address is None and num_workers != 0:
        from catchment_mae.workers import prestart

        prestart("catchment_mae.batch.reader")  # beside the imports below
    _check_chips(tile, stride, tile_m, stride_m, max_nodata)
    max_nodata = 1.0 if max_nodata is None else max_nodata

    def run(bar: Any) -> Any:
        if ray_address is not None:
            from catchment_mae.batch.ray_runner import embed_dir_ray

            return embed_dir_ray(
                input_dir, model, out, batch_size=batch_size, device=device,
                address=None if ray_address == "local" else ray_address,
                num_cpus=num_workers, shard=shard, recursive=recursive is not False,
                overwrite=overwrite, rows_per_part=rows_per_part,
                on_row=lambda row: bar.update(1), tile=tile, stride=stride,
                max_nodata=max_nodata, tile_m=tile_m, stride_m=stride_m,
                timeout=timeout,
            )  # fmt: skip
        from catchment_mae.batch.runner import embed_dir

        return embed_dir(
            input_dir, model, out, batch_size=batch_size,
            num_workers=num_workers, device=device, shard=shard,
            recursive=recursive is not False, overwrite=overwrite,
            rows_per_part=rows_per_part, timeout=timeout,
            on_item=lambda item: bar.update(1), on_total=_total_of(bar),
            tile=tile, stride=stride,
            max_nodata=max_nodata, tile_m=tile_m, stride_m=stride_m,
        )  # fmt: skip

    summary = with_bar(ctx, "chip" if tile or tile_m else "raster", as_json, run)
    report(summary, model, stac, as_json)


def with_bar(ctx: click.Context, unit: str, as_json: bool, run: Any) -> Any:
    """``run(bar)``'s summary, a progress bar beside it (none with -q); when
    nothing was embedded, its summary printed with --json before the error."""
    import pyarrow as pa
    from tqdm.auto import tqdm

    from catchment_mae.batch.runner import NothingEmbeddedError

    # Arrow's default allocator (mimalloc) kept freed row buffers: the command's
    # peak grew by 29 MB from 200 to 2,000 files with it, 10 MB with malloc
    # (benchmarks/README.md). The command owns its process; the library does not
    # change the allocator of a host application.
    pa.set_memory_pool(pa.system_memory_pool())
    verbosity = ctx.obj.get("verbosity", 0) if ctx.obj else 0
    bar = tqdm(desc="embedding", unit=unit, disable=None if verbosity >= 0 else True)
    try:
        return run(bar)
    except NothingEmbeddedError as e:  # the table of failures is written
        if as_json:
            click.echo(json.dumps(e.summary.to_dict(), sort_keys=True))
        raise
    finally:
        bar.close()


def report(summary: Any, model: Path, stac: bool, as_json: bool) -> None:
    """Writes the STAC Item when asked, then says what the run did (one line
    on stderr, or its summary as JSON on stdout)."""
    out = Path(summary.out)
    result = summary.to_dict()
    if stac:
        from catchment_mae.stac import write_item

        result["stac"] = str(write_item(out, model))
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
    else:
        wrote = "" if summary.nothing_new else f"; wrote {summary.out}"
        wrote += f" and {result['stac']}" if stac else ""
        click.echo(f"{summary.line()} in {summary.seconds:.1f} s{wrote}", err=True)


def _check_chips(
    tile: int | None,
    stride: int | None,
    tile_m: float | None,
    stride_m: float | None,
    max_nodata: float | None,
) -> None:
    """The chip options that go together (a UsageError otherwise)."""
    if tile is not None and tile_m is not None:
        raise click.UsageError("--tile (pixels) and --tile-m (metres): choose one")
    if stride is not None and tile is None:
        raise click.UsageError("--stride needs --tile (--stride-m goes with --tile-m)")
    if stride_m is not None and tile_m is None:
        raise click.UsageError("--stride-m needs --tile-m")
    if max_nodata is not None and tile is None and tile_m is None:
        raise click.UsageError("--max-nodata needs --tile or --tile-m")


def _total_of(bar: Any) -> Callable[[int], None]:
    """Gives the bar its total (and so its time left) once the files are
    counted, from the counting thread."""

    def set_total(n: int) -> None:
        bar.total = n
        bar.refresh()

    return set_total
