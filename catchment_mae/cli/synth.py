"""``cmae synth``: write synthetic catchment DEM GeoTIFFs."""

from __future__ import annotations

import json
from pathlib import Path

import click

from catchment_mae.cli import options


@click.command(short_help="Write synthetic catchment DEM GeoTIFFs.")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Number of DEMs.",
)
@click.option(
    "--min-size",
    type=click.IntRange(min=8),
    default=48,
    show_default=True,
    help="Smallest side in pixels.",
)
@click.option(
    "--max-size",
    type=click.IntRange(min=8),
    default=320,
    show_default=True,
    help="Largest side in pixels.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option(
    "--labelled",
    is_flag=True,
    help="The labelled benchmark for cmae eval: COUNT terrains of four families, "
    "each at 2-3 ground resolutions (5-90 m), and OUT_DIR/labels.csv.",
)
@options.folder_opt(
    "--copies-of",
    "Instead: each georeferenced TIFF of DIR (first band) and its x2 and x4 "
    "down-sampled copies, with labels.csv (group = the source).",
)
@options.folder_opt(
    "--catchments-of",
    "Instead: catchments delineated from each georeferenced DEM of DIR (also "
    "at 2x and 4x coarser), with labels.csv (dem, group = top-level basin, "
    "copy_of, area, slope, elevation, relief, elongation, hypsometric "
    "integral). Needs the catchments extra (pyflwdir).",
)
@options.folder_opt(
    "--windows-of",
    "Instead: square windows (64-512 px) of each georeferenced DEM of DIR, "
    "also at 2x and 4x coarser, with labels.csv as --catchments-of writes it.",
)
@click.option(
    "--per-dem",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="With --catchments-of: at most this many catchments per DEM, one per "
    "doubling of area; with --windows-of: this many windows per DEM.",
)
@options.json_opt
def synth(
    out_dir: Path,
    count: int,
    min_size: int,
    max_size: int,
    seed: int,
    labelled: bool,
    copies_of: Path | None,
    catchments_of: Path | None,
    windows_of: Path | None,
    per_dem: int,
    as_json: bool,
) -> None:
    """Write COUNT fractal catchment DEMs (nodata outside an irregular outline,
    UTM-georeferenced, 5-90 m pixels, int16 or float32) to OUT_DIR.

    With --labelled, a labelled benchmark instead (alpine, hills, plateau and
    floodplain terrains; labels family, resolution_m, log_extent, group); with
    --copies-of, down-sampled copies of real DEMs; with --catchments-of, the
    real-terrain benchmark: catchments of your own DEMs and their attributes
    (--windows-of: square windows of them).

    \b
    Examples:
      cmae synth dems/ --count 64 --max-size 512
      cmae synth bench/ --labelled --count 96 --min-size 32 --max-size 512
      cmae synth copies/ --copies-of ~/dems
      cmae synth real/ --catchments-of ~/dems --per-dem 12
      cmae synth tiles/ --windows-of ~/dems
    """
    from catchment_mae import terrain
    from catchment_mae.synth import generate_dems

    if min_size > max_size:
        raise click.BadParameter(
            f"--min-size {min_size} is larger than --max-size {max_size}"
        )
    if sum(map(bool, (labelled, copies_of, catchments_of, windows_of))) > 1:
        raise click.UsageError(
            "--labelled, --copies-of, --catchments-of and --windows-of exclude "
            "each other"
        )
    skipped: list[str] = []
    try:
        if labelled:
            rows = terrain.generate_labelled(
                out_dir, count, min_size=min_size, max_size=max_size, seed=seed
            )
            paths = [out_dir / r.path for r in rows]
        elif copies_of or catchments_of or windows_of:
            paths, skipped = _from_real(
                out_dir, copies_of, catchments_of, windows_of, per_dem, seed
            )
        else:
            paths = generate_dems(
                out_dir, count, min_size=min_size, max_size=max_size, seed=seed
            )
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    except OSError as e:
        raise click.ClickException(f"{out_dir}: cannot write: {e.strerror or e}") from e
    if as_json:
        files = [str(p) for p in paths]
        out = {"out_dir": str(out_dir), "files": files, "skipped": skipped}
        click.echo(json.dumps(out, sort_keys=True))
    else:
        benchmark = labelled or copies_of or catchments_of or windows_of
        labels = " and labels.csv" if benchmark else ""
        click.echo(f"wrote {len(paths)} DEM(s){labels} to {out_dir}", err=True)


def _from_real(
    out_dir: Path,
    copies_of: Path | None,
    catchments_of: Path | None,
    windows_of: Path | None,
    per_dem: int,
    seed: int,
) -> tuple[list[Path], list[str]]:
    """The benchmarks cut from real DEMs (one of the three folders given): the
    rasters written and the DEMs skipped (each said on stderr)."""
    from catchment_mae import catchments, terrain

    if copies_of:
        labels, skipped = terrain.write_scale_copies(copies_of, out_dir)
    elif catchments_of:
        labels, skipped = catchments.write_catchment_benchmark(
            catchments_of, out_dir, per_dem=per_dem, seed=seed
        )
    else:
        assert windows_of is not None
        labels, skipped = catchments.write_windows(
            windows_of, out_dir, per_dem=per_dem, seed=seed
        )
    paths = [out_dir / str(r["path"]) for r in labels]
    for line in skipped:
        click.echo(f"cmae: skipped {line}", err=True)
    if not paths:
        raise click.ClickException(
            f"{copies_of or catchments_of or windows_of}: no TIFF could be "
            + ("copied" if copies_of else "cut")
        )
    return paths, skipped
