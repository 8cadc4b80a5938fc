"""Reader processes: pebble's pool, with a time budget per raster (no torch).

``multiprocessing.Pool`` loses a task whose worker dies (``get()`` then waits
forever) and cannot stop one stuck task. pebble's ``ProcessPool`` knows which
worker runs which task: a worker that dies (a decoder's segfault, ``kill -9``)
fails only its own task, with ``ProcessExpired``; a task past its time budget has
its worker stopped and replaced, and fails with ``TimeoutError``; the others go
on. Workers start from a forkserver (never forked from this process, whose
threads could hold a lock at fork time) and ignore SIGINT, so a Ctrl-C in a
terminal, which signals the whole process group, reaches only the main process,
which stops them.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)

# Modules the forkserver imports once, so each new worker starts warm.
PRELOAD = ["catchment_mae.batch.reader", "catchment_mae.prepare", "pyproj"]
# Loggers whose levels workers copy from the main process (tifffile's chatter
# stays off unless the user asked for it with -vv).
_LOGGERS = ("catchment_mae", "tifffile")


class ReaderPool:
    """Runs functions in ``workers`` processes; 0 runs them here, at submission.

    Args:
        workers: processes (0: inline, no time budget).
        initializer: run in each worker as it starts (also after a replacement),
            with ``initargs``; inline, run once here.
        timeout: seconds one task may take before its worker is replaced.
    """

    def __init__(
        self,
        workers: int,
        initializer: Callable[..., None] | None = None,
        initargs: Iterable[Any] = (),
        timeout: float | None = None,
    ) -> None:
        self.workers, self.timeout = workers, timeout
        self.pool: Any = None
        if workers == 0:
            if initializer is not None:
                initializer(*initargs)
            return
        from pebble import ProcessPool

        methods = mp.get_all_start_methods()
        ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        if "forkserver" in methods:
            ctx.set_forkserver_preload(PRELOAD)
        levels = {
            name: logging.getLogger(name).getEffectiveLevel() for name in _LOGGERS
        }
        self.pool = ProcessPool(
            max_workers=workers,
            initializer=_init_worker,
            initargs=(levels, initializer, tuple(initargs)),
            context=ctx,
        )
        # Start the workers now, beside whatever the caller does next (loading a
        # model, listing files): a forkserver's first start imports numpy,
        # tifffile, pyproj and pyarrow, half a second on 2 cores. The first
        # submit() waits for it if it has not finished.
        threading.Thread(target=lambda: self.pool.active, daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """``fn(*args)`` in a worker; its future, whose exception (if any) is
        turned into a reason by :func:`failure_reason`."""
        if self.pool is not None:
            return self.pool.schedule(fn, args=args, timeout=self.timeout)
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as e:  # reported through the future, as a worker's would be
            future.set_exception(e)
        return future

    def close(self, kill: bool = False) -> None:
        """Stops the workers: at once with ``kill`` (an interrupted run: a worker
        busy in a decoder would only see SIGTERM when the decoder returns), else
        when they are idle."""
        if self.pool is None:
            return
        pool, self.pool = self.pool, None
        if kill:
            for child in mp.active_children():
                if child.name == "pebble_pool_worker":
                    child.kill()
        pool.stop()
        pool.join()

    def __enter__(self) -> ReaderPool:
        return self

    def __exit__(self, exc_type: Any, *_: object) -> None:
        self.close(kill=exc_type is not None)


def failure_reason(error: BaseException, timeout: float | None = None) -> str:
    """One line saying why a task failed: its time budget, its worker's death, or
    the exception it raised (first line, with the exception's type)."""
    from concurrent.futures import TimeoutError as FutureTimeout

    if isinstance(error, FutureTimeout | TimeoutError) and timeout is not None:
        return f"timed out after {timeout:g} s (the reader was stopped)"
    code = getattr(error, "exitcode", None)
    if type(error).__name__ == "ProcessExpired" and code is not None:
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        return f"the reader process died while reading it ({how})"
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _init_worker(
    levels: dict[str, int],
    initializer: Callable[..., None] | None,
    initargs: tuple[Any, ...],
) -> None:
    """Each worker: one BLAS thread, the main process's log levels and format."""
    from catchment_mae.logs import configure_worker
    from catchment_mae.preprocess import limit_worker_threads

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process stops us
    limit_worker_threads()
    configure_worker(levels)
    if initializer is not None:
        initializer(*initargs)
