"""Writer stage: rows to Parquet in row groups, via a temp file renamed into place.

The schema is declared once; ``embedding`` is a fixed-size list of float32 (width
D), so DuckDB, pandas and polars read it as an array. A file that failed is a row
too, with a null embedding and its reason in ``error`` (img2dataset's way), so
nothing is lost and the table itself holds the counts. No torch here.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from catchment_mae.batch.reader import Item
from catchment_mae.errors import OutputError

ROW_GROUP_ROWS = 1024


def schema(dim: int) -> pa.Schema:
    """The table's columns, in order (documented in the README)."""
    return pa.schema(
        [
            pa.field("path", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim)),
            pa.field("height", pa.int64()),
            pa.field("width", pa.int64()),
            pa.field("bands", pa.int32()),
            pa.field("dtype", pa.string()),
            pa.field("nodata_fraction", pa.float32()),
            pa.field("file_size", pa.int64()),
            pa.field("mtime", pa.timestamp("us", tz="UTC")),
            pa.field("error", pa.string()),
        ]
    )


class ParquetSink:
    """Buffers rows and writes row groups to a temp file; ``commit`` renames it.

    Args:
        out: the final ``.parquet`` path.
        dim: embedding width.
        metadata: key-value metadata (values JSON-encoded where not strings).
    """

    def __init__(self, out: Path, dim: int, metadata: dict[str, Any]) -> None:
        self.out, self.dim = out, dim
        self.schema = schema(dim).with_metadata(
            {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
        )
        self.rows: list[tuple[Item, np.ndarray | None]] = []
        self.written = 0
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(
                prefix=f".{out.name}.", suffix=".tmp", dir=out.parent
            )
            os.close(fd)
        except OSError as e:
            raise OutputError(f"{out}: cannot write: {e.strerror or e}") from e
        self.tmp = Path(tmp)
        self.writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd")

    def add(self, item: Item, embedding: np.ndarray | None) -> None:
        self.rows.append((item, embedding))
        if len(self.rows) >= ROW_GROUP_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        self.writer.write_table(self._table(self.rows), row_group_size=ROW_GROUP_ROWS)
        self.written += len(self.rows)
        self.rows = []

    def commit(self) -> None:
        """Flushes, closes and renames the temp file into place (atomic)."""
        self.flush()
        self.writer.close()
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.out)

    def abort(self) -> None:
        """Closes and removes the temp file; the previous output stays as it was."""
        with contextlib.suppress(Exception):
            self.writer.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()

    def _table(self, rows: list[tuple[Item, np.ndarray | None]]) -> pa.Table:
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
        infos = [it.info or {} for it, _ in rows]
        cols = {
            "path": [it.path for it, _ in rows],
            "embedding": embedding,
            "height": [i.get("height") for i in infos],
            "width": [i.get("width") for i in infos],
            "bands": [i.get("bands") for i in infos],
            "dtype": [i.get("dtype") for i in infos],
            "nodata_fraction": [i.get("nodata_fraction") for i in infos],
            "file_size": [it.file_size for it, _ in rows],
            "mtime": [
                None if it.mtime is None else int(it.mtime * 1e6) for it, _ in rows
            ],
            "error": [it.error for it, _ in rows],
        }
        arrays = [
            cols[f.name]
            if isinstance(cols[f.name], pa.Array)
            else pa.array(cols[f.name], f.type)
            for f in self.schema
        ]
        return pa.Table.from_arrays(arrays, schema=self.schema)
