"""``cmae export``: the trained encoder, with its scale input, to validated ONNX."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from catchment_mae.cli import options


@click.command(short_help="Export the encoder (with its scale input) to ONNX.")
@click.argument("weights", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The .onnx file to write.",
)
@click.option(
    "--opset",
    type=click.IntRange(min=17),
    default=18,
    show_default=True,
    help="ONNX opset.",
)
@click.option(
    "--pool",
    type=click.Choice(["cls", "mean"]),
    default=None,
    help="cls: class token (the original tool's embedding); mean: patch tokens "
    "weighted by their valid fraction (adds a `valid` input)  [default: the "
    "model's NAME.json's: cls for models trained now, mean for those trained "
    "with the first terrain inputs]",
)
@click.option(
    "--fp16",
    is_flag=True,
    help="Also write OUT.fp16.onnx (for GPUs); reports its cosine to fp32.",
)
@click.option(
    "--quantize",
    type=click.Choice(["int8"]),
    help="Also write OUT.int8.onnx, dynamically quantised (for CPUs).",
)
@click.option(
    "--validate/--no-validate",
    default=True,
    show_default=True,
    help="Compare torch and onnxruntime before writing.",
)
@click.option(
    "--rasters",
    type=click.Path(file_okay=False, path_type=Path),
    help="TIFFs to validate on (default: the training input_dir, else synthetic).",
)
@options.overwrite_opt
@options.json_opt
def export(
    weights: Path,
    out: Path,
    opset: int,
    pool: str | None,
    fp16: bool,
    quantize: str | None,
    validate: bool,
    rasters: Path | None,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Export WEIGHTS (a NAME.pth with NAME.json beside it) to one self-contained
    .onnx: inputs `image` [batch, C, S, S], `scale` [batch, K] and, where the
    model needs it, `valid` [batch, 1, S, S]; output `embedding` [batch, D], with
    the preprocessing and the layout in its metadata. Validated
    against torch (max abs <= 1e-4, cosine >= 0.99999) before anything is written.

    \b
    Examples:
      cmae export models/catchments.pth --out catchments.onnx
      cmae export m.pth --out m.onnx --quantize int8 --fp16 --json
    """
    from catchment_mae.config import model_files

    model_files(weights)  # a wrong path is said before torch loads
    from catchment_mae.export.onnx import export_encoder

    report = export_encoder(
        weights, out, opset=opset, pool=pool, fp16=fp16, quantize=quantize,
        validate=validate, rasters=rasters, overwrite=overwrite,
    )  # fmt: skip
    if as_json:
        click.echo(json.dumps(report.to_dict(), sort_keys=True))
    else:
        for line in report_lines(report, validate):
            click.echo(line, err=True)


def report_lines(report: Any, validated: bool) -> list[str]:
    """The human-readable summary of an export."""
    inputs = ", ".join(report.inputs)
    lines = [
        f"wrote {report.path}: {inputs} -> embedding [batch, "
        f"{report.embedding_dim}], pool {report.pool}, opset {report.opset}"
    ]
    for p in report.parity:
        lines.append(
            f"  parity {p.inputs:7s} batch {p.batch_size}: max abs {p.max_abs:.2e}, "
            f"min cosine {p.min_cos:.7f}"
        )
    if report.ms_per_sample:
        ms = report.ms_per_sample
        lines.append(
            f"  speed: torch {ms['torch']:.2f} ms/sample, onnxruntime "
            f"{ms['onnxruntime']:.2f} ms/sample"
        )
    for name, v in report.variants.items():
        cos = v.get("min_cos_to_fp32")
        lines.append(
            f"  {name}: {v['path']}"
            + (f" (min cosine to fp32 {cos:.5f})" if cos is not None else "")
        )
    if not validated:
        lines.append("  not validated (--no-validate)")
    return lines
