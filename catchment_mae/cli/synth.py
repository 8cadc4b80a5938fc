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
@options.json_opt
def synth(
    out_dir: Path, count: int, min_size: int, max_size: int, seed: int, as_json: bool
) -> None:
    """Write COUNT fractal catchment DEMs (nodata outside an irregular outline,
    UTM-georeferenced, 5-90 m pixels, int16 or float32) to OUT_DIR.

    \b
    Example:
      cmae synth dems/ --count 64 --max-size 512
    """
    from catchment_mae.synth import generate_dems

    if min_size > max_size:
        raise click.BadParameter(
            f"--min-size {min_size} is larger than --max-size {max_size}"
        )
    try:
        paths = generate_dems(
            out_dir, count, min_size=min_size, max_size=max_size, seed=seed
        )
    except OSError as e:
        raise click.ClickException(f"{out_dir}: cannot write: {e.strerror or e}") from e
    if as_json:
        click.echo(
            json.dumps(
                {"out_dir": str(out_dir), "files": [str(p) for p in paths]},
                sort_keys=True,
            )
        )
    else:
        click.echo(f"wrote {len(paths)} DEM(s) to {out_dir}", err=True)
