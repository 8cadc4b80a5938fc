"""Writer stage: rows to Parquet part files as they come, merged into one table.

While a run goes on, rows are flushed as small Parquet files in ``OUT.parts/``,
each written to a temp name and renamed, so a crash (even ``kill -9``) loses at
most the rows not yet flushed and never leaves a half-written file. At the end,
the rows of the previous table and all parts are merged into ``OUT`` (temp file,
then rename) and the parts are removed. A re-run reads both to skip what is done.

The schema is declared once (:mod:`.schema`); ``embedding`` is a fixed-size
list of float32 (width D). A file that failed is a row too, with a null
embedding and its reason in ``error`` (img2dataset's way). No torch here.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import stat
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from catchment_mae.batch.plan import in_shard
from catchment_mae.batch.schema import (
    CHIP_GRID,
    LISTING,
    MODEL_SHA256,
    ROW_COLUMNS,
    TILE_FIELDS,
    ZONES,
    Row,
    column,
    key_values,
    schema,
)
from catchment_mae.errors import CmaeError, OutputError
from catchment_mae.geo import geoparquet_metadata
from catchment_mae.io import open_dir

ROWS_PER_PART = 1024


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


class PartSink:
    """Buffers rows; ``flush`` writes them as one new part file (atomically).

    Args:
        out: the final ``.parquet`` path (parts go to ``OUT.parts/``).
        dim: embedding width.
        metadata: key-value metadata (values JSON-encoded where not strings).
        rows_per_part: rows buffered before a flush.
    """

    def __init__(
        self,
        out: Path,
        dim: int,
        metadata: dict[str, Any],
        rows_per_part: int = ROWS_PER_PART,
        tiled: bool = False,
    ) -> None:
        self.out, self.dim, self.rows_per_part = out, dim, rows_per_part
        self.schema = schema(dim, tiled).with_metadata(
            {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
        )
        self.dir = self.where = parts_dir(out)  # where: its name, for people
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            # Written into the folder made here, whatever its name leads to
            # later; a link planted in its place is refused.
            fd, self.dir = open_dir(self.dir)
        except OSError as e:
            raise OutputError(f"{self.dir}: cannot write: {e.strerror or e}") from e
        weakref.finalize(self, os.close, fd)
        existing = sorted(self.dir.glob("part-*.parquet"))
        self.next_seq = int(existing[-1].stem.split("-")[1]) + 1 if existing else 0
        self.first_seq = self.next_seq  # parts before this are an earlier run's
        self.rows: list[tuple[Row, np.ndarray | None]] = []
        self.complete = 0  # buffered rows whose rasters have all their rows
        self.rasters = 0  # rasters flushed by this sink
        self._pending = 0  # complete rasters among the buffered rows
        self.without_rows: set[str] = set()  # rasters whose chips were all skipped

    def add(
        self, row: Row, embedding: np.ndarray | None, last_of_raster: bool = True
    ) -> None:
        """Buffers a row (``embedding`` None for a failed file). A part ends
        only after a raster's last row, so a raster's chips land together."""
        self.rows.append((row, embedding))
        if last_of_raster:
            self.end_raster(row.path)

    def end_raster(self, path: str) -> None:
        """The raster ``path``'s rows are complete: a part may end here."""
        if len(self.rows) == self.complete:  # no row since the last raster's end
            self.without_rows.add(path)
        self.complete = len(self.rows)
        self._pending += 1
        if self.complete >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        """Writes the buffered rows of complete rasters as one part. The rows
        of a raster still being cut (an interrupted run) are not written: a
        table that held some of a raster's chips would count it done."""
        if not self.complete:
            return
        table = self._table(self.rows[: self.complete])
        target = self.dir / f"part-{self.next_seq:06d}.parquet"
        _write_atomic(table, target)
        self.next_seq += 1
        self.rasters += self._pending
        self.rows = self.rows[self.complete :]
        self.complete = self._pending = 0

    def _table(self, rows: list[tuple[Row, np.ndarray | None]]) -> pa.Table:
        n = len(rows)
        ok = np.array([e is not None for _, e in rows])
        flat = np.zeros((n, self.dim), np.float32)
        for i, (_, e) in enumerate(rows):
            if e is not None:
                flat[i] = e
        values = pa.array(flat.reshape(-1), pa.float32())
        embedding = pa.FixedSizeListArray.from_arrays(
            values, self.dim, mask=pa.array(~ok)
        )
        facts = [r for r, _ in rows]
        arrays = [
            embedding if f.name == "embedding" else column(f.name, facts)
            for f in self.schema
        ]
        return pa.Table.from_arrays(arrays, schema=self.schema)


