"""Reader stage: list TIFFs lazily, decode + preprocess them in worker processes.

Results come back in input order with a bounded number in flight, so memory stays
flat however many files there are (``Pool.imap`` would queue every result while
the model is busy). No torch here.
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing as mp
import stat
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from catchment_mae.errors import BadRasterError
from catchment_mae.geo import footprint
from catchment_mae.preprocess import PreprocessSpec, limit_worker_threads, load_sample


@dataclass
class Item:
    """One raster after the reader: model input, or the reason it failed."""

    path: str  # relative to the input directory, forward slashes
    file_size: int | None
    mtime: float | None
    image: np.ndarray | None = None  # (C, S, S) float32
    valid: np.ndarray | None = None  # (1, S, S) float32
    scale: np.ndarray | None = None  # (2,) float32
    info: dict[str, Any] | None = None
    error: str | None = None
    read_seconds: float = 0.0


def in_shard(rel_path: str, shard: tuple[int, int] | None) -> bool:
    """Stable 1/N split by sha1 of the relative path (not Python's salted hash)."""
    if shard is None:
        return True
    k, n = shard
    digest = hashlib.sha1(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n == k - 1


def relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def read_item(args: tuple[str, str, PreprocessSpec]) -> Item:
    """Worker function: stat, read and preprocess one file; never raises."""
    root, rel, spec = args
    path = Path(root) / rel
    t0 = time.perf_counter()
    size = mtime = None
    try:
        st = path.stat()
        if stat.S_ISREG(st.st_mode):
            size, mtime = st.st_size, st.st_mtime
        s = load_sample(path, spec)
    except BadRasterError as e:
        return Item(
            rel, size, mtime, error=e.reason, read_seconds=time.perf_counter() - t0
        )
    except Exception as e:  # a worker must report, not die: keep the reason
        first = (str(e).strip().splitlines() or [""])[0]
        reason = f"{type(e).__name__}: {first}"
        return Item(
            rel, size, mtime, error=reason, read_seconds=time.perf_counter() - t0
        )
    info = s.info
    return Item(
        rel,
        size,
        mtime,
        image=s.image,
        valid=s.valid,
        scale=s.scale,
        info={
            "height": info.height,
            "width": info.width,
            "bands": info.bands,
            "dtype": info.dtype,
            "nodata_fraction": 1.0 - s.valid_fraction,
            **footprint(info.geo, info.height, info.width).to_dict(),
        },
        read_seconds=time.perf_counter() - t0,
    )


class Reader:
    """Reads ``paths`` (relative to ``root``) in ``workers`` processes, in order.

    Args:
        root: the input directory.
        workers: processes; 0 reads in this process.
        max_in_flight: results queued or being computed at once.
    """

    def __init__(self, root: Path, workers: int, max_in_flight: int) -> None:
        self.root, self.workers = root, workers
        self.max_in_flight = max(1, max_in_flight)
        self.pool: Any = None
        if workers > 0:
            # forkserver: workers fork from a clean single-threaded server, never
            # from this process, whose threads (onnxruntime, tqdm, a host app's)
            # could hold a lock at fork time and deadlock the child.
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
            if "forkserver" in methods:
                ctx.set_forkserver_preload(["catchment_mae.batch.reader", "pyproj"])
            self.pool = ctx.Pool(workers, initializer=limit_worker_threads)

    def read(
        self, rel_paths: Iterable[str], spec: PreprocessSpec, chunk: int | None = None
    ) -> Iterator[Item]:
        """Items in the order of ``rel_paths``; ``spec`` comes from the model.

        Args:
            chunk: None keeps reading ahead while the caller works (the model on
                a GPU). A number reads that many files, hands them over when all
                are read, and starts the next chunk only when the caller asks for
                more, so the readers and a model on the same CPU take turns on all
                cores instead of slowing each other down.
        """
        args = ((str(self.root), rel, spec) for rel in rel_paths)
        if self.pool is None:
            yield from map(read_item, args)
            return
        if chunk is not None:
            while batch := list(itertools.islice(args, chunk)):
                results = [self.pool.apply_async(read_item, (a,)) for a in batch]
                yield from [r.get() for r in results]  # all read, then handed over
            return
        pending: deque[Any] = deque()
        for a in args:
            pending.append(self.pool.apply_async(read_item, (a,)))
            if len(pending) >= self.max_in_flight:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
