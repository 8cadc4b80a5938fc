"""The rows of an embeddings table most like one raster, by cosine (no torch).

Exact search, streamed: the table is read a few row groups at a time (only the
embedding column and what the filters need), so its size bounds the time, not
the memory. From INDEX_ROWS rows on, an approximate index (usearch's HNSW,
half-precision vectors) is built once beside the table (``TABLE.usearch``) and
memory-mapped for each query; it is built again when the table changes.

The query is a row of the table (by its id or its position) or a TIFF embedded
with the table's own model; a table is never searched with another model's
vector. ``--where`` filters with DuckDB's SQL over the table's columns;
``--bbox`` keeps the rows whose footprint meets a box in CRS84.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from catchment_mae.batch import schema as table
from catchment_mae.errors import CmaeError

# Rows read at a time (whole row groups, at least one): 12 MB of 384-wide
# float32 vectors. Eight times as many held 1 GB at their peak for 200,000 rows
# (decompression, Arrow's arrays and numpy's, in turn), against about 250 MB.
BATCH_ROWS = 8192
# Rows from which a search uses an approximate index (when usearch is
# installed): an exact search reads the whole table, and from here on that takes
# hundreds of times longer than a query of the index.
INDEX_ROWS = 100_000
# The index: usearch's HNSW with 16 links a node, built exploring 128
# candidates and searched exploring 128 (at least 4 k), vectors in float16: on
# clustered vectors as fast to query as float32 and about as exact (recall@10
# 0.970 against 0.973; int8 0.856), built in half the time. faiss's HNSW was as
# fast, but its index is read whole for a query where usearch's is
# memory-mapped. benchmarks/search.py measures it (figures: benchmarks/README.md).
INDEX_SETTINGS = {"connectivity": 16, "expansion_add": 128, "dtype": "f16"}
SEARCH_EXPANSION = 128
# Columns a hit does not show: the vector itself, and the footprint's bytes
# (its bbox says where it lies).
HIDDEN = ("embedding", "geometry")


@dataclass
class Hit:
    """One row of the answer: its position in the table, its cosine similarity
    to the query, and its own columns (the embedding and geometry apart)."""

    row: int
    similarity: float
    values: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "similarity": round(self.similarity, 6), **self.values}


@dataclass
class Table:
    """An embeddings table opened for search."""

    path: Path
    pf: Any  # pyarrow.parquet.ParquetFile
    metadata: dict[str, str]

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Table:
        import pyarrow.parquet as pq

        p = Path(path)
        if not p.is_file():
            raise CmaeError(
                f"{p}: no such file (an embeddings table from cmae embed-dir)"
            )
        try:
            pf = pq.ParquetFile(p)
        except Exception as e:  # pyarrow raises several types: not Parquet
            raise CmaeError(f"{p}: not a Parquet table") from e
        if "embedding" not in pf.schema_arrow.names:
            raise CmaeError(f"{p}: has no embedding column (not from cmae embed-dir)")
        table.check_vectors(pf.schema_arrow.field("embedding").type, p)
        return cls(p, pf, table.key_values(pf.schema_arrow))

    @property
    def rows(self) -> int:
        return int(self.pf.metadata.num_rows)

    @property
    def dim(self) -> int:
        """The embeddings' width (a table written again by another tool, its
        lists without a fixed size: its first row group's)."""
        import pyarrow as pa

        kind = self.pf.schema_arrow.field("embedding").type
        if pa.types.is_fixed_size_list(kind):
            return int(kind.list_size)
        for _, _, emb, keep in _embedded(self, ["embedding"]):
            if keep.any():
                return int(emb.type.list_size)
        return 0

    @property
    def columns(self) -> list[str]:
        return list(self.pf.schema_arrow.names)

    def vector(self, row: int) -> np.ndarray:
        """Row ``row``'s embedding; CmaeError when it has none (a failed file)."""
        if not 0 <= row < self.rows:
            raise CmaeError(f"{self.path}: has rows 0 to {self.rows - 1}, not {row}")
        got = self.values_at([row], ["embedding", "error"])
        vec = got["embedding"][0]
        if vec is None:
            raise CmaeError(
                f"{self.path}: row {row} has no embedding ({got['error'][0]})"
            )
        return np.asarray(vec, np.float32)

    def find(self, value: str, column: str = "path") -> int:
        """The position of the one row whose ``column`` is ``value``."""
        import pyarrow.compute as pc

        if column not in self.columns:
            raise CmaeError(
                f"{self.path}: has no column {column!r} (columns: "
                f"{', '.join(c for c in self.columns if c not in HIDDEN)})"
            )
        found: list[int] = []
        start = 0
        for batch in _chunks(self.pf, [column]):
            hits = pc.equal(batch.column(0).combine_chunks().cast("string"), str(value))
            found += (
                np.flatnonzero(hits.to_numpy(zero_copy_only=False)) + start
            ).tolist()
            start += batch.num_rows
        if not found:
            raise CmaeError(f"{self.path}: no row has {column} {value!r}")
        if len(found) > 1:
            raise CmaeError(
                f"{self.path}: {len(found)} rows have {column} {value!r} (the chips "
                "of one raster?): choose one with --like-row"
            )
        return found[0]

    def check_model(self, model: Path) -> None:
        """Refuses a model other than the one the table was embedded with."""
        from catchment_mae.io import sha256_file

        want = self.metadata.get(table.MODEL_SHA256)
        if want is None:
            raise CmaeError(f"{self.path}: does not record its model (not from cmae)")
        if sha256_file(model) != want:
            raise CmaeError(
                f"{model}: is not the model {self.path} was embedded with "
                f"({self.metadata.get(table.MODEL, '?')}, sha256 {want[:12]}...): "
                "vectors of two models are never compared"
            )

    def default_model(self) -> Path:
        """The table's model file beside the table, by the name it records."""
        name = self.metadata.get(table.MODEL)
        if not name:
            raise CmaeError(f"{self.path}: does not record its model; give --model")
        return self.path.parent / Path(name).name

    def values_at(self, rows: list[int], columns: list[str]) -> dict[str, list[Any]]:
        """Columns of the rows at ``rows`` (positions), in that order; only the
        row groups that hold them are read."""
        meta = self.pf.metadata
        starts = np.cumsum(
            [0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        )
        groups: dict[int, Any] = {}
        out: dict[str, list[Any]] = {c: [] for c in columns}
        for row in rows:
            g = int(np.searchsorted(starts, row, side="right") - 1)
            if g not in groups:
                groups[g] = self.pf.read_row_group(g, columns=columns)
            for c in columns:
                out[c].append(groups[g].column(c)[row - int(starts[g])].as_py())
        return out

    def describe(self, hits: list[Hit]) -> list[Hit]:
        """The hits with their own columns filled in."""
        if not hits:
            return hits
        shown = [c for c in self.columns if c not in HIDDEN]
        values = self.values_at([h.row for h in hits], shown)
        for i, h in enumerate(hits):
            h.values = {c: _plain(values[c][i]) for c in shown}
        return hits


def nearest(
    tab: Table,
    query: np.ndarray,
    k: int = 10,
    *,
    where: str | None = None,
    bbox: tuple[float, float, float, float] | None = None,
    exclude: int | None = None,
) -> list[Hit]:
    """The ``k`` rows most like ``query`` by cosine, most similar first, among
    those with an embedding that pass ``where`` (SQL) and meet ``bbox`` (minx,
    miny, maxx, maxy in CRS84); row ``exclude`` (the query's own) left out."""
    query = np.asarray(query, np.float32).ravel()
    dim = tab.dim
    if query.size != dim:
        raise CmaeError(
            f"{tab.path}: holds embeddings of {dim} values, the query has "
            f"{query.size} (another model's?)"
        )
    norm = float(np.linalg.norm(query))
    if not norm > 0:
        raise CmaeError("the query's embedding is all zeros: nothing is like it")
    query = query / norm
    allowed = _where_rows(tab, where) if where else None
    best_rows = np.empty(0, np.int64)
    best_sims = np.empty(0, np.float32)
    columns = ["embedding"] + (["bbox"] if bbox is not None else [])
    for rows, batch, emb, keep in _embedded(tab, columns):
        if bbox is not None:
            keep &= _meets(batch.column("bbox").combine_chunks(), bbox)
        if allowed is not None:
            keep &= np.isin(rows, allowed)
        if exclude is not None:
            keep &= rows != exclude
        if not keep.any():
            continue
        vectors = _matrix(emb, dim)
        vectors = vectors if keep.all() else vectors[keep]
        lengths = np.linalg.norm(vectors, axis=1)
        sims = np.where(lengths > 0, vectors @ query / np.maximum(lengths, 1e-30), -1.0)
        best_rows = np.concatenate([best_rows, rows[keep]])
        best_sims = np.concatenate([best_sims, sims.astype(np.float32)])
        if len(best_sims) > k:
            top = np.argpartition(-best_sims, k - 1)[:k]
            best_rows, best_sims = best_rows[top], best_sims[top]
    order = np.lexsort((best_rows, -best_sims))[:k]  # ties: the earlier row first
    return [Hit(int(best_rows[i]), float(best_sims[i])) for i in order]


# ------------------------------------------------------------------ the index
def index_path(tab: Table) -> Path:
    """Where a table's index lies: ``TABLE.usearch`` beside it."""
    return tab.path.with_name(tab.path.name + ".usearch")


def _stamp(tab: Table) -> dict[str, Any]:
    """What the index was built from: the table as it was (its size and
    mtime), its rows and width, its model."""
    st = tab.path.stat()
    return {
        "table_size": st.st_size,
        "table_mtime_ns": st.st_mtime_ns,
        "rows": tab.rows,
        "dim": tab.dim,
        "model_sha256": tab.metadata.get(table.MODEL_SHA256),
        "settings": INDEX_SETTINGS,
    }


def open_index(tab: Table, build: bool = True, progress: Any = None) -> Any:
    """The table's index, memory-mapped: the one beside it when it was built
    from the table as it is, else (with ``build``) built now and saved (a temp
    file, then renamed). None without usearch."""
    try:
        from usearch.index import Index
    except ImportError:
        return None
    path = index_path(tab)
    stamp_path = path.with_name(path.name + ".json")
    stamp = _stamp(tab)
    try:
        fresh = json.loads(stamp_path.read_text()) == stamp and path.is_file()
    except (OSError, ValueError):
        fresh = False
    if not fresh:
        if not build:
            return None
        _build_index(tab, path, stamp_path, stamp, progress)
    return Index.restore(str(path), view=True)


def _build_index(
    tab: Table, path: Path, stamp_path: Path, stamp: dict[str, Any], progress: Any
) -> None:
    from usearch.index import Index

    from catchment_mae.io import atomic_path, atomic_write_text
    from catchment_mae.workers import available_cores

    index = Index(ndim=stamp["dim"], metric="cos", **INDEX_SETTINGS)
    # Rows inserted at once by several threads can miss their links to each
    # other: on 200 rows, 10 of 40 builds with 2 threads lost one of a row's
    # 8 nearest (none with one thread). Threads only where they pay.
    threads = min(available_cores(), max(1, tab.rows // 50_000))
    for rows, _, emb, keep in _embedded(tab, ["embedding"]):
        if keep.any():
            vectors = _matrix(emb, stamp["dim"])
            index.add(rows[keep], vectors[keep], threads=threads)
        if progress is not None:
            progress(len(emb))
    try:
        with atomic_path(path) as tmp:
            index.save(tmp)
    except OSError as e:
        raise CmaeError(f"{path}: cannot write the index: {e.strerror or e}") from e
    atomic_write_text(stamp_path, json.dumps(stamp, sort_keys=True))


def approximate(
    index: Any,
    tab: Table,
    query: np.ndarray,
    k: int,
    *,
    where: str | None = None,
    bbox: tuple[float, float, float, float] | None = None,
    exclude: int | None = None,
) -> list[Hit] | None:
    """:func:`nearest` through the index: the closest rows it finds, filtered
    after (it looks at 10 times as many as asked for when a filter is given).
    None when too few of those pass the filters (search exactly then)."""
    filtered = where is not None or bbox is not None
    want = k + (exclude is not None)
    want = want * 10 if filtered else want
    index.expansion_search = max(SEARCH_EXPANSION, 4 * want)
    found = index.search(np.asarray(query, np.float32).ravel(), want)
    rows = np.asarray(found.keys, np.int64)
    sims = 1.0 - np.asarray(found.distances, np.float64)  # cosine distance
    keep = rows != exclude if exclude is not None else np.ones(len(rows), bool)
    if where is not None:
        keep &= np.isin(rows, _where_rows(tab, where))
    if bbox is not None:
        import pyarrow as pa

        boxes = tab.values_at(rows.tolist(), ["bbox"])["bbox"]
        keep &= _meets(pa.array(boxes, table.BBOX), bbox)
    rows, sims = rows[keep], sims[keep]
    if len(rows) < min(k, tab.rows - (exclude is not None)):
        return None
    order = np.lexsort((rows, -sims))[:k]
    return [Hit(int(rows[i]), float(sims[i])) for i in order]


def _chunks(pf: Any, columns: list[str]) -> Any:
    """The table's ``columns``, whole row groups at a time, about BATCH_ROWS
    rows each."""
    meta = pf.metadata
    group: list[int] = []
    rows = 0
    for g in range(meta.num_row_groups):
        group.append(g)
        rows += meta.row_group(g).num_rows
        if rows >= BATCH_ROWS:
            yield pf.read_row_groups(group, columns=columns, use_threads=False)
            group, rows = [], 0
    if group:
        yield pf.read_row_groups(group, columns=columns, use_threads=False)


def _embedded(tab: Table, columns: list[str]) -> Any:
    """(row positions, the batch of ``columns``, its embedding column as
    fixed-size vectors, which rows have an embedding) for each batch of
    :func:`_chunks`."""
    start = 0
    for batch in _chunks(tab.pf, columns):
        emb = table.vectors(batch.column("embedding").combine_chunks(), tab.path)
        rows = np.arange(start, start + len(emb))
        start += len(emb)
        keep = ~np.asarray(emb.is_null().to_numpy(zero_copy_only=False), bool)
        yield rows, batch, emb, keep


def _matrix(emb: Any, dim: int) -> np.ndarray:
    """A fixed-size list column as an (n, dim) float32 array (nulls as zeros)."""
    import pyarrow as pa

    filled = emb.fill_null(pa.scalar([0.0] * dim, emb.type)) if emb.null_count else emb
    flat = filled.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(emb), dim).astype(np.float32, copy=False)


def _meets(bboxes: Any, box: tuple[float, float, float, float]) -> np.ndarray:
    """Whether each row's bbox (a struct, null without a footprint) meets
    ``box``."""
    minx, miny, maxx, maxy = box
    parts = {
        name: np.asarray(bboxes.field(name).to_numpy(zero_copy_only=False), float)
        for name in ("xmin", "ymin", "xmax", "ymax")
    }
    with np.errstate(invalid="ignore"):
        meets = (
            (parts["xmin"] <= maxx) & (parts["xmax"] >= minx)
            & (parts["ymin"] <= maxy) & (parts["ymax"] >= miny)
        )  # fmt: skip
    present = ~np.asarray(bboxes.is_null().to_numpy(zero_copy_only=False), bool)
    return np.asarray(meets, bool) & present & ~np.isnan(parts["xmin"])


def _where_rows(tab: Table, where: str) -> np.ndarray:
    """The positions of the rows that pass ``where`` (DuckDB's SQL over the
    table's columns)."""
    try:
        import duckdb
    except ImportError as e:
        raise CmaeError(
            "--where needs DuckDB: pip install 'catchment-mae[search]'"
        ) from e
    sql = (
        "SELECT file_row_number FROM read_parquet(?, file_row_number = true) "
        f"WHERE {where}"
    )
    try:
        rows = duckdb.connect().execute(sql, [str(tab.path)]).fetchnumpy()
    except duckdb.Error as e:
        first = (str(e).strip().splitlines() or ["?"])[0]
        raise CmaeError(f"--where {where!r}: {first}") from e
    return np.asarray(rows["file_row_number"], np.int64)


def _plain(value: Any) -> Any:
    """A column's value as JSON can hold it."""
    if isinstance(value, bytes):
        return value.hex()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
