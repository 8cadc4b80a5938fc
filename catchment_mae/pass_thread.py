"""The first pass in a thread (:class:`PassInThread`): training's first epoch
steps on each sample as soon as the pass has put it in the cache."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from catchment_mae.cache import Entry, SampleCache
from catchment_mae.errors import NoInputError
from catchment_mae.prepare import Item, PassStopped, Prepared, prepare
from catchment_mae.spec import PreprocessSpec

log = logging.getLogger(__name__)


class PassInThread:
    """:func:`prepare` in a thread, each usable sample handed over as soon as its
    arrays are in the cache: training's first epoch steps on them while the
    pass reads the rest (see ``train_data.streams``). ``files``, ``spec`` and the
    keywords are prepare's (``on_sample`` and ``stop`` are this object's;
    ``cache_root`` is required); ``where`` prefixes a NoInputError.

    :meth:`first` waits for the first usable sample; iterate :meth:`samples`
    (position, entry), in ``order`` (the listing's by default); then take
    :meth:`result`. :meth:`close` stops the pass if it still runs (its reader
    processes killed, its unfinished shards removed, within 0.1 s unless a
    raster is being read in this process) and closes the cache. An error of the
    pass is raised where the samples or the result are taken.
    """

    _END = object()

    def __init__(
        self,
        files: Sequence[Path | Item],
        spec: PreprocessSpec,
        *,
        cache_root: str | os.PathLike[str],
        where: str | os.PathLike[str] | None = None,
        **kw: Any,
    ) -> None:
        self.listed = [f[0] if isinstance(f, tuple) else Path(f) for f in files]
        order = kw.get("order")
        self.order = list(order) if order is not None else list(range(len(files)))
        kw["order"] = self.order  # an iterator would be spent here
        # Opened here: the first epoch reads the samples through the folder the
        # pass writes them into (its descriptor), never by its name again.
        kw["cache"] = SampleCache(cache_root, spec, within=kw.pop("cache_within", None))
        self.cache_dir, self.cache_where = kw["cache"].dir, kw["cache"].where
        self.seconds = 0.0  # how long the pass ran
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._head: deque[tuple[int, Entry]] = deque()
        self._stop = threading.Event()
        self._result: Prepared | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(files, spec, cache_root, where, kw),
            name="cmae-first-pass", daemon=True,
        )  # fmt: skip
        self._thread.start()

    def _run(self, files: Any, spec: Any, root: Any, where: Any, kw: Any) -> None:
        t0 = time.perf_counter()
        try:
            self._result = prepare(
                files, spec, cache_root=root, on_sample=self._sample,
                stop=self._stop, **kw,
            )  # fmt: skip
            if self._stop.is_set() and self._result.cache is not None:
                self._result.cache.close()  # close() gave up waiting
        except NoInputError as e:
            self._error = e
            if where:
                self._error = NoInputError(f"{where}: {e}")
                self._error.__cause__ = e
        except BaseException as e:  # handed to the consumer
            self._error = e
        finally:
            self.seconds = time.perf_counter() - t0
            self._queue.put(self._END)

    def _sample(self, position: int, entry: Entry) -> None:
        self._queue.put((position, entry))

    def _next(self) -> tuple[int, Entry] | None:
        got = self._head.popleft() if self._head else self._queue.get()
        if got is self._END:
            self._queue.put(got)  # later calls end at once too
            if self._error is not None and not isinstance(self._error, PassStopped):
                raise self._error
            return None
        return got

    def first(self) -> Entry:
        """The first usable sample (waiting for it)."""
        got = self._head[0] if self._head else self._next()
        if got is None:  # the pass ended without error yet with no sample
            raise NoInputError("no usable raster")
        if not self._head:
            self._head.append(got)
        return got[1]

    def samples(self) -> Iterator[tuple[int, Entry]]:
        """Usable samples as the pass settles them; ends with the pass (raising
        its error, if any)."""
        while (got := self._next()) is not None:
            yield got

    def failure(self, timeout: float = 5.0) -> BaseException | None:
        """The pass's error if it ended with one (waiting up to ``timeout``
        seconds for a pass that is ending)."""
        self._thread.join(timeout)
        if self._thread.is_alive() or isinstance(self._error, PassStopped):
            return None
        return self._error

    def result(self) -> Prepared:
        """The pass's result, once every sample was read (or its error)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def close(self) -> None:
        """Stops the pass if it still runs, and closes the cache."""
        self._stop.set()
        self._thread.join(60)  # at most a raster read in this thread (workers 0)
        if self._thread.is_alive():
            log.debug("the first pass is still reading; it ends with the process")
        elif self._result is not None and self._result.cache is not None:
            self._result.cache.close()
