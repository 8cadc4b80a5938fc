"""``cmae info``: describe an exported encoder or an embeddings table."""

from __future__ import annotations

import json
from pathlib import Path

import click

from catchment_mae.cli import options


@click.command(
    short_help="Describe an .onnx encoder, .pth weights or an embeddings .parquet."
)
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@options.json_opt
def info(file: Path, as_json: bool) -> None:
    """Describe FILE: for an .onnx encoder, its inputs, outputs and the
    preprocessing it expects (read from its metadata); for .pth weights, the
    config they were trained with (NAME.json) and their last epoch; for an
    embeddings .parquet, its rows, failures, model and columns, and any
    unfinished run beside it.

    \b
    Examples:
      cmae info catchments.onnx
      cmae info catchments.pth
      cmae info embeddings.parquet --json
    """
    from catchment_mae.info import describe, render

    described = describe(file)
    if as_json:
        click.echo(json.dumps(described, sort_keys=True))
    else:
        click.echo(render(described))
