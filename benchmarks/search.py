"""``cmae search``: the exact search's time and memory, and the index's.

1. Exact: two embeddings tables of random vectors (N and 2N rows of ``--dim``
   values, row groups of 1,024 rows as embed-dir writes them), ``cmae search
   --exact --like-row`` on each, interleaved, ``--repeats`` times, each in a
   fresh process. Prints the medians and the ratios 2N / N: the time's should
   be about 2 (an exact search reads every row), the peak memory's about 1 (it
   streams).
2. Index (``--index-rows M``): a table of M clustered vectors (embeddings
   cluster; vectors without structure are the hardest case for any index), the
   index built (its time), then ``--queries`` queries by row through the
   memory-mapped index against the exact search: recall@10 and the time a
   query takes (the index opened once, as a server would; a ``cmae search``
   process adds its own start).

Usage:
    python benchmarks/search.py --rows 200000 --dim 384 --repeats 3
    python benchmarks/search.py --rows 0 --index-rows 1000000 --queries 20
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write(path: Path, rows: int, dim: int, seed: int, clusters: int = 0) -> None:
    """An embeddings table of random vectors, in embed-dir's schema; with
    ``clusters``, vectors about that many centres."""
    from catchment_mae.batch.schema import schema

    sch = schema(dim)
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(rows, dim)).astype(np.float32)
    if clusters:
        centres = rng.normal(size=(clusters, dim)).astype(np.float32)
        vectors = centres[rng.integers(0, clusters, rows)] + 0.6 * vectors
    cols = {f.name: pa.nulls(rows, f.type) for f in sch}
    cols["path"] = pa.array([f"r{i:08d}.tif" for i in range(rows)], pa.string())
    cols["embedding"] = pa.FixedSizeListArray.from_arrays(
        pa.array(vectors.ravel()), dim
    )
    pq.write_table(pa.table(cols, schema=sch), path, compression="zstd",
                   row_group_size=1024)  # fmt: skip


def run(table: Path) -> tuple[float, float]:
    """Seconds and peak MB (the process's VmHWM) of one search."""
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's peak
    # at the fork (this script's, which wrote the tables).
    code = (
        "import sys; from catchment_mae.cli.main import main; "
        "sys.argv = ['cmae', 'search', sys.argv[1], '--like-row', '7', '--exact', "
        "'--json']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "hwm = [x for x in open('/proc/self/status') if x.startswith('VmHWM')]\n"
        "print(int(hwm[0].split()[1]), file=sys.stderr)"
    )
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, str(table)], capture_output=True,
                       text=True, check=True)  # fmt: skip
    seconds = time.perf_counter() - t0
    return seconds, int(p.stderr.strip().splitlines()[-1]) / 1024


def index(rows: int, dim: int, queries: int, tmp: str) -> None:
    """The index on ``rows`` clustered vectors: build time, query time, recall@10."""
    import catchment_mae.search as search
    from catchment_mae.search import Table, approximate, nearest, open_index

    path = Path(tmp) / "indexed.parquet"
    write(path, rows, dim, seed=9, clusters=max(rows // 200, 10))
    tab = Table.open(path)
    t0 = time.perf_counter()
    open_index(tab)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    idx = open_index(tab, build=False)
    opened = time.perf_counter() - t0
    picks = np.random.default_rng(1).choice(rows, queries, replace=False).tolist()
    exact, exact_s = {}, []
    for row in picks:
        t0 = time.perf_counter()
        exact[row] = {h.row for h in nearest(tab, tab.vector(row), 10, exclude=row)}
        exact_s.append(time.perf_counter() - t0)
    print(f"index of {rows:,} rows x {dim}: built in {built:.0f} s, opened in "
          f"{opened * 1000:.0f} ms; exact search {statistics.median(exact_s):.2f} s "
          f"a query (median of {queries})")  # fmt: skip
    default = search.SEARCH_EXPANSION
    for ef in sorted({64, 128, 256, default}):
        search.SEARCH_EXPANSION = ef
        recalls, seconds = [], []
        for row in picks:
            q = tab.vector(row)
            t0 = time.perf_counter()
            got = approximate(idx, tab, q, 10, exclude=row)
            seconds.append(time.perf_counter() - t0)
            recalls.append(len({h.row for h in got or []} & exact[row]) / 10)
        mark = " (the default)" if ef == default else ""
        print(f"  expansion {ef}{mark}: a query {statistics.median(seconds) * 1000:.2f}"
              f" ms, recall@10 {np.mean(recalls):.3f}")  # fmt: skip
    search.SEARCH_EXPANSION = default


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--index-rows", type=int, default=0)
    ap.add_argument("--queries", type=int, default=20)
    args = ap.parse_args()
    if args.index_rows:
        with tempfile.TemporaryDirectory() as tmp:
            index(args.index_rows, args.dim, args.queries, tmp)
    if not args.rows:
        return
    with tempfile.TemporaryDirectory() as tmp:
        tables = {}
        for k in (1, 2):
            tables[k] = Path(tmp) / f"t{k}.parquet"
            write(tables[k], k * args.rows, args.dim, seed=k)
        got: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
        for _ in range(args.repeats):
            for k in (1, 2):
                got[k].append(run(tables[k]))
    for k in (1, 2):
        sec = statistics.median(s for s, _ in got[k])
        mb = statistics.median(m for _, m in got[k])
        print(f"{k * args.rows:,} rows x {args.dim}: {sec:.2f} s, peak {mb:.0f} MB")
    t = [statistics.median(s for s, _ in got[k]) for k in (1, 2)]
    m = [statistics.median(x for _, x in got[k]) for k in (1, 2)]
    print(f"2N / N: time {t[1] / t[0]:.2f}, peak memory {m[1] / m[0]:.3f}")


if __name__ == "__main__":
    main()
