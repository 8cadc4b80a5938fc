"""``cmae eval``: how much an embeddings table knows about labels (no torch).

For each categorical label: kNN accuracy (cosine on mean-centred embeddings,
``k`` neighbours, majority vote) and a linear probe (logistic regression on
standardised embeddings), beside chance (the largest class's share). For each
numeric label: the R² of a ridge probe (its strength chosen inside each training
fold). All out of fold: group-disjoint folds when the labels have a ``group``
column (the same terrain, catchment or region never on both sides: random splits
flatter a model), stratified folds otherwise. With groups, also retrieval: how
often a row's nearest neighbour is of its own group.

A ``copy_of`` column marks coarser copies of other rows (``cmae synth
--catchments-of`` writes them): those rows are left out of the probes and
measured alone, as how often a copy's nearest original is its own. With
``within`` (a categorical column, e.g. the source DEM), each numeric label's
out-of-fold predictions are also scored around each class's mean: can the
embedding rank rows inside one DEM, not only tell the DEMs apart?

The same protocol can score any other features of the same rows (``cmae eval
--baseline`` hands it simple terrain numbers computed from the rasters,
:mod:`catchment_mae.geomorph`), so a report shows what the embedding adds.

scikit-learn does the statistics; this module joins, splits and reports.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from catchment_mae.errors import CmaeError
from catchment_mae.io import atomic_output

log = logging.getLogger(__name__)

DEFAULT_K = 20  # kNN neighbours (Lightly's and DINO's kNN use 20 to 200)
DEFAULT_FOLDS = 5
MIN_PER_CLASS = 2  # a class with fewer rows cannot be both trained on and tested
RIDGE_ALPHAS = np.logspace(-3, 4, 15)
# Label columns that are not labels: the join key, the split's groups, and the
# original of a coarser copy.
SPECIAL_COLUMNS = ("path", "group", "copy_of")


@dataclass
class Embeddings:
    """The usable rows of a table: paths and their (N, D) float32 embeddings."""

    paths: list[str]
    vectors: np.ndarray
    failed: int = 0  # rows with an error (no embedding), left out
    root: str | None = None  # the folder the table's paths are relative to


@dataclass
class Joined:
    """Embeddings matched with labels, and what did not match."""

    vectors: np.ndarray
    labels: dict[str, np.ndarray]  # column -> values, one per row of vectors
    kinds: dict[str, str]  # column -> "categorical" | "numeric"
    groups: np.ndarray | None
    counts: dict[str, int] = field(default_factory=dict)
    labels_without_row: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)  # one per row of vectors
    copy_of: np.ndarray | None = None  # the original's path, "" for an original

    def subset(self, rows: np.ndarray) -> Joined:
        """The same join restricted to ``rows`` (a boolean mask)."""
        return Joined(
            vectors=self.vectors[rows],
            labels={k: v[rows] for k, v in self.labels.items()},
            kinds=self.kinds,
            groups=None if self.groups is None else self.groups[rows],
            counts=self.counts,
            labels_without_row=self.labels_without_row,
            paths=[p for p, keep in zip(self.paths, rows, strict=True) if keep],
            copy_of=None if self.copy_of is None else self.copy_of[rows],
        )

    def with_vectors(self, vectors: np.ndarray) -> Joined:
        """The same rows and labels, described by other vectors (a baseline)."""
        return dataclasses.replace(self, vectors=vectors)


def read_embeddings(path: str | os.PathLike[str]) -> Embeddings:
    """The rows of an embeddings table that have an embedding."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from catchment_mae.batch.schema import vectors

    p = Path(path)
    if not p.is_file():
        raise CmaeError(f"{p}: no such file (an embeddings table from cmae embed-dir)")
    try:
        pf = pq.ParquetFile(p)
        table = pf.read(columns=["path", "embedding", "error"])
    except Exception as e:  # not Parquet, or not an embeddings table
        first = (str(e).strip().splitlines() or [""])[0]
        raise CmaeError(f"{p}: not an embeddings table: {first}") from e
    if "tile_row" in pf.schema_arrow.names:
        raise CmaeError(
            f"{p}: a table of chips (--tile); cmae eval takes one row per raster "
            "(the README shows how to average a raster's chips)"
        )
    ok = pc.is_null(table["error"])
    failed = table.num_rows - int(pc.sum(ok.cast("int64")).as_py() or 0)
    good = table.filter(ok).filter(pc.is_valid(table.filter(ok)["embedding"]))
    paths = good["path"].to_pylist()
    if not paths:
        raise CmaeError(f"{p}: no row has an embedding ({failed} failed)")
    emb = vectors(good["embedding"].combine_chunks(), p)
    dim = emb.type.list_size
    vectors = emb.flatten().to_numpy(zero_copy_only=False).reshape(len(paths), dim)
    return Embeddings(paths, vectors.astype(np.float32), failed, _root(pf))