def check_table(out: Path) -> None:
    """An existing ``out`` is a Parquet file (a table to continue, or to replace
    with --overwrite); anything else, such as an input raster given as --out by
    mistake, is never replaced.

    Raises:
        OutputError: it is a directory, unreadable, or not a Parquet file.
    """
    try:
        st = os.stat(out)
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read below
            raise OutputError(f"{out}: not a regular file; choose another --out")
        if st.st_size == 0:  # nothing to lose (mktemp's)
            return
        with open(out, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        return
    except OSError as e:
        reason = e.strerror or str(e)
        raise OutputError(f"{out}: cannot use it as the output: {reason}") from e
    if magic != b"PAR1":
        raise OutputError(
            f"{out}: exists and is not a Parquet table; it is not replaced, even "
            "with --overwrite (choose another --out)"
        )


def listing_of(
    root: Path, shard: tuple[int, int] | None, recursive: bool
) -> dict[str, Any]:
    """What a run lists, as recorded in its table: a table holds the rasters of
    one listing, and a run over another would drop the rows it does not list."""
    return {
        "root": str(root.resolve()),
        "shard": list(shard) if shard else None,
        "recursive": recursive,
    }


def listing_text(listing: dict[str, Any]) -> str:
    """A listing as read by people: "/data/dems, shard 2/3"."""
    text = str(listing.get("root"))
    if listing.get("zones"):
        text = f"the zones of {listing['zones']} over {text}"
    if listing.get("chips"):
        text += f" in chips of {listing['chips']} px"
    if listing.get("shard"):
        text += ", shard {}/{}".format(*listing["shard"])
    if listing.get("recursive") is False:
        text += " (top level only)"
    return text


def read_previous(
    out: Path,
    model_sha256: str,
    grid: dict[str, Any] | None = None,
    listing: dict[str, Any] | None = None,
) -> pa.Table | None:
    """Rows of an earlier run (the table and any parts), oldest first; with a
    chip ``grid``, of a table of chips cut the same way; with a ``listing``
    (listing_of), of the same listing (tables from before it was recorded are
    continued).

    Raises:
        CmaeError: a file was written with another model, another chip
            ``grid`` or another listing, or is unreadable.
    """
    table_there = out.exists() and out.stat().st_size > 0  # empty: mktemp's
    parts = parts_dir(out)
    sources = [out] if table_there else []
    if not parts.is_symlink():  # a link in its place is not this run's parts
        sources += sorted(parts.glob("part-*.parquet"))
    tables = []
    for path in sources:
        table, meta = _read_earlier(path)
        _check_earlier(path, table, meta, model_sha256, grid, listing)
        tables.append(table)
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="none")


def _read_earlier(path: Path) -> tuple[pa.Table, dict[str, str]]:
    """An earlier table or part, and its key-value metadata (a table of
    zones without the zones' own columns, which its merge adds again)."""
    try:
        pf = pq.ParquetFile(path)
        meta = key_values(pf.schema_arrow)
        table = pf.read()
        if ZONES in meta:
            table = table.select([n for n in table.column_names if n in ROW_COLUMNS])
        return table, meta
    except OSError as e:
        raise CmaeError(
            f"{path}: cannot read the earlier output to resume "
            f"({e.strerror or 'a damaged Parquet file'}); use --overwrite to "
            "start over"
        ) from e
    except Exception as e:  # pyarrow raises several types
        raise CmaeError(
            f"{path}: cannot read the earlier output to resume (a damaged "
            "Parquet file); use --overwrite to start over"
        ) from e


