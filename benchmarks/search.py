"""``cmae search``: time and peak memory over a table and one twice its size.

Writes two embeddings tables of random vectors (N and 2N rows of ``--dim``
values, row groups of 1,024 rows as embed-dir writes them), then runs ``cmae
search --like-row`` on each, interleaved, ``--repeats`` times, each in a fresh
process. Prints the medians and the ratios 2N / N: the time's should be about 2
(an exact search reads every row), the peak memory's about 1 (it streams).

Usage:
    python benchmarks/search.py --rows 200000 --dim 384 --repeats 3
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


def write(path: Path, rows: int, dim: int, seed: int) -> None:
    """An embeddings table of random vectors, in embed-dir's schema."""
    from catchment_mae.batch.schema import schema

    sch = schema(dim)
    vectors = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
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
        "sys.argv = ['cmae', 'search', sys.argv[1], '--like-row', '7', '--json']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "hwm = [x for x in open('/proc/self/status') if x.startswith('VmHWM')]\n"
        "print(int(hwm[0].split()[1]), file=sys.stderr)"
    )
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, str(table)], capture_output=True,
                       text=True, check=True)  # fmt: skip
    seconds = time.perf_counter() - t0
    return seconds, int(p.stderr.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
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