def _root(pf: Any) -> str | None:
    """The folder embed-dir listed (its table's ``listing``), or None."""
    import json

    from catchment_mae.batch.schema import LISTING, key_values

    try:
        return str(json.loads(key_values(pf.schema_arrow)[LISTING])["root"])
    except (KeyError, ValueError, TypeError):
        return None


def read_labels(path: str | os.PathLike[str]) -> Any:
    """A labels file (CSV or Parquet) as an Arrow table with a ``path`` column."""
    import pyarrow.csv as pv
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise CmaeError(f"{p}: no such labels file")
    try:
        if p.suffix.lower() == ".parquet":
            table = pq.read_table(p)
        else:
            table = pv.read_csv(p)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise CmaeError(f"{p}: cannot read labels: {first}") from e
    if "path" not in table.column_names:
        raise CmaeError(f"{p}: labels need a 'path' column, found {table.column_names}")
    paths = table["path"].to_pylist()
    if len(set(paths)) != len(paths):
        twice = sorted({x for x in paths if paths.count(x) > 1})[:3]
        raise CmaeError(f"{p}: a path is labelled twice: {', '.join(map(str, twice))}")
    if len(table.column_names) < 2:
        raise CmaeError(f"{p}: no label column beside 'path'")
    return table


def join(emb: Embeddings, labels: Any, categorical: tuple[str, ...] = ()) -> Joined:
    """Matches labels to embeddings by path; counts what is left out."""
    import pyarrow as pa

    index = {p: i for i, p in enumerate(emb.paths)}
    label_paths = [str(p) for p in labels["path"].to_pylist()]
    matched = [(j, index[p]) for j, p in enumerate(label_paths) if p in index]
    missing = [p for p in label_paths if p not in index]
    rows_l = np.array([j for j, _ in matched], dtype=np.int64)
    rows_e = np.array([i for _, i in matched], dtype=np.int64)
    columns = [c for c in labels.column_names if c not in SPECIAL_COLUMNS]
    unknown = sorted(set(categorical) - set(columns))
    if unknown:
        raise CmaeError(f"--categorical: no label column {', '.join(unknown)}")
    values, kinds = {}, {}
    for name in columns:
        col = labels[name].take(pa.array(rows_l)) if len(rows_l) else labels[name][:0]
        numeric = pa.types.is_integer(col.type) or pa.types.is_floating(col.type)
        kinds[name] = (
            "numeric" if numeric and name not in categorical else "categorical"
        )
        if kinds[name] == "numeric":
            values[name] = np.array(
                [np.nan if v is None else float(v) for v in col.to_pylist()]
            )
        else:
            values[name] = np.array(
                [None if v is None else str(v) for v in col.to_pylist()], dtype=object
            )
    groups = None
    if "group" in labels.column_names:
        g = labels["group"].take(pa.array(rows_l)).to_pylist() if len(rows_l) else []
        # A row without a group (null, or empty in a CSV) is a group of its own.
        groups = np.array(
            [
                f"\0row{j}" if v is None or v == "" else str(v)
                for j, v in zip(rows_l, g, strict=True)
            ],
            dtype=object,
        )
    copy_of = None
    if "copy_of" in labels.column_names:
        c = labels["copy_of"].take(pa.array(rows_l)).to_pylist() if len(rows_l) else []
        copy_of = np.array(["" if v is None else str(v) for v in c], dtype=object)
    counts = {
        "table_rows": len(emb.paths) + emb.failed,
        "failed": emb.failed,
        "unlabelled": len(emb.paths) - len(matched),
        "used": len(matched),
        "labels": len(label_paths),
        "labels_without_row": len(missing),
    }
    return Joined(
        vectors=emb.vectors[rows_e],
        labels=values,
        kinds=kinds,
        groups=groups,
        counts=counts,
        labels_without_row=missing,
        paths=[emb.paths[i] for i in rows_e],
        copy_of=copy_of,
    )


