"""Reader processes: a pipe each, a time budget per raster, deaths isolated (no torch).

A reader may meet a file that crashes its decoder (or be killed), or one that
would take forever. ``multiprocessing.Pool`` then waits forever on the lost task;
``concurrent.futures.ProcessPoolExecutor`` fails every pending task (and cannot
stop one stuck task); pebble's pool, which we used first, broke when a worker
died while none was busy ("All workers expired") and stalled the others for a
minute when one died holding the lock of the pipe they share (both seen in our
kill -9 test). So this small pool gives each worker its own pipe and hands it
one task at a time: the main process always knows which worker reads which
file. A worker that dies fails only its task (:class:`ReaderDied`); a task past
its time budget has its worker killed and fails with ``TimeoutError``; a new
worker takes the place of either. Workers start from a forkserver (never forked
from this process, whose threads could hold a lock at fork time) and ignore
SIGINT, so a Ctrl-C in a terminal, which signals the whole process group,
reaches only the main process, which stops them.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing as mp
import os
import selectors
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError, Future
from multiprocessing.connection import Connection, wait
from types import SimpleNamespace
from typing import Any

log = logging.getLogger(__name__)

# Seconds one raster may take in a reader process (decoding a 1e8-pixel raster
# takes seconds); past it, the reader is replaced and the file fails.
READ_TIMEOUT = 600.0
# Modules the forkserver imports once, so each new worker starts warm: the
# modules whose functions the pool runs (each registers itself, preload()) and
# the libraries they read with: tifffile's GeoTIFF key tables (about 2,000 enum
# members built at import) and the usual codecs, which a reader's first raster
# imported otherwise (the first raster took some twenty times as long as the
# next; preloaded, half as long as without). Not "__main__" (Python's default,
# which this list replaces): before CPython 3.13.8 it does nothing
# (gh-126631), and after it the forkserver runs the caller's script, at first
# with an empty sys.argv (gh-143706). Our readers do not import the script at
# all (_without_main).
PRELOAD = [
    "pyproj",
    "tifffile.geodb", "imagecodecs._deflate", "imagecodecs._zlib", "imagecodecs._imcd",
]  # fmt: skip
# Loggers whose levels workers copy from the main process (tifffile's chatter
# stays off unless the user asked for it with -vv).
_LOGGERS = ("catchment_mae", "tifffile")
# Tasks in a worker's pipe: the one it runs and the next, so it starts the next
# without waiting for a round trip through this process (one at a time, short
# tasks left a worker idle for each round trip). A worker runs its tasks in
# order, so the first is the one running: it is the one a death or a timeout
# fails; the other is handed to another worker.
DEPTH = 2


class TaskFailed(Exception):
    """A task raised in its worker; the message is the reason, one line."""


class ReaderDied(Exception):
    """The worker running a task ended without answering (a crash, kill -9)."""

    def __init__(self, exitcode: int | None) -> None:
        super().__init__(exitcode)
        self.exitcode = exitcode


# Our reader processes' name: they alone start without the caller's script.
READER = "cmae-reader"


def _without_main(get: Callable[[str], dict]) -> Callable[[str], dict]:
    """``multiprocessing.spawn.get_preparation_data`` (what a new process is told
    to import first) without the caller's main script, for our readers only.

    Python has each spawned or forkserver process run the script again (as
    ``__mp_main__``), for the functions defined there. A reader runs functions
    of modules only, and running the script again runs its top level: the
    README's ``catchment_mae.train({...})`` saved as a script had every reader
    start a training of its own, fail ("An attempt has been made to start a
    new process before the current process has finished its bootstrapping
    phase") and exit 1, so no raster could be read; a script importing torch
    at its top made each reader import it; and ``cmae``'s own entry script
    made each import the CLI (16 readers were up and through their first
    tasks in about half the time without it). Other processes (torch's
    loader workers, a ``multiprocessing.Pool``) keep Python's behaviour."""

    def get_preparation_data(name: str) -> dict:
        data = get(name)
        if name == READER:
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
        return data

    get_preparation_data.without_main = True  # type: ignore[attr-defined]
    return get_preparation_data


def _from_a_module(fn: Callable[..., Any]) -> None:
    """Raises ValueError for a function of the caller's script, which a reader
    (started without it) could not find: every reader would die on it."""
    if getattr(fn, "__module__", None) == "__main__":
        name = getattr(fn, "__qualname__", repr(fn))
        raise ValueError(
            f"{name} is defined in the running script; reader processes run "
            "functions of modules only (move it to a module and import it)"
        )


def _readers_without_main() -> None:
    from multiprocessing import spawn

    get = getattr(spawn, "get_preparation_data", None)
    if get is not None and not getattr(get, "without_main", False):
        spawn.get_preparation_data = _without_main(get)


class _Worker:
    """One reader process and its end of its pipe; ``task`` is what it runs."""

    def __init__(self, ctx: Any, args: tuple[Any, ...]) -> None:
        parent, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_worker_main, args=(child, *args), daemon=True, name=READER
        )
        self.process.start()
        child.close()
        self.conn: Connection = parent
        self.tasks: deque[tuple[int, Future, Callable[..., Any], tuple]] = deque()
        self.started = 0.0  # when tasks[0] started running
        # Up: it said so once started (initializer run). Its first task's time
        # budget runs from then, not from the hand-over: a task handed to a
        # worker still starting (beside 15 others on a small machine) timed out.
        self.up = False

    def kill(self) -> None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self.process.kill()
        with contextlib.suppress(OSError, ValueError):
            self.conn.close()


