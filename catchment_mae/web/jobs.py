"""Background jobs of the web UI: training and embed-dir, on the library's code.

Each job runs in a thread of the server process and reports through the same
hooks the CLI's progress bars use. One training runs at a time on the machine
(a second is refused with 409, naming the running one); embed-dir jobs run one
at a time too, beside it. Cancelling sets a flag that the job's next progress
hook turns into the library's own interruption (Ctrl-C's path: the trainer
keeps its last epoch checkpoint, embed-dir its flushed rows).
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catchment_mae.errors import CmaeError
from catchment_mae.io import private_dir, try_lock

log = logging.getLogger(__name__)

STATES = ("queued", "running", "done", "failed", "cancelled")
# Finished jobs kept for GET /api/jobs (the oldest go first): a server that runs
# for months must not keep every job it ever ran.
MAX_FINISHED = 50
MAX_CURVE = 1000  # points of a training job's loss curve kept


@dataclass
class Job:
    id: str
    kind: str  # "train" | "embed-dir"
    params: dict[str, Any]
    status: str = "queued"
    progress: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # train: per epoch
    curve: list[list[float]] = field(default_factory=list)  # train: [step, loss]
    result: dict[str, Any] | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    cancel_requested: bool = False

    def add_point(self, step: float, loss: float) -> None:
        """A point of the loss curve; past MAX_CURVE, every other one is dropped
        (the last one kept)."""
        self.curve.append([step, loss])
        if len(self.curve) > MAX_CURVE:
            last = self.curve[-1]
            self.curve = self.curve[:-1:2] + [last]

    def add_epoch(self, stats: dict[str, Any]) -> None:
        self.history.append(stats)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "params": self.params,
            "progress": self.progress,
            "history": self.history,
            "curve": _thin(self.curve, 400),
            "result": self.result,
            "error": self.error,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
        }


class Busy(CmaeError):
    """A job of the same kind is already running."""


class LockUnavailable(CmaeError):
    """The machine-wide training lock cannot be taken (not because it is held)."""


class MachineLock:
    """An exclusive lock shared by every ``cmae serve`` on the machine (flock on
    a file in the temp directory), so one training runs at a time there."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: Any = None

    def acquire(self) -> bool:
        """True once held, False when another server holds it.

        Raises:
            LockUnavailable: the lock file cannot be opened (a directory or a
                symlink planted there, no permission).
        """
        try:
            self._handle = try_lock(self.path, nofollow=True)
        except OSError as e:
            raise LockUnavailable(
                f"cannot take the machine's training lock {self.path}: "
                f"{e.strerror or e}"
            ) from e
        return self._handle is not None

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing drops the flock
            self._handle = None


def default_train_lock() -> Path:
    """In a directory only this user can write (io.private_dir), so nobody can
    plant a symlink or a directory in its place; where that cannot be had, a
    path whose opening fails and says why."""
    try:
        return private_dir() / "serve-train.lock"
    except OSError as e:
        log.warning("no private directory for the training lock: %s", e)
        return Path(tempfile.gettempdir()) / "cmae-serve-train.lock"