def evaluate(
    joined: Joined,
    *,
    k: int = DEFAULT_K,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    within: str | None = None,
) -> dict[str, Any]:
    """Every label's metrics, out of fold; the JSON ``cmae eval`` prints.

    Rows with a ``copy_of`` are left out of the probes and the group retrieval
    and measured by :func:`copy_retrieval`; ``within`` names a categorical
    column around whose classes' means the numeric labels are also scored."""
    if within is not None and joined.kinds.get(within) != "categorical":
        raise CmaeError(
            f"--within: {within!r} is not a categorical label column "
            f"(columns: {', '.join(joined.kinds) or 'none'})"
        )
    originals = joined
    if joined.copy_of is not None:
        originals = joined.subset(joined.copy_of == "")
    if len(originals.vectors) < 4:
        raise CmaeError(
            f"only {len(originals.vectors)} labelled row(s) with an embedding: "
            "need at least 4 to split"
        )
    out: dict[str, Any] = {"labels": {}}
    classes = originals.labels[within] if within is not None else None
    for name, kind in originals.kinds.items():
        y = originals.labels[name]
        if kind == "categorical":
            out["labels"][name] = _categorical(originals, y, k, folds, seed)
        else:
            out["labels"][name] = _numeric(originals, y, folds, seed, classes)
    if originals.groups is not None:
        out["retrieval"] = retrieval(originals.vectors, originals.groups)
    if joined.copy_of is not None:
        out["copies"] = copy_retrieval(joined.vectors, joined.paths, joined.copy_of)
    out["rows"] = {
        **joined.counts,
        "labels_without_row_examples": joined.labels_without_row[:5],
    }
    out["settings"] = {
        "k": k,
        "folds": folds,
        "split": "group" if joined.groups is not None else "stratified",
        "seed": seed,
        "within": within,
        "knn": "cosine on embeddings centred on the training fold's mean, "
        "majority vote",
        "linear": "logistic regression (L-BFGS, C=1) on standardised embeddings",
        "ridge": "ridge on standardised embeddings, alpha by leave-one-out "
        "within the training fold",
    }
    return out


def _splits(
    y: np.ndarray, groups: np.ndarray | None, folds: int, seed: int, stratify: bool
) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import GroupKFold, KFold, StratifiedKFold

    n = len(y)
    if groups is not None:
        n_groups = len(set(groups.tolist()))
        if n_groups < 2:
            raise CmaeError("the 'group' column has one value: cannot split by group")
        splitter: Any = GroupKFold(n_splits=min(folds, n_groups))
        return list(splitter.split(np.zeros(n), y, groups))
    if stratify:
        smallest = min(np.unique(y, return_counts=True)[1])
        splitter = StratifiedKFold(
            n_splits=max(2, min(folds, smallest)), shuffle=True, random_state=seed
        )
        return list(splitter.split(np.zeros(n), y))
    splitter = KFold(n_splits=min(folds, n), shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(n)))


def _categorical(
    joined: Joined, y_all: np.ndarray, k: int, folds: int, seed: int
) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    keep = np.array([v is not None for v in y_all])
    classes, counts = np.unique(y_all[keep].astype(str), return_counts=True)
    rare = set(classes[counts < MIN_PER_CLASS].tolist())
    keep &= np.array([v not in rare for v in y_all])
    x, y = joined.vectors[keep], y_all[keep].astype(str)
    groups = joined.groups[keep] if joined.groups is not None else None
    result: dict[str, Any] = {
        "kind": "categorical",
        "rows": int(keep.sum()),
        "left_out": int((~keep).sum()),
        "classes": sorted(set(y.tolist())),
    }
    if len(result["classes"]) < 2:
        result.update(knn_accuracy=None, linear_accuracy=None, chance=None,
                      note="fewer than two classes with two rows each")  # fmt: skip
        return result
    knn_pred = np.empty(len(y), dtype=object)
    lin_pred = np.empty(len(y), dtype=object)
    for train, test in _splits(y, groups, folds, seed, stratify=True):
        centre = x[train].mean(axis=0)
        knn = KNeighborsClassifier(n_neighbors=min(k, len(train)), metric="cosine")
        knn.fit(x[train] - centre, y[train])
        knn_pred[test] = knn.predict(x[test] - centre)
        if len(set(y[train].tolist())) < 2:  # a fold with one class: nothing to fit
            lin_pred[test] = y[train][0]
            continue
        probe = make_pipeline(
            StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed)
        )
        probe.fit(x[train], y[train])
        lin_pred[test] = probe.predict(x[test])
    labels = result["classes"]
    result.update(
        knn_accuracy=_round(np.mean(knn_pred == y)),
        linear_accuracy=_round(np.mean(lin_pred == y)),
        chance=_round(max(np.unique(y, return_counts=True)[1]) / len(y)),
        confusion=_confusion(y, lin_pred, labels),
    )
    return result