class ReaderPool:
    """Runs functions in ``workers`` processes; 0 runs them here, at submission.

    The functions (and the initializer) must come from modules: the processes
    do not run the caller's script again, as Python's do (:func:`_without_main`).

    Args:
        workers: processes (0: inline, no time budget).
        initializer: run in each worker as it starts (also after a replacement),
            with ``initargs``; inline, run once here.
        timeout: seconds one task may take before its worker is replaced.
        clock: what the time budgets are measured on (tests pass their own).
    """

    def __init__(
        self,
        workers: int,
        initializer: Callable[..., None] | None = None,
        initargs: Iterable[Any] = (),
        timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.workers, self.timeout, self._clock = workers, timeout, clock
        self._closed = False
        self._error: str | None = None
        if workers == 0:
            if initializer is not None:
                initializer(*initargs)
            return
        if initializer is not None:
            _from_a_module(initializer)
        self._ctx = start_context()
        if self._ctx.get_start_method() == "forkserver":
            _start_forkserver()
        _readers_without_main()
        levels = {n: logging.getLogger(n).getEffectiveLevel() for n in _LOGGERS}
        self._args = (levels, initializer, tuple(initargs))
        self._queue: deque[tuple[int, Future, Callable[..., Any], tuple]] = deque()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        # Every worker's pipe and process, watched at once: built once, not per
        # wake-up as multiprocessing.connection.wait() does (for 16 workers' 33
        # handles, a selector kept for the pool's life answers 30 times faster).
        self._selector: Any = (
            _Waiter() if sys.platform == "win32" else selectors.DefaultSelector()
        )
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._pool: list[_Worker] = []
        # The workers start in the manager thread, beside whatever the caller
        # does next (loading a model, listing files): a forkserver's first start
        # imports numpy, tifffile, pyproj and pyarrow.
        self._manager = threading.Thread(
            target=self._manage, daemon=True, name="cmae-reader-pool"
        )
        self._manager.start()

    # ------------------------------------------------------------------ public
    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """``fn(*args)`` in a worker; its future, whose exception (if any) is
        turned into a reason by :func:`failure_reason`."""
        future: Future = Future()
        if self.workers == 0:
            try:
                future.set_result(fn(*args))
            except Exception as e:  # reported through the future, as a worker's
                future.set_exception(e)
            return future
        if self._closed:
            from catchment_mae.errors import CmaeError

            raise CmaeError(f"the reader processes stopped: {self._error or 'closed'}")
        _from_a_module(fn)
        with self._lock:
            self._queue.append((next(self._ids), future, fn, args))
        self._wake()
        return future

    def close(self, kill: bool = False) -> None:
        """Stops the workers: at once with ``kill`` (an interrupted run: a worker
        busy in a decoder would see nothing else until the decoder returns),
        else once they finish what they run. Unfinished tasks are cancelled."""
        if self.workers == 0 or self._closed:
            return
        self._closed = True
        self._kill_on_close = kill
        self._wake()
        self._manager.join()

    def __enter__(self) -> ReaderPool:
        return self

    def __exit__(self, exc_type: Any, *_: object) -> None:
        self.close(kill=exc_type is not None)

    # ----------------------------------------------------------------- manager
    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send_bytes(b".")

    def _manage(self) -> None:
        """The pool's one thread: starts and replaces workers, hands out tasks,
        collects answers, notices deaths and time budgets."""
        try:
            # Each worker is handed tasks as soon as it is started, not once all
            # are: starting 16 takes a noticeable part of a short run's
            # time (benchmarks/feed.py emulates a 16-core embed-dir).
            while len(self._pool) < self.workers and not self._closed:
                self._pool.append(self._start())
                self._dispatch()
                self._poll(block=False)
            while not self._closed:
                self._dispatch()
                self._poll()
        except Exception as e:  # the pool cannot go on: fail what is waiting
            self._error = failure_reason(e)
            self._closed, self._kill_on_close = True, True
        finally:
            self._shutdown()

    def _dispatch(self) -> None:
        for w in sorted(self._pool, key=lambda w: len(w.tasks)):
            while len(w.tasks) < DEPTH:
                with self._lock:
                    if not self._queue:
                        return
                    task = self._queue.popleft()
                if not w.tasks:
                    w.started = self._clock()
                w.tasks.append(task)
                try:
                    w.conn.send((task[0], task[2], task[3]))
                except (OSError, ValueError):  # dead: its sentinel says so
                    break

    def _start(self) -> _Worker:
        w = _Worker(self._ctx, self._args)
        self._selector.register(w.conn, selectors.EVENT_READ)
        self._selector.register(w.process.sentinel, selectors.EVENT_READ)
        return w

    def _poll(self, block: bool = True) -> None:
        busy = [w for w in self._pool if w.tasks and w.up]  # on the clock
        timeout = None if block else 0.0
        if block and self.timeout is not None and busy:
            first = min(w.started for w in busy)
            timeout = max(0.0, first + self.timeout - self._clock())
        ready = {key.fileobj for key, _ in self._selector.select(timeout)}
        if self._wake_r in ready:
            while self._wake_r.poll():
                self._wake_r.recv_bytes()
        # Only what the selector found ready: one message from each worker that
        # has one (the next select() returns at once for any more). Asking every
        # worker's pipe and process instead (poll(), is_alive(): a selector
        # each) cost this thread more CPU than the tasks' answers themselves
        # with 16 workers.
        for i, w in enumerate(self._pool):
            dead = w.process.sentinel in ready
            if w.conn in ready:
                try:
                    self._heard(w, w.conn.recv())
                except (EOFError, OSError):  # it died while answering
                    dead = dead or not w.process.is_alive()
            if dead:
                self._drain(w)  # answers it sent before it died are kept
                w.process.join(0.1)
                self._replace(i, ReaderDied(w.process.exitcode))
            elif (
                w.tasks
                and w.up
                and self.timeout is not None
                and self._clock() - w.started > self.timeout
            ):
                self._replace(i, TimeoutError(self.timeout))

    def _drain(self, w: _Worker) -> None:
        """Takes every message left in a dead worker's pipe."""
        with contextlib.suppress(EOFError, OSError):
            while w.tasks and w.conn.poll():
                self._heard(w, w.conn.recv())

    def _heard(self, w: _Worker, message: Any) -> None:
        """A worker's message: up (None), or its running task's outcome."""
        if message is None:  # up: its first task starts now
            w.up, w.started = True, self._clock()
            return
        task_id, ok, value = message
        future = w.tasks.popleft()[1]
        w.started = self._clock()  # the next one starts now
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def _replace(self, i: int, error: BaseException) -> None:
        """Fails the task worker ``i`` runs with ``error``, gives its other tasks
        back to the queue, and starts a new worker in its place."""
        w = self._pool[i]
        self._selector.unregister(w.conn)  # before its handles close
        self._selector.unregister(w.process.sentinel)
        w.kill()
        w.process.join(1.0)
        if w.tasks:
            w.tasks.popleft()[1].set_exception(error)
        with self._lock:
            self._queue.extendleft(reversed(w.tasks))
        self._pool[i] = self._start()

    def _shutdown(self) -> None:
        with self._lock:
            queued, self._queue = list(self._queue), deque()
        for _, future, _, _ in queued:
            future.set_exception(CancelledError())
        kill = getattr(self, "_kill_on_close", True)
        for w in self._pool:
            if kill:
                w.kill()
            else:
                with contextlib.suppress(OSError, ValueError):
                    w.conn.send(None)  # finish the task in hand, then exit
        deadline = time.monotonic() + 5
        for w in self._pool:
            w.process.join(max(0.0, deadline - time.monotonic()))
            for _, future, _, _ in w.tasks:
                if not future.done():
                    future.set_exception(
                        TaskFailed(f"the reader pool failed: {self._error}")
                        if self._error
                        else ReaderDied(w.process.exitcode)
                    )
            w.kill()
            w.process.join(1.0)
        self._selector.close()
        for conn in (self._wake_r, self._wake_w):
            conn.close()


class _Waiter:
    """The selector's calls over ``multiprocessing.connection.wait()``, for
    Windows, whose pipes no selector takes."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def register(self, handle: Any, _events: int) -> None:
        self.handles.append(handle)

    def unregister(self, handle: Any) -> None:
        self.handles.remove(handle)

    def select(self, timeout: float | None) -> list[tuple[Any, int]]:
        return [(SimpleNamespace(fileobj=h), selectors.EVENT_READ)
                for h in wait(self.handles, timeout)]  # fmt: skip

    def close(self) -> None:
        self.handles = []


def _worker_main(
    conn: Connection,
    levels: dict[str, int],
    initializer: Callable[..., None] | None,
    initargs: tuple[Any, ...],
) -> None:
    """A reader process: one task at a time from its pipe, until told to stop."""
    from catchment_mae.logs import configure_worker

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process stops us
    limit_worker_threads()
    configure_worker(levels)
    if initializer is not None:
        initializer(*initargs)
    try:
        conn.send(None)  # up
    except (EOFError, OSError):
        os._exit(0)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the main process is gone
            os._exit(0)
        if message is None:
            return
        task_id, fn, args = message
        try:
            answer = (task_id, True, fn(*args))
        except Exception as e:
            answer = (task_id, False, TaskFailed(failure_reason(e)))
        try:
            conn.send(answer)
        except (EOFError, OSError):
            os._exit(0)
        except Exception as e:  # an unpicklable result: say so instead
            conn.send((task_id, False, TaskFailed(failure_reason(e))))


def limit_worker_threads(*_: object) -> None:
    """Initialiser for reader processes: one BLAS thread each.

    The resize runs two small matrix products per raster; with OpenBLAS's default
    of one thread per core in every worker process, N workers oversubscribe the
    CPU N-fold (2 such workers read fewer rasters a second than one process;
    2 single-threaded ones 2.5 times as many as the oversubscribed pair).
    Accepts and ignores a worker id (torch's worker_init_fn).
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def preload(*modules: str) -> None:
    """Adds ``modules`` (those whose functions a pool will run) to what a
    forkserver started later imports once for all its workers."""
    PRELOAD.extend(m for m in modules if m not in PRELOAD)


def prestart(*modules: str) -> None:
    """Starts the forkserver that reader processes come from, ``modules`` (the
    caller's tasks, not imported here yet) added to what it imports: its start
    (a fresh interpreter importing PRELOAD) then runs beside what the caller
    does next (the command's own imports) instead of before the first reader.
    A ReaderPool made later uses it; a short ``cmae embed-dir`` starts about a
    tenth sooner even where the two starts share two cores."""
    preload(*modules)
    if start_context().get_start_method() != "forkserver":
        return
    with contextlib.suppress(Exception):  # the pool will say what is wrong
        _start_forkserver()


def _start_forkserver() -> None:
    """Starts the forkserver (if it is not running) with SIGINT ignored.

    A Ctrl-C in a terminal signals the whole process group: the forkserver,
    still importing PRELOAD, printed a KeyboardInterrupt traceback above the
    command's own one-line message (9 of 10 Ctrl-Cs at 0.9 s into an
    embed-dir). Ignored when it starts, SIGINT stays ignored through its exec
    and in the processes it forks (readers ignore it anyway: the main process
    stops them). Only the main thread can change a handler; elsewhere the
    forkserver starts as Python starts it. The start itself takes about 1 ms
    (the imports run in the new process)."""
    from multiprocessing import forkserver

    handler = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or handler is None:
        forkserver.ensure_running()
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, handler)


def start_context() -> Any:
    """Where workers start from: a forkserver that has imported PRELOAD (spawn
    where there is none)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def available_cores() -> int:
    """Cores this process may run on (its affinity, where the OS tells)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def failure_reason(error: BaseException, timeout: float | None = None) -> str:
    """One line saying why a task failed: its time budget, its worker's death, or
    the exception it raised (first line, with the exception's type)."""
    if isinstance(error, TimeoutError) and timeout is not None:
        return f"timed out after {timeout:g} s (the reader was stopped)"
    if isinstance(error, ReaderDied):
        code = error.exitcode
        if code is not None and code < 0:
            try:
                how = f"signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"signal {-code}"
        else:
            how = f"exit {code}"
        return f"the reader process died while reading it ({how})"
    if isinstance(error, TaskFailed):
        return str(error)  # a worker's reason, already one line
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