def _check_earlier(
    path: Path,
    table: pa.Table,
    meta: dict[str, str],
    model_sha256: str,
    grid: dict[str, Any] | None,
    listing: dict[str, Any] | None,
) -> None:
    """Refuses an earlier table or part that this run cannot continue: other
    columns, another model, another chip grid or another listing."""
    tiled = grid is not None
    schema_names = schema(1, tiled).names
    if table.schema.names != schema_names:
        if set(TILE_FIELDS) & set(table.schema.names) != set(TILE_FIELDS) & set(
            schema_names
        ):
            chips = "chips" if tiled else "whole rasters"
            raise CmaeError(
                f"{path}: holds {'whole rasters' if tiled else 'chips'}, this "
                f"run embeds {chips}; use --overwrite to start over, or "
                "another --out"
            )
        raise CmaeError(
            f"{path}: has other columns than this version of cmae writes (an "
            "older table?); use --overwrite to start over, or another --out"
        )
    sha = meta.get(MODEL_SHA256, "")
    if sha != model_sha256:
        raise CmaeError(
            f"{path}: was written with another model (sha256 "
            f"{sha[:12] or '?'}...); use --overwrite to start over, or another "
            "--out"
        )
    recorded = json.loads(meta.get(CHIP_GRID, "null"))
    if tiled and recorded is not None and recorded != grid:
        raise CmaeError(
            f"{path}: holds chips of {grid_text(recorded)}, this run cuts "
            f"{grid_text(grid)}; use --overwrite to start over, or another --out"
        )
    recorded = json.loads(meta.get(LISTING, "null"))
    if listing is not None and recorded is not None and recorded != listing:
        raise CmaeError(
            f"{path}: holds the rasters of {listing_text(recorded)}, this run "
            f"lists {listing_text(listing)} (continuing would drop the rows it "
            "does not list); use --overwrite to start over, or another --out"
        )
    if listing is not None and recorded is None:  # from before listings were kept
        unlike = _unlike(table, listing)
        if unlike is not None:
            raise CmaeError(
                f"{path}: {unlike}, unlike this run's listing "
                f"({listing_text(listing)}); continuing would drop its rows: "
                "use --overwrite to start over, or another --out"
            )


def _unlike(table: pa.Table, listing: dict[str, Any]) -> str | None:
    """How a table from before listings were recorded differs from
    ``listing`` (listing_of), as far as its rows tell: a path outside the
    shard, in a sub-folder of a top-level listing, or none under the root."""
    paths = list(dict.fromkeys(table.column("path").to_pylist()))
    if not paths:
        return None
    shard = listing.get("shard")
    if shard and not all(in_shard(p, (shard[0], shard[1])) for p in paths):
        return "holds rasters of other shards"
    if listing.get("recursive") is False and any("/" in p for p in paths):
        return "holds rasters of sub-folders"
    root = Path(listing["root"])
    if not any(os.path.lexists(root / p) for p in paths):
        return f"holds none of the rasters under {root}"
    return None


def grid_text(grid: dict[str, Any]) -> str:
    """A chip grid as read by people: "224 px every 112 px"."""
    unit = " m" if grid.get("unit") == "m" else " px"
    return f"{grid.get('tile'):g}{unit} every {grid.get('stride'):g}{unit}"