def _numeric(
    joined: Joined,
    y_all: np.ndarray,
    folds: int,
    seed: int,
    classes: np.ndarray | None = None,
) -> dict[str, Any]:
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    keep = np.isfinite(y_all)
    x, y = joined.vectors[keep], y_all[keep]
    groups = joined.groups[keep] if joined.groups is not None else None
    result: dict[str, Any] = {
        "kind": "numeric",
        "rows": int(keep.sum()),
        "left_out": int((~keep).sum()),
    }
    if len(y) < 4 or float(np.std(y)) == 0.0:
        result.update(r2=None, note="fewer than 4 rows, or one value only")
        return result
    pred = np.empty(len(y))
    for train, test in _splits(y, groups, folds, seed, stratify=False):
        probe = make_pipeline(StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS))
        probe.fit(x[train], y[train])
        pred[test] = probe.predict(x[test])
    result["r2"] = _round(r2_score(y, pred))
    if classes is not None:
        result["r2_within"] = within_r2(y, pred, classes[keep])
    result["_fit"] = (y, pred)  # for the report; not in the JSON
    return result


def within_r2(y: np.ndarray, pred: np.ndarray, classes: np.ndarray) -> float | None:
    """R² of the predictions around each class's mean: both ``y`` and ``pred``
    centred on their class's mean, so a probe that only tells the classes apart
    scores 0 and one that ranks the rows inside each class scores up to 1.
    Classes of one row carry no spread and are left out; None without any."""
    yc, pc = np.empty_like(y), np.empty_like(pred)
    keep = np.zeros(len(y), dtype=bool)
    for c in set(classes.tolist()):
        sel = classes == c
        if sel.sum() > 1:
            yc[sel], pc[sel] = y[sel] - y[sel].mean(), pred[sel] - pred[sel].mean()
            keep |= sel
    total = float(np.sum(yc[keep] ** 2))
    if not keep.any() or total <= 1e-12 * float(np.sum(y[keep] ** 2) + 1e-300):
        return None  # one value in every class (up to rounding)
    return _round(1.0 - float(np.sum((yc[keep] - pc[keep]) ** 2)) / total)


def copy_retrieval(
    vectors: np.ndarray, paths: list[str], copy_of: np.ndarray
) -> dict[str, Any]:
    """Share of copies whose nearest original (cosine, centred on every row's
    mean) is their own, over copies whose original has a row; beside chance
    (one over the originals)."""
    originals = np.array([c == "" for c in copy_of.tolist()])
    index = {p: i for i, p in enumerate(np.array(paths, dtype=object)[originals])}
    copies = [
        (i, index[c]) for i, c in enumerate(copy_of.tolist()) if c != "" and c in index
    ]
    if not copies or not originals.any():
        return {"top1_own_original": None, "rows": 0, "chance": None}
    x = vectors - vectors.mean(axis=0)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    rows = np.array([i for i, _ in copies])
    nearest = (x[rows] @ x[originals].T).argmax(axis=1)
    hits = int(np.sum(nearest == np.array([j for _, j in copies])))
    return {
        "top1_own_original": _round(hits / len(copies)),
        "rows": len(copies),
        "chance": _round(1.0 / int(originals.sum())),
    }


