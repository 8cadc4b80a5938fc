"""``cmae embed``: the original tool's JSON answer for each file, for scripts."""

from __future__ import annotations

import json
from pathlib import Path

import click

from catchment_mae.cli import options


@click.command(short_help="Print each file's embedding as the original tool's JSON.")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@options.onnx_model_opt
@options.device_opt("cpu", help="onnxruntime provider.")
def embed(files: tuple[Path, ...], model: Path, device: str) -> None:
    """Print one JSON line per FILE: {"status": "success", "embedding": [...],
    "shape": [D]}, or {"status": "error", "message": ...} for a file that fails.
    Exits 1 when no file could be embedded.

    \b
    Example:
      cmae embed dem1.tif dem2.tif --model catchments.onnx
    """
    from catchment_mae.errors import BadRasterError
    from catchment_mae.preprocess import load_sample
    from catchment_mae.runtime import (
        create_session,
        read_metadata,
        run_encoder,
        spec_from_metadata,
    )

    sess = create_session(model, device)
    spec = spec_from_metadata(read_metadata(sess, model))
    ok = 0
    for path in files:
        try:
            s = load_sample(path, spec)
        except BadRasterError as e:
            click.echo(json.dumps({"status": "error", "message": str(e)}))
            continue
        emb = run_encoder(sess, s.image[None], s.scale[None], s.valid[None])
        vector = [float(v) for v in emb[0]]
        click.echo(
            json.dumps(
                {"status": "success", "embedding": vector, "shape": [len(vector)]}
            )
        )
        ok += 1
    if ok == 0:
        raise click.ClickException("no file could be embedded")