class JobManager:
    """Starts, tracks and cancels jobs; thread-safe.

    Args:
        exclusive: job kinds that also take a machine-wide lock (``train``).
        lock_path: the file behind that lock.
    """

    def __init__(
        self,
        exclusive: tuple[str, ...] = ("train",),
        lock_path: Path | None = None,
    ) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._threads: dict[str, threading.Thread] = {}
        self._exclusive = exclusive
        self._machine = MachineLock(lock_path or default_train_lock())

    def start(
        self,
        kind: str,
        params: dict[str, Any],
        work: Callable[[Job], dict[str, Any]],
    ) -> Job:
        """Runs ``work(job)`` in a thread; refuses a second running job of ``kind``."""
        with self._lock:
            running = [
                j
                for j in self._jobs.values()
                if j.kind == kind and j.status in ("queued", "running")
            ]
            if running:
                raise Busy(
                    f"a {kind} job is already running ({running[0].id}); wait for "
                    "it or cancel it"
                )
            machine_wide = kind in self._exclusive
            if machine_wide and not self._machine.acquire():
                raise Busy(
                    f"another cmae serve on this machine is running a {kind} job "
                    f"(lock {self._machine.path}); wait for it"
                )
            job = Job(id=f"{kind}-{next(self._ids)}", kind=kind, params=_short(params))
            self._forget_old()
            self._jobs[job.id] = job
            thread = threading.Thread(
                target=self._run,
                args=(job, work, machine_wide),
                name=job.id,
                daemon=True,
            )
            self._threads[job.id] = thread
        thread.start()
        return job

    def _run(
        self, job: Job, work: Callable[[Job], dict[str, Any]], machine_wide: bool
    ) -> None:
        job.status, job.started = "running", time.time()
        status, error, result = "failed", None, None
        try:
            result, status = work(job), "done"
        except KeyboardInterrupt:
            status, error = "cancelled", "cancelled"
        except CmaeError as e:
            status = "cancelled" if job.cancel_requested else "failed"
            error = str(e)
        except Exception as e:  # a job must report, never take the server down
            log.debug("job %s failed:\n%s", job.id, traceback.format_exc())
            first = (str(e).strip().splitlines() or [""])[0]
            error = f"{type(e).__name__}: {first}"
        finally:
            if machine_wide:  # before the status: a client may start the next one
                self._machine.release()
            job.result, job.error, job.finished = result, error, time.time()
            job.status = status

    def _forget_old(self) -> None:
        """Drops the oldest finished jobs beyond MAX_FINISHED (lock held)."""
        finished = sorted(
            (j for j in self._jobs.values() if j.status not in ("queued", "running")),
            key=lambda j: j.created,
        )
        for j in finished[: max(0, len(finished) - MAX_FINISHED)]:
            del self._jobs[j.id]
            self._threads.pop(j.id, None)

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: j.created, reverse=True)

    def cancel(self, job_id: str) -> Job | None:
        job = self._jobs.get(job_id)
        if job is not None and job.status in ("queued", "running"):
            job.cancel_requested = True
        return job

    def wait(self, job_id: str, timeout: float | None = None) -> None:
        thread = self._threads.get(job_id)
        if thread is not None:
            thread.join(timeout)

    def stop(self, timeout: float = 30.0) -> list[str]:
        """Cancels every running job and waits up to ``timeout`` s for them all.

        A server that exits under a running job kills its thread mid-step:
        torch aborts ("terminate called ...") and the loader workers' temp
        folders stay behind. Cancelled here, a training ends at its next batch
        with its last checkpoint intact. Returns the ids still running.
        """
        with self._lock:
            running = [
                j for j in self._jobs.values() if j.status in ("queued", "running")
            ]
            for job in running:
                job.cancel_requested = True
        deadline = time.monotonic() + timeout
        for job in running:
            self.wait(job.id, max(0.0, deadline - time.monotonic()))
        return [j.id for j in running if j.status in ("queued", "running")]


def _short(params: dict[str, Any], most: int = 200) -> dict[str, Any]:
    """A job's parameters as recorded: long strings and lists cut short."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, str) and len(v) > most:
            v = v[:most] + "..."
        elif isinstance(v, list):
            v = v[:64]
        elif not isinstance(v, int | float | bool | type(None)):
            v = str(v)[:most]
        out[str(k)[:64]] = v
    return out


def check_cancel(job: Job) -> None:
    """Called from progress hooks: turns a cancel request into an interruption."""
    if job.cancel_requested:
        raise KeyboardInterrupt


def _thin(points: list[list[float]], most: int) -> list[list[float]]:
    """At most ``most`` points, evenly taken, the last one kept."""
    if len(points) <= most:
        return list(points)
    step = len(points) / most
    return [points[int(i * step)] for i in range(most - 1)] + [points[-1]]