def retrieval(vectors: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    """Share of rows whose nearest neighbour (cosine, centred, itself excluded)
    is of the same group, over rows whose group has another member; beside the
    share a random neighbour would give."""
    x = vectors - vectors.mean(axis=0)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sizes: dict[str, int] = {}
    for g in groups.tolist():
        sizes[g] = sizes.get(g, 0) + 1
    rows = np.array([sizes[g] > 1 for g in groups.tolist()])
    if rows.sum() == 0 or len(groups) < 2:
        return {"top1_same_group": None, "rows": 0, "chance": None}
    hits = 0
    for start in range(0, len(x), 1024):  # (1024, N) similarities at a time
        sim = x[start : start + 1024] @ x.T
        for i in range(sim.shape[0]):
            sim[i, start + i] = -np.inf
        nearest = sim.argmax(axis=1)
        block = slice(start, start + sim.shape[0])
        hits += int(np.sum((groups[nearest] == groups[block]) & rows[block]))
    n = len(groups)
    chance = np.mean([(sizes[g] - 1) / (n - 1) for g in groups[rows].tolist()])
    return {
        "top1_same_group": _round(hits / int(rows.sum())),
        "rows": int(rows.sum()),
        "chance": _round(float(chance)),
    }


def handmade_vectors(
    paths: list[str], root: str | os.PathLike[str]
) -> tuple[np.ndarray, list[str]]:
    """The baseline's features (:func:`catchment_mae.geomorph.handmade_features`)
    of each raster, ``root / path``; and one line per raster that could not be
    read. A missing value (an unreadable raster, no pixel size) takes its
    column's median, so every row stays in the probes as in the embedding's."""
    from catchment_mae.errors import BadRasterError
    from catchment_mae.geomorph import FEATURES, handmade_features
    from catchment_mae.raster import read_raster

    out = np.full((len(paths), len(FEATURES)), np.nan)
    problems = []
    for i, rel in enumerate(paths):
        try:
            out[i] = handmade_features(read_raster(Path(root) / rel, bands=[1]))
        except BadRasterError as e:
            problems.append(str(e))
    for j in range(out.shape[1]):
        col = out[:, j]
        known = np.isfinite(col)
        col[~known] = np.median(col[known]) if known.any() else 0.0
    return out, problems


def _confusion(y: np.ndarray, pred: np.ndarray, labels: list[str]) -> list[list[int]]:
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y.astype(str), pred.astype(str), labels=labels).tolist()


def _round(v: float) -> float:
    return round(float(v), 4) if math.isfinite(float(v)) else float("nan")


def public(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` without its private entries (keys starting with ``_``)."""
    if isinstance(result, dict):
        return {k: public(v) for k, v in result.items() if not k.startswith("_")}
    return result


def write_report(joined: Joined, result: dict[str, Any], out: Path) -> None:
    """A PNG: per label, the embeddings' PCA projection coloured by it, and the
    linear probe's confusion matrix (categorical) or its out-of-fold predictions
    (numeric). Temp file, then rename."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    xy = PCA(n_components=2, random_state=0).fit_transform(
        joined.vectors - joined.vectors.mean(axis=0)
    )
    names = list(result["labels"])
    fig, axes = plt.subplots(
        len(names), 2, figsize=(11, 4.6 * len(names)), squeeze=False
    )
    for row, name in enumerate(names):
        info, y = result["labels"][name], joined.labels[name]
        ax = axes[row, 0]
        if info["kind"] == "categorical":
            for c in info["classes"]:
                sel = y == c
                ax.scatter(xy[sel, 0], xy[sel, 1], s=9, label=str(c)[:24])
            ax.legend(fontsize=7, markerscale=1.5, loc="best")
        else:
            sel = np.isfinite(y.astype(float))
            dots = ax.scatter(xy[sel, 0], xy[sel, 1], s=9, c=y[sel], cmap="viridis")
            fig.colorbar(dots, ax=ax, label=name)
        ax.set_title(f"{name}: embeddings, first two principal components", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
        _second_panel(axes[row, 1], name, info)
    fig.tight_layout()
    try:
        with atomic_output(out, "wb") as f:
            fig.savefig(f, format="png", dpi=90)
    except OSError as e:
        raise CmaeError(f"{out}: cannot write the report: {e.strerror or e}") from e
    finally:
        plt.close(fig)


def _second_panel(ax: Any, name: str, info: dict[str, Any]) -> None:
    if info["kind"] == "categorical" and info.get("confusion"):
        m = np.array(info["confusion"], dtype=float)
        share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        ticks = range(len(info["classes"]))
        labels = [str(c)[:14] for c in info["classes"]]
        ax.set_xticks(ticks, labels, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(ticks, labels, fontsize=7)
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, int(v), ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")  # fmt: skip
        ax.set_xlabel("linear probe (out of fold)"), ax.set_ylabel("true")
        ax.set_title(
            f"{name}: linear {info['linear_accuracy']:.3f}, kNN "
            f"{info['knn_accuracy']:.3f}, chance {info['chance']:.3f}",
            fontsize=9,
        )
    elif info["kind"] == "numeric" and "_fit" in info:
        y, pred = info["_fit"]
        ax.scatter(y, pred, s=9)
        lo, hi = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1)
        ax.set_xlabel(f"{name}"), ax.set_ylabel("ridge probe (out of fold)")
        ax.set_title(f"{name}: R² {info['r2']:.3f}", fontsize=9)
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, info.get("note", "no probe"), ha="center", va="center")
