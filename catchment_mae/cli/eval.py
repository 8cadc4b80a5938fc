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
@click.option(
    "--within",
    metavar="COLUMN",
    help="A categorical column (e.g. the source DEM): numeric labels are also "
    "scored around each of its classes' means (R² within).",
)
@click.option(
    "--baseline",
    is_flag=True,
    help="Also score simple terrain features computed from the rasters (elevation "
    "statistics, neighbour differences, size, pixel size) in the same protocol, "
    "printed beside the embedding's figures.",
)
@options.folder_opt(
    "--rasters",
    "Where the table's paths lie, for --baseline  [default: the folder "
    "embed-dir listed]",
)
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
    within: str | None,
    baseline: bool,
    rasters: Path | None,
    seed: int,
    as_json: bool,
) -> None:
    """Measure how much the embeddings of TABLE know about the labels.

    Categorical labels (text columns, or --categorical): kNN accuracy (cosine on
    mean-centred embeddings) and a linear probe (logistic regression), beside
    chance. Numeric labels: a ridge probe's R². All out of fold. Rows that
    failed, rows without labels and labels without a row are counted. A
    'copy_of' column marks coarser copies: they are scored by how often their
    nearest original is their own.

    \b
    Examples:
      cmae synth bench/ --labelled
      cmae embed-dir bench/ --model m.onnx --out bench.parquet
      cmae eval bench.parquet --labels bench/labels.csv
    \b
      cmae synth real/ --catchments-of ~/dems     # catchments of your own DEMs
      cmae embed-dir real/ --model m.onnx --out real.parquet
      cmae eval real.parquet --labels real/labels.csv --within dem --baseline
    """
    from catchment_mae import evaluate as ev

    emb = ev.read_embeddings(table)  # a wrong path is said before sklearn loads
    labels = ev.read_labels(labels_path)
    try:
        import sklearn  # noqa: F401
    except ImportError as e:
        raise click.ClickException(
            f"cmae eval needs {e.name}: pip install 'catchment-mae[eval]'"
        ) from e
    joined = ev.join(emb, labels, categorical)
    result = ev.evaluate(joined, k=k, folds=folds, seed=seed, within=within)
    result["table"], result["labels_file"] = str(table), str(labels_path)
    if baseline:
        root = rasters or emb.root
        if root is None:
            raise click.UsageError(
                f"--baseline: {table} does not say where its rasters lie; give "
                "--rasters DIR"
            )
        features, problems = ev.handmade_vectors(joined.paths, root)
        for line in problems:
            click.echo(f"cmae: baseline: {line}", err=True)
        result["baseline"] = ev.evaluate(
            joined.with_vectors(features), k=k, folds=folds, seed=seed, within=within
        )
        result["baseline"]["unreadable"] = len(problems)
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
    """The result as a table for people (the baseline's figures beside, after a
    slash, with --baseline)."""
    base = result.get("baseline")

    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    def cell(m: dict[str, Any], b: dict[str, Any] | None, key: str) -> str:
        if key not in m:
            return ""
        return num(m[key]) + (f"/{num(b.get(key))}" if b is not None else "")

    keys = ("knn_accuracy", "linear_accuracy", "chance", "r2", "r2_within")
    heads = ("kNN", "linear", "chance", "R²", "R² within")
    width = 13 if base else 7
    lines = [
        f"{'label':<22} {'kind':<12} {'rows':>6} "
        + " ".join(f"{h:>{width}}" for h in heads)
    ]
    if base:
        lines.insert(0, "figures: embedding/baseline (simple terrain features)")
    for name, m in result["labels"].items():
        b = base["labels"].get(name) if base else None
        cells = [cell(m, b, key) for key in keys]
        lines.append(
            f"{name[:22]:<22} {m['kind']:<12} {m['rows']:>6} "
            + " ".join(f"{c:>{width}}" for c in cells)
        )
    for key, figure, says, rows_are in (
        ("retrieval", "top1_same_group", "nearest neighbour of its own group", "rows"),
        ("copies", "top1_own_original", "nearest original is its own", "copies"),
    ):
        if key in result:
            r = result[key]
            extra = f"/{num(base[key][figure])}" if base else ""
            lines.append(
                f"{key}: {says} {num(r[figure])}{extra} over {r['rows']} {rows_are} "
                f"(chance {num(r['chance'])})"
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
    within = f"; R² within each {s['within']}" if s.get("within") else ""
    lines.append(f"split: {split} {s['folds']}-fold; kNN k={s['k']}{within}")
    if "report" in result:
        lines.append(f"report: {result['report']}")
    return "\n".join(lines)