def merge(
    out: Path,
    previous: pa.Table | None,
    order: dict[str, int],
    dim: int,
    metadata: dict[str, Any],
    tiled: bool = False,
    parts: Path | None = None,
    extra: Callable[[pa.Table], pa.Table] | None = None,
) -> int:
    """Writes ``out`` from the previous rows and all parts; one row per path
    (per chip with ``tiled``).

    The newest rows of a path win (a raster's chips come from the newest source
    that holds the raster); paths not in ``order`` (files gone, or in another
    shard) are dropped; rows follow ``order`` (the listing), chips in grid
    order. Returns the number of rows written. ``parts``: the folder of parts
    as the sink holds it (PartSink.dir), else found by name. ``extra``: what
    makes the final table of the merged rows (a table of zones adds the zones'
    own columns).
    """
    tables = [previous] if previous is not None else []
    folder = parts if parts is not None else parts_dir(out)
    tables += [pq.read_table(p) for p in sorted(folder.glob("part-*.parquet"))]
    sources = [k for k, t in enumerate(tables) for _ in range(t.num_rows)]
    sch = schema(dim, tiled).with_metadata(
        {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    )
    if tables:
        table = pa.concat_tables([t.cast(sch) for t in tables])
    else:
        table = sch.empty_table()
    paths = table.column("path").to_pylist()
    if not tiled:
        newest = {p: i for i, p in enumerate(paths)}  # later rows overwrite earlier
        keep = sorted(
            (i for p, i in newest.items() if p in order),
            key=lambda i: order[paths[i]],
        )
    else:
        latest = {p: src for p, src in zip(paths, sources, strict=True)}
        rows = table.column("tile_row").fill_null(-1).to_pylist()
        cols = table.column("tile_col").fill_null(-1).to_pylist()
        keep = sorted(
            (i for i, p in enumerate(paths) if p in order and sources[i] == latest[p]),
            key=lambda i: (order[paths[i]], rows[i], cols[i]),
        )
    result = table.take(pa.array(keep, pa.int64()))
    meta = dict(sch.metadata)
    meta[b"geo"] = json.dumps(geoparquet_metadata(_bbox(result))).encode()
    result = result.replace_schema_metadata(meta)
    if extra is not None:
        result = extra(result)
    _write_atomic(result, out)
    shutil.rmtree(parts_dir(out), ignore_errors=True)
    return result.num_rows


def _bbox(table: pa.Table) -> tuple[float, float, float, float] | None:
    """The box around every footprint in ``table``, or None when there is none."""
    boxes = table.column("bbox").combine_chunks()
    if boxes.null_count == len(boxes):
        return None
    lo = [pc.min(boxes.field(k)).as_py() for k in ("xmin", "ymin")]
    hi = [pc.max(boxes.field(k)).as_py() for k in ("xmax", "ymax")]
    return lo[0], lo[1], hi[0], hi[1]


def _write_atomic(table: pa.Table, target: Path) -> None:
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
        )
        os.close(fd)
    except OSError as e:
        raise OutputError(f"{target}: cannot write: {e.strerror or e}") from e
    try:
        pq.write_table(table, tmp, compression="zstd", row_group_size=ROWS_PER_PART)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def clear_parts(out: Path) -> None:
    """--overwrite: forget the parts of an earlier run (the table is replaced at
    the end, atomically, so a failed new run still leaves the old one)."""
    shutil.rmtree(parts_dir(out), ignore_errors=True)


def remove_stale_temps(out: Path) -> None:
    """Removes what a killed run left half-written: ``.OUT.*.tmp`` beside the
    table (a kill -9 during the merge) and ``.part-*.tmp`` in its parts. Called
    with the output's lock held, so no running writer owns them."""
    stale = list(out.parent.glob(f".{glob.escape(out.name)}.*.tmp"))
    parts = parts_dir(out)
    if not parts.is_symlink():  # a link in its place is not this run's parts
        stale += list(parts.glob(".part-*.tmp"))
    for path in stale:
        with contextlib.suppress(OSError):
            path.unlink()
