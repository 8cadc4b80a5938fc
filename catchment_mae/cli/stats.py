"""``cmae stats``: per-channel mean/std of the valid pixels of a directory."""

from __future__ import annotations

import json
from typing import Any

import click

from catchment_mae.cli import options
from catchment_mae.defaults import SMALL_VIT
from catchment_mae.errors import CmaeError


@click.command(short_help="Per-channel mean/std of valid pixels, streamed.")
@click.argument("input_dir", type=click.Path(path_type=str))
@options.bands_opt
@options.nodata_opt
@options.recursive_opt
@options.max_pixels_opt
@options.max_memory_opt
@click.option(
    "--image-size",
    "min_size",
    type=click.IntRange(min=8),
    default=SMALL_VIT["image_size"],
    show_default=True,
    metavar="PIXELS",
    help="The model's input size (cmae train's default model's): a raster with "
    "overviews is read at the smallest one at least this large, as training "
    "reads it.",
)
@options.strict_opt
@options.json_opt
@click.pass_context
def stats(
    ctx: click.Context,
    input_dir: str,
    strict: bool,
    as_json: bool,
    recursive: bool | None,
    **kw: Any,
) -> None:
    """Stream the TIFFs of INPUT_DIR and print per-channel mean/std of valid pixels.

    Reads on every core, one raster per reader process in memory at a time, each
    with a time budget. The figures are what `cmae train` computes when
    --norm-mean/--norm-std are not given: the same pixels (a raster with
    overviews read at the smallest one of at least --image-size, as training
    reads it) and the same rasters left out.

    \b
    Examples:
      cmae stats dems/
      cmae stats tiles/ --bands 4,3,2 --json
    """
    from tqdm.auto import tqdm

    from catchment_mae.stats import scan_dir, usable_std
    from catchment_mae.workers import READ_TIMEOUT, available_cores

    verbosity = ctx.obj.get("verbosity", 0) if ctx.obj else 0
    bar = tqdm(
        desc="reading",
        unit="file",
        disable=None if verbosity >= 0 else True,
        leave=False,
    )

    def on_file(path: Any, reason: str | None) -> None:
        bar.update(1)
        if strict and reason is not None:
            raise CmaeError(f"{path}: {reason} (--strict)")

    try:
        result = scan_dir(
            input_dir,
            recursive=recursive is not False,
            on_file=on_file,
            workers=available_cores(),
            timeout=READ_TIMEOUT,
            **options.drop_none(kw),
        )
    finally:
        bar.close()
    out = result.to_dict()
    if as_json:
        click.echo(json.dumps(out, sort_keys=True))
        return
    click.echo(
        f"{out['files']} raster(s) read, {out['failed']} skipped, "
        f"{out['bands']} band(s)"
    )
    rows = zip(out["mean"], out["std"], out["valid_pixels"], strict=True)
    for i, (m, s, n) in enumerate(rows, start=1):
        click.echo(f"band {i}: mean {m:.6g}  std {s:.6g}  ({n} valid pixels)")
    if out["outliers"]:
        click.echo(
            f"{len(out['outliers'])} raster(s) left out as far outside the rest "
            "(named above); the rasters' medians, which no one raster can swing: "
            f"mean {','.join(f'{m:.6g}' for m in out['median_mean'])}, "
            f"std {','.join(f'{s:.6g}' for s in out['median_std'])}"
        )
    mean = ",".join(f"{m:.6g}" for m in out["mean"])
    std = ",".join(f"{s:.6g}" for s in usable_std(out["std"]))  # as cmae train
    click.echo(f"for cmae train: --norm-mean {mean} --norm-std {std}")
