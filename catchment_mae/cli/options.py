"""Options shared by several commands, so each is spelled the same everywhere."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

from catchment_mae.budget import DEFAULT_MAX_MEMORY_MB
from catchment_mae.config import DEVICES
from catchment_mae.workers import READ_TIMEOUT


def _int_list(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> list[int] | None:
    return _list(value, int, "band numbers like 3,2,1", lambda v: v >= 1,
                 "band numbers start at 1")  # fmt: skip


def _float_list(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> list[float] | None:
    return _list(value, float, "numbers like 2000,1000", math.isfinite,
                 "expected finite numbers")  # fmt: skip


def _list(value: str | None, kind: Any, example: str, ok: Any, rule: str) -> Any:
    """A comma-separated list of ``kind`` (None for None), each ``ok``."""
    if value is None:
        return None
    try:
        out = [kind(v) for v in value.split(",") if v.strip()]
    except ValueError as e:
        raise click.BadParameter(
            f"expected comma-separated {example}, got {value!r}"
        ) from e
    if not out or not all(ok(v) for v in out):
        raise click.BadParameter(f"{rule}, got {value!r}")
    return out


def _positive_floats(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> list[float] | None:
    out = _float_list(ctx, param, value)
    if out is not None and any(v <= 0 for v in out):
        raise click.BadParameter(
            f"must be > 0 (a std of 0 would divide by zero), got {value!r}"
        )
    return out


json_opt = click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print a machine-readable JSON summary on stdout.",
)
overwrite_opt = click.option(
    "--overwrite", is_flag=True, help="Replace existing outputs."
)
strict_opt = click.option(
    "--strict",
    is_flag=True,
    help="Exit 1 on the first bad file instead of skipping it.",
)
recursive_opt = click.option(
    "--recursive/--no-recursive",
    default=None,
    help="Search sub-directories (default: yes).",
)
bands_opt = click.option(
    "--bands",
    callback=_int_list,
    metavar="LIST",
    help="1-based bands to use, in order, e.g. 3,2,1.",
)
nodata_opt = click.option(
    "--nodata",
    type=float,
    help="Extra nodata value (besides the file's own, NaN, inf).",
)
max_pixels_opt = click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    help="Above this, read an overview or a decimated image (default 1e8).",
)
max_memory_opt = click.option(
    "--max-memory",
    "max_memory_mb",
    type=click.IntRange(min=16),
    metavar="MB",
    help=f"Memory one raster may take while read (default {DEFAULT_MAX_MEMORY_MB});"
    " a file that cannot be read within it is refused, naming the reason.",
)


def device_opt(default: str | None = None, help: str = "Where to run.") -> Any:
    """``--device`` (auto, cpu or cuda); without a ``default`` the config's
    (auto) applies."""
    return click.option(
        "--device",
        type=click.Choice(list(DEVICES)),
        default=default,
        show_default=default is not None,
        help=help if default is not None else f"{help.rstrip('.')} (default: auto).",
    )


def tile_opts(
    tile_help: str, stride_help: str, max_nodata_help: str, stride_dest: str = "stride"
) -> Any:
    """``--tile PIXELS``, ``--stride PIXELS`` (into ``stride_dest``) and
    ``--max-nodata`` (default: the command's own), spelled and bounded alike
    wherever chips are cut (chips of fewer than 8 pixels a side describe no
    shape)."""

    def decorate(f: Any) -> Any:
        for option in reversed(
            [
                click.option("--tile", type=click.IntRange(min=8), metavar="PIXELS",
                             help=tile_help),
                click.option("--stride", stride_dest, type=click.IntRange(min=8),
                             metavar="PIXELS", help=stride_help),
                click.option("--max-nodata", type=click.FloatRange(0, 1),
                             help=max_nodata_help),
            ]
        ):  # fmt: skip
            f = option(f)
        return f

    return decorate


batch_size_opt = click.option(
    "--batch-size", type=click.IntRange(min=1), help="Images per batch."
)
norm_mean_opt = click.option(
    "--norm-mean",
    callback=_float_list,
    metavar="LIST",
    help="Per-channel mean, e.g. 2000.",
)
norm_std_opt = click.option(
    "--norm-std",
    callback=_positive_floats,
    metavar="LIST",
    help="Per-channel std (> 0).",
)


def folder_opt(name: str, help: str) -> Any:
    """An option naming a folder that must exist (``DIR``), as a Path."""
    return click.option(
        name,
        type=click.Path(file_okay=False, exists=True, path_type=Path),
        metavar="DIR",
        help=help,
    )


def drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


onnx_model_opt = click.option(
    "--model",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="An encoder written by cmae export.",
)


def _shard(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        k, n = (int(v) for v in value.split("/"))
    except ValueError as e:
        raise click.BadParameter(f"expected K/N like 2/8, got {value!r}") from e
    if not 1 <= k <= n:
        raise click.BadParameter(f"K must be between 1 and N, got {value!r}")
    return k, n


def table_run_opts(unit: str, shard_key: str) -> Any:
    """The options of a run that embeds into a table (embed-dir, embed-zones),
    spelled alike in both: ``--out``, ``--batch-size`` (``unit``s per call),
    ``--num-workers``, ``--device``, ``--shard`` (by ``shard_key``),
    ``--rows-per-part``, ``--timeout``, ``--overwrite``, ``--stac``."""
    options = [
        click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
                     required=True, help="The .parquet table to write."),
        click.option("--batch-size", type=click.IntRange(min=1), default=32,
                     show_default=True, help=f"{unit.capitalize()}s per onnxruntime "
                     "call."),
        click.option("--num-workers", type=click.IntRange(min=0),
                     help="Reader processes (default: one per core; 0: read inline)."),
        device_opt("auto", help="auto: onnxruntime's CUDA provider when it loads, "
                   "else the CPU."),
        click.option("--shard", callback=_shard, metavar="K/N",
                     help=f"Only this 1/N of the {unit}s (stable: sha1 of "
                     f"{shard_key})."),
        click.option("--rows-per-part", type=click.IntRange(min=1), default=1024,
                     show_default=True, help="Rows flushed to disk at a time (at "
                     "most these are lost if the machine dies)."),
        click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
                     default=READ_TIMEOUT, show_default=True,
                     help=f"Seconds one {unit} may take in a reader process; past "
                     f"it the reader is replaced and the {unit} gets a row saying so."),
        click.option("--overwrite", is_flag=True,
                     help="Start over instead of continuing an earlier run."),
        click.option("--stac", is_flag=True,
                     help="Also write a STAC Item beside OUT (OUT's name "
                     ".stac.json): the table with the Embedding extension's "
                     "fields, the model with the MLM extension's."),
    ]  # fmt: skip

    def decorate(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate
