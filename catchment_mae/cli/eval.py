"""``cmae eval``: kNN, linear and ridge probes of an embeddings table against labels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from catchment_mae.cli import options


@click.command("eval", short_help="Measure what embeddings know: kNN, linear, ridge.")
@click.argument("table", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--labels",
    "labels_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="CSV or Parquet: 'path' (as in the table), label columns, optionally "
    "'group' (rows of one group never fall on both sides of a split).",
)
@click.option(
    "--k",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Neighbours of the kNN classifier.",
)
@click.option(
    "--folds",
    type=click.IntRange(min=2),
    default=5,
    show_default=True,
    help="Cross-validation folds (group-disjoint when there is a 'group' column).",
)
@click.option(
    "--categorical",
    multiple=True,
    metavar="COLUMN",
    help="Treat this numeric column as classes (repeatable).",
)
@click.option(
    "--report",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Report PNG (projections and confusion matrices)  [default: TABLE.eval.png]",
)
@click.option("--no-report", is_flag=True, help="Write no PNG.")
@click.option("--seed", type=int, default=0, show_default=True)
@options.json_opt
def eval_cmd(
    table: Path,
    labels_path: Path,
    k: int,
    folds: int,
    categorical: tuple[str, ...],
    report: Path | None,
    no_report: bool,
    seed: int,
    as_json: bool,
) -> None:
    """Measure how much the embeddings of TABLE know about the labels.

    Categorical labels (text columns, or --categorical): kNN accuracy (cosine on
    mean-centred embeddings) and a linear probe (logistic regression), beside
    chance. Numeric labels: a ridge probe's R². All out of fold. Rows that
    failed, rows without labels and labels without a row are counted.

    \b
    Example:
      cmae synth bench/ --labelled
      cmae embed-dir bench/ --model m.onnx --out bench.parquet
      cmae eval bench.parquet --labels bench/labels.csv
    """
    try:
        import sklearn  # noqa: F401

        from catchment_mae import evaluate as ev
    except ImportError as e:
        raise click.ClickException(
            f"cmae eval needs {e.name}: pip install 'catchment-mae[eval]'"
        ) from e
    joined = ev.join(
        ev.read_embeddings(table), ev.read_labels(labels_path), categorical
    )
    result = ev.evaluate(joined, k=k, folds=folds, seed=seed)
    result["table"], result["labels_file"] = str(table), str(labels_path)
    if not no_report:
        out = report or table.with_name(table.stem + ".eval.png")
        ev.write_report(joined, result, out)
        result["report"] = str(out)
    shown = ev.public(result)
    if as_json:
        click.echo(json.dumps(shown, sort_keys=True))
    else:
        click.echo(render(shown))


def render(result: dict[str, Any]) -> str:
    """The result as a table for people."""

    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [
        f"{'label':<18} {'kind':<12} {'rows':>6} {'kNN':>7} {'linear':>7} "
        f"{'chance':>7} {'R²':>7}"
    ]
    for name, m in result["labels"].items():
        if m["kind"] == "categorical":
            cells = (num(m["knn_accuracy"]), num(m["linear_accuracy"]),
                     num(m["chance"]), "")  # fmt: skip
        else:
            cells = ("", "", "", num(m["r2"]))
        lines.append(
            f"{name[:18]:<18} {m['kind']:<12} {m['rows']:>6} "
            + " ".join(f"{c:>7}" for c in cells)
        )
    if "retrieval" in result:
        r = result["retrieval"]
        lines.append(
            f"retrieval: nearest neighbour of its own group {num(r['top1_same_group'])}"
            f" over {r['rows']} rows (chance {num(r['chance'])})"
        )
    rows, s = result["rows"], result["settings"]
    lines.append(
        f"rows: {rows['table_rows']} in the table, {rows['used']} labelled and used, "
        f"{rows['failed']} failed, {rows['unlabelled']} without labels; "
        f"{rows['labels_without_row']} label(s) without a row"
        + (
            f" (e.g. {', '.join(rows['labels_without_row_examples'][:3])})"
            if rows["labels_without_row"]
            else ""
        )
    )
    split = "group-disjoint" if s["split"] == "group" else "stratified"
    lines.append(f"split: {split} {s['folds']}-fold; kNN k={s['k']}")
    if "report" in result:
        lines.append(f"report: {result['report']}")
    return "\n".join(lines)
