"""``cmae demo``: the embedded default job, end to end on synthetic DEMs."""

from __future__ import annotations

import json
from pathlib import Path

import click

from catchment_mae.cli import options


@click.command(
    short_help="The whole pipeline on generated DEMs: train, export, embed (CPU)."
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default="cmae-demo",
    show_default=True,
    help="Directory for the DEMs and the model.",
)
@click.option(
    "--count",
    type=click.IntRange(min=2),
    default=64,
    show_default=True,
    help="Number of DEMs.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=30,
    show_default=True,
    help="Training epochs.",
)
@options.overwrite_opt
@options.json_opt
@click.pass_context
def demo(
    ctx: click.Context,
    out_dir: Path,
    count: int,
    epochs: int,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Write synthetic catchment DEMs to OUT/dems, train OUT/demo_model.pth
    (+ .json, loss curve and reconstruction preview PNGs) on the CPU, export it to
    OUT/demo_model.onnx, embed the DEMs with it into OUT/embeddings.parquet and
    print a few nearest neighbours from that table.

    \b
    Example:
      cmae demo --out cmae-demo
    """
    from catchment_mae.demo import run_demo

    verbosity = ctx.obj.get("verbosity", 0) if ctx.obj else 0
    summary = run_demo(
        out_dir,
        count=count,
        epochs=epochs,
        overwrite=overwrite,
        progress=verbosity >= 0,
    )
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
        return
    click.echo(
        f"demo: {summary['files']} DEMs in {summary['dems']}; loss "
        f"{summary['first_train_loss']:.4f} -> {summary['train_loss']:.4f} over "
        f"{summary['epochs_run']} epochs\n"
        f"model:    {summary['weights']} (+ {summary['config']})\n"
        f"onnx:     {summary['onnx']} (torch parity: max abs "
        f"{summary['onnx_max_abs']:.1e}, min cosine {summary['onnx_min_cos']:.6f})\n"
        f"pictures: {summary['loss_png']}, {summary['preview_png']}\n"
        f"table:    {summary['embeddings']} ({summary['embedded']} embedded, "
        f"{summary['embed_failed']} failed)\n"
        "nearest neighbours (cosine similarity of the embeddings less their mean):"
    )
    for n in summary["neighbours"]:
        q, m = n["query"], n["nearest"]
        click.echo(
            f"  {q['path']} ({q['height']}x{q['width']}) -> {m['path']} "
            f"({m['height']}x{m['width']}), cosine {n['cosine']:.3f}"
        )
