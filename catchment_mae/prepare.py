"""Training's first pass: every raster read once, into the cache and the statistics.

Before the first step, training needs each raster checked (bad files are
skipped with their reason), the band count, and, when ``norm_mean``/``norm_std``
come from the data, their valid-pixel statistics. This pass reads every raster
that is not in the cache yet, in reader processes on every core, writes its
resampled arrays into the cache as it goes, and merges the statistics from each
raster's own (count, mean, std), which the cache keeps. A later run over the same
files with the same reading settings reads no TIFF at all. Without a cache
(``--no-cache``) it only checks and measures; the epochs then read the files.

With ``--tile`` (:func:`chip_items`), a raster larger than the tile is a grid of
chips, each a sample of its own read through its window (only the strips or
tiles it touches): chips are cached, measured and screened like rasters, and
those with no valid pixel (or more nodata than ``max_nodata``) are left out and
counted, not reported one by one.

The statistics are those of the pixels as read for the model: for a COG with
overviews, the smallest overview still at least ``image_size``, as embedding
reads it. No torch here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from catchment_mae.cache import (
    SHARD_ROWS,
    CannotWrite,
    Entry,
    FileKey,
    SampleCache,
    ShardBuild,
    cannot_write,
)
from catchment_mae.errors import (
    BadRasterError,
    ConfigError,
    NoInputError,
    band_mismatch,
)
from catchment_mae.preprocess import (
    ALL_NODATA,
    OUTLIER_FACTOR,
    load_resampled,
    norm_peaks,
    norm_refusal_reason,
)
from catchment_mae.raster import image_size
from catchment_mae.shard_rows import ShardTarget, write_row
from catchment_mae.spec import PreprocessSpec
from catchment_mae.stats import ScanResult, usable_std
from catchment_mae.warmup import warming_up
from catchment_mae.workers import ReaderPool, failure_reason, preload

preload(__name__)  # reader processes run this module's tasks

log = logging.getLogger(__name__)

# Files being read at once, per reader process (bounds the futures held).
IN_FLIGHT_PER_WORKER = 16

Window = tuple[int, int, int, int]  # a chip's x0, y0, width, height
Item = tuple[Path, Window | None]  # a raster, or one chip of it


@dataclass
class Prepared(ScanResult):
    """What the first pass found: a ScanResult (usable files in listing order,
    failures with their reasons, band count, statistics) plus, per usable file,
    its cache entry.

    Attributes:
        entries: facts of ``files``, aligned (``shard`` set when cached).
        screened: files read well but left out for their values (see
            :func:`_screen`); they are in ``failed`` too; --strict stops on them.
        cache: the cache, or None (``--no-cache``).
        reused: rasters found in the cache; the others were read now.
        chips_skipped: chips left out for nodata (``--tile``).
        positions: per usable file, its place in the list handed to
            :func:`prepare` (failures leave gaps).

    With chips, ``files`` holds a raster's path once per chip, and each entry's
    ``key.window`` says which.
    """

    entries: list[Entry] = field(default_factory=list)
    screened: list[tuple[str, str]] = field(default_factory=list)
    cache: SampleCache | None = None
    reused: int = 0
    chips_skipped: int = 0
    positions: list[int] = field(default_factory=list)

    @property
    def items(self) -> list[Item]:
        """Each sample's path and chip window (None: the whole raster)."""
        return [
            (p, e.key.window) for p, e in zip(self.files, self.entries, strict=True)
        ]


def chip_items(
    files: Sequence[Path], tile: int, stride: int | None = None
) -> list[Item]:
    """Samples for ``--tile``: each raster larger than ``tile`` on a side as its
    grid of chips (embed-dir's grid: ``stride`` apart, default ``tile``, edge
    chips shifted inside), the others whole. A file whose header cannot be read
    stays whole, and reading it gives its reason."""
    from catchment_mae.chips import chip_grid

    items: list[Item] = []
    for path in files:
        try:
            h, w = image_size(path)
        except BadRasterError:
            h = w = 0
        if h <= tile and w <= tile:
            items.append((path, None))
            continue
        items += [(path, c.window) for c in chip_grid(h, w, tile, stride or tile)]
    return items


def item_name(path: Path, window: Window | None) -> str:
    """How a raster or chip is named in warnings and failure lists."""
    return f"{path} (chip at x {window[0]}, y {window[1]})" if window else str(path)


def build_one(
    path: str,
    key: FileKey,
    spec: PreprocessSpec,
    target: ShardTarget | None,
    within: str | None = None,
) -> tuple[Entry | None, int, str | None]:
    """Reader-process task: reads one raster, writes it into its shard row (if
    caching); returns its entry and CRC, or its failure reason. ``within``: the
    file opened must lie in this folder."""
    try:
        r = load_resampled(path, spec, window=key.window, within=within)
    except BadRasterError as e:
        return None, 0, e.reason
    except Exception as e:  # a reader must report, not die: keep the reason
        return None, 0, failure_reason(e)
    try:
        crc = write_row(target, r) if target is not None else 0
    except OSError as e:  # the cache's, not the raster's: the run stops (_settle)
        return None, 0, CannotWrite(e.strerror or str(e))
    return Entry.of(key, r), crc, None


def prepare(
    files: Sequence[Path | Item],
    spec: PreprocessSpec,
    *,
    cache_root: str | os.PathLike[str] | None,
    workers: int,
    on_file: Callable[[Path, str | None], None] | None = None,
    timeout: float | None = None,
    max_nodata: float = 1.0,
    order: Sequence[int] | None = None,
    on_sample: Callable[[int, Entry], None] | None = None,
    stop: threading.Event | None = None,
    within: str | os.PathLike[str] | None = None,
    cache_within: str | os.PathLike[str] | None = None,
    cache: SampleCache | None = None,
) -> Prepared:
    """Checks, measures and (with ``cache_root``) caches every raster of ``files``
    (each file opened must lie in the folder ``within``, where given; the cache
    in ``cache_within``; ``cache``: the cache opened already, for ``cache_root``).

    ``spec.in_chans`` (or, when None, the first good raster's band count in
    listing order) is the band count every raster must have.

    Args:
        files: the rasters, in listing order, or chips of them (:func:`chip_items`).
        spec: the preprocessing; its normalisation is not needed yet.
        cache_root: the cache's root directory, or None for no cache.
        workers: reader processes (0: read here).
        on_file: called after each file with its path and failure reason (or
            None); progress bars and --strict hook in here (it may raise).
        timeout: seconds one raster may take in a reader process.
        max_nodata: chips with more nodata than this share are left out.
        order: the order in which to read and report the files (positions in
            ``files``; default: as listed). The result is in listing order.
        on_sample: called with each usable sample's position and entry, in
            ``order``, once its arrays are in the cache (before the screening
            that needs every raster: see :func:`norm_refusal`).
        stop: once set, the pass ends at once (within 0.1 s while it waits for
            a reader), raising ``_Stopped``.

    Raises:
        NoInputError: no file could be used.
    """
    result = Prepared()
    if cache is not None:
        result.cache = cache
    elif cache_root is not None:
        result.cache = SampleCache(cache_root, spec, within=cache_within)
    items = [f if isinstance(f, tuple) else (Path(f), None) for f in files]
    try:
        _prepare(
            result, items, spec, workers, on_file, timeout, max_nodata,
            list(order) if order is not None else list(range(len(items))), on_sample,
            stop, None if within is None else str(within),
        )  # fmt: skip
    except BaseException:
        if result.cache is not None:
            result.cache.close()
        raise
    if result.files:
        _screen(result, spec)
    if not result.files:
        if result.cache is not None:
            result.cache.close()
        first = result.failed[0] if result.failed else ("", "no files")
        rasters = len({path for path, _ in items})
        why = f"first: {first[0]}: {first[1]}"
        if not result.failed and result.chips_skipped:
            why = f"all {result.chips_skipped} chip(s) are nodata or above --max-nodata"
        raise NoInputError(f"none of the {rasters} TIFF file(s) could be used ({why})")
    return result


def _screen(result: Prepared, spec: PreprocessSpec) -> None:
    """Merges the norm statistics, leaving out rasters no normalisation can use.

    With statistics computed from the data, or with each raster's own mean and
    spread in its scale vector (``scale_stats``: the model's input, and the
    scale vector's centre and spread), a raster far outside the rest
    (stats.far_outliers) is left out first, so that it cannot decide them. Then,
    with fixed normalisation, a raster whose values would normalise to more than
    OUTLIER_FACTOR (its mean that many stds from norm_mean, or its own std that
    many times norm_std) is refused: one such raster turned the loss into NaN.
    """
    fixed = spec.norm == "fixed"
    result.per_file = [(e.count, e.mean, e.std) for e in result.entries]
    keep = ~result.finish(
        leave_out=(fixed and spec.norm_mean is None) or spec.scale_stats
    )
    left_out = np.flatnonzero(~keep).tolist()
    reasons = dict(zip(left_out, (r for _, r in result.outliers), strict=True))
    if fixed and result.stats.count is not None:
        norm = dataclasses.replace(
            spec,
            norm_mean=spec.norm_mean or tuple(result.mean),
            norm_std=spec.norm_std or tuple(usable_std(result.std)),
        )
        peaks = norm_peaks(
            np.stack([e.mean for e in result.entries]),
            np.stack([e.std for e in result.entries]),
            norm,
        )
        warned: set[Path] = set()
        for i in np.flatnonzero(keep & ~(peaks <= OUTLIER_FACTOR)).tolist():
            reasons[i] = norm_refusal_reason(float(peaks[i]), norm)
            keep[i] = False
            if result.files[i] not in warned:  # a raster's chips: one line
                log.warning("skipped %s: %s", result.files[i], reasons[i])
                warned.add(result.files[i])
    for i in sorted(reasons):
        name = item_name(result.files[i], result.entries[i].key.window)
        result.screened.append((name, reasons[i]))
        result.failed.append((name, reasons[i]))
    for name in ("files", "entries", "per_file", "positions"):
        items = getattr(result, name)
        setattr(result, name, [x for x, k in zip(items, keep, strict=True) if k])


def _prepare(
    result: Prepared,
    items: list[Item],
    spec: PreprocessSpec,
    workers: int,
    on_file: Callable[[Path, str | None], None] | None,
    timeout: float | None,
    max_nodata: float,
    order: list[int],
    on_sample: Callable[[int, Entry], None] | None,
    stop: threading.Event | None,
    within: str | None,
) -> None:
    outcome: dict[int, Entry | str] = {}  # item index -> entry or reason
    keys: dict[int, FileKey] = {}
    files = [path for path, _ in items]
    for i, (path, window) in enumerate(items):
        try:
            keys[i] = FileKey.of(path, window)
        except OSError as e:
            outcome[i] = f"cannot open: {e.strerror or e}"
    found = result.cache.lookup(keys.values()) if result.cache is not None else {}
    result.reused = len(found)
    bands = spec.in_chans or (len(spec.bands) if spec.bands else None)
    todo = []
    for i in sorted(keys):
        entry = found.get(keys[i])
        if entry is None:
            todo.append(i)
        elif entry.row < 0:  # read before: no valid pixel (a nodata chip, say)
            outcome[i] = ALL_NODATA
        else:
            outcome[i] = entry
            bands = bands or len(entry.mean)
    if bands is None:  # the first good raster decides: read until one is good
        bands = _first_band_count(files, keys, todo, spec, outcome, stop, within)
    result.bands = bands
    rank = {i: k for k, i in enumerate(order)}
    todo.sort(key=rank.__getitem__)
    windows = {i: w for i, (_, w) in enumerate(items) if w is not None}
    report = _Reporter(
        result, files, outcome, bands, on_file, windows, max_nodata, order, on_sample
    )
    report()
    if (
        bands is not None
        and spec.norm_mean is not None
        and len(spec.norm_mean) != bands
    ):
        raise ConfigError(
            f"norm_mean/norm_std have {len(spec.norm_mean)} value(s) but the "
            f"rasters have {bands} band(s) (in_chans): give one per band, or "
            "choose the bands with --bands",
            key="norm_mean",
        )
    if todo:
        spec = dataclasses.replace(spec, in_chans=bands)
        # pyarrow's first table (a shard's index) imports pandas, which held
        # the main thread at the first commit while the readers ran dry
        # (benchmarks/feed_pass.py); it runs beside the readers' start instead.
        with ReaderPool(workers, timeout=timeout) as pool, warming_up():
            _build(
                result.cache, files, keys, todo, spec, pool, outcome, report, stop,
                within,
            )  # fmt: skip
    report()
    report.in_listing_order()


def _first_band_count(
    files: list[Path],
    keys: dict[int, FileKey],
    todo: list[int],
    spec: PreprocessSpec,
    outcome: dict[int, Entry | str],
    stop: threading.Event | None,
    within: str | None,
) -> int | None:
    """The band count of the first of ``todo`` that reads well (it is read
    again later, into the cache); those that fail before it are settled in
    ``outcome`` and leave ``todo``. None, with every one left settled as
    having no valid pixel, when none reads well."""
    k = 0
    while k < len(todo):
        if stop is not None and stop.is_set():
            raise PassStopped
        entry, _, reason = build_one(str(files[todo[k]]), keys[todo[k]], spec, None,
                                     within)  # fmt: skip
        if entry is not None:
            return len(entry.mean)
        if reason == ALL_NODATA:  # read again below too: cached as such
            k += 1
            continue
        outcome[todo.pop(k)] = str(reason)
    outcome.update(dict.fromkeys(todo, ALL_NODATA))
    todo.clear()
    return None


class _Reporter:
    """Settles items in ``order`` (positions in ``files``) as their outcome becomes
    known: a raster with another band count fails, each is reported once
    (``on_file``; ``on_sample`` too when usable), and ``result`` collects them.
    A chip with no valid pixels (or above ``max_nodata``) is only counted; a
    raster's failing chips are warned about once."""

    def __init__(
        self,
        result: Prepared,
        files: list[Path],
        outcome: dict[int, Entry | str],
        bands: int | None,
        on_file: Callable[[Path, str | None], None] | None,
        windows: dict[int, Window],
        max_nodata: float,
        order: list[int],
        on_sample: Callable[[int, Entry], None] | None,
    ) -> None:
        self.result, self.files, self.outcome = result, files, outcome
        self.bands, self.on_file, self.next = bands, on_file, 0
        self.windows, self.max_nodata = windows, max_nodata
        self.order, self.on_sample = order, on_sample
        self.warned: set[Path] = set()
        self.failed_at: list[int] = []  # each failure's position

    def __call__(self) -> None:
        while self.next < len(self.order) and self.order[self.next] in self.outcome:
            i = self.order[self.next]
            got = self.outcome.pop(i)
            path = self.files[i]
            self.next += 1
            if isinstance(got, Entry) and len(got.mean) != self.bands:
                got = band_mismatch(len(got.mean), self.bands)
            chip = self.windows.get(i)
            if chip is not None and (
                got == ALL_NODATA
                or isinstance(got, Entry)
                and got.nodata_fraction > self.max_nodata
            ):
                self.result.chips_skipped += 1
                got = None
            elif isinstance(got, Entry):
                self.result.files.append(path)
                self.result.entries.append(got)
                self.result.positions.append(i)
                if self.on_sample is not None:
                    self.on_sample(i, got)
            else:
                name = item_name(path, chip)
                self.result.failed.append((name, got))
                self.failed_at.append(i)
                if self.on_file is not None:  # --strict stops here: no "skipped"
                    self.on_file(path, got)
                if path not in self.warned:
                    log.warning("skipped %s: %s", name, got)
                    self.warned.add(path)
                continue
            if self.on_file is not None:
                self.on_file(path, None)

    def in_listing_order(self) -> None:
        """Puts the result's samples and failures back in listing order."""
        r = self.result
        at = np.argsort(r.positions, kind="stable")
        r.files = [r.files[k] for k in at]
        r.entries = [r.entries[k] for k in at]
        r.positions = [r.positions[k] for k in at]
        at = np.argsort(self.failed_at, kind="stable")
        r.failed = [r.failed[k] for k in at]


def _build(
    cache: SampleCache | None,
    files: list[Path],
    keys: dict[int, FileKey],
    todo: list[int],
    spec: PreprocessSpec,
    pool: ReaderPool,
    outcome: dict[int, Entry | str],
    report: Callable[[], None],
    stop: threading.Event | None = None,
    within: str | None = None,
) -> None:
    """Reads ``todo`` in the pool, into new cache shards; fills ``outcome``."""
    # Read here (no reader process), each file is settled as soon as it is read.
    limit = pool.workers * IN_FLIGHT_PER_WORKER or 1
    pending: deque[tuple[int, Future, _Slot | None]] = deque()
    shards: list[_Shard] = []
    try:
        for n, i in enumerate(todo):
            slot = None
            if cache is not None:
                if not shards or shards[-1].used == shards[-1].build.rows:
                    rows = min(SHARD_ROWS, len(todo) - n)
                    chans = int(spec.channels or 1)  # the bands, and a slope channel
                    shards.append(_Shard(cache.new_shard(rows, chans)))
                slot = shards[-1].take()
            target = slot.shard.build.target(slot.row) if slot else None
            pending.append(
                (
                    i,
                    pool.submit(
                        build_one, str(files[i]), keys[i], spec, target, within
                    ),
                    slot,
                )
            )
            while len(pending) >= limit:
                _settle(*_oldest(pending, stop), pool, outcome, keys)
                report()
        while pending:
            _settle(*_oldest(pending, stop), pool, outcome, keys)
            report()
    except BaseException:
        for shard in shards:
            if not shard.committed:
                shard.build.discard()
        raise


def _oldest(
    pending: deque[tuple[int, Future, _Slot | None]], stop: threading.Event | None
) -> tuple[int, Future, _Slot | None]:
    """The oldest read in flight, once it is done (``_Stopped`` if ``stop`` is
    set first)."""
    if stop is not None:
        future = pending[0][1]
        while not stop.is_set() and not future.done():
            futures.wait([future], timeout=0.1)
        if stop.is_set():
            raise PassStopped
    return pending.popleft()


@dataclass
class _Shard:
    """A shard being built: rows handed out, rows settled."""

    build: ShardBuild
    used: int = 0
    settled: int = 0
    committed: bool = False

    def take(self) -> _Slot:
        self.used += 1
        return _Slot(self, self.used - 1)


@dataclass
class _Slot:
    shard: _Shard
    row: int


def _settle(
    i: int,
    fut: Future,
    slot: _Slot | None,
    pool: ReaderPool,
    outcome: dict[int, Entry | str],
    keys: dict[int, FileKey],
) -> None:
    try:
        entry, crc, reason = fut.result()
    except Exception as e:  # timed out, or the reader died
        entry, crc, reason = None, 0, failure_reason(e, pool.timeout)
    if slot is not None and isinstance(reason, CannotWrite):
        raise cannot_write(slot.shard.build.cache.where, reason)
    outcome[i] = entry if entry is not None else str(reason)
    if slot is None:
        return
    shard = slot.shard
    if entry is not None:
        shard.build.add(entry, slot.row, crc)
    elif reason == ALL_NODATA:  # its content's, not chance's: known next time
        shard.build.add(Entry.empty(keys[i]), -1, 0)
    shard.settled += 1
    if shard.settled == shard.build.rows:  # every row written: make it visible
        shard.build.commit()
        shard.committed = True


def cache_facts(prepared: Prepared) -> dict[str, Any]:
    """describe()'s facts as numbers (``cmae train --json``): the cache's
    directory (None without one), samples reused and read now, its bytes."""
    cache = prepared.cache
    total = len(prepared.files) + len(prepared.failed) + prepared.chips_skipped
    return {
        "cache_dir": None if cache is None else str(cache.where),
        "cache_reused": prepared.reused,
        "cache_read": total - prepared.reused if cache is not None else 0,
        "cache_bytes": 0 if cache is None else cache.nbytes(),
    }


def describe(prepared: Prepared) -> str:
    """One line about the cache: what was reused, what was read, where, how big."""
    cache = prepared.cache
    if cache is None:
        return "cache: none (--no-cache); every epoch reads the TIFFs"
    total = len(prepared.files) + len(prepared.failed) + prepared.chips_skipped
    what = (
        "raster(s) and chip(s)"
        if prepared.chips_skipped or any(e.key.window for e in prepared.entries)
        else "raster(s)"
    )
    size = cache.nbytes() / 2**20
    return (
        f"cache: {prepared.reused} of {total} {what} reused, "
        f"{total - prepared.reused} read now; {size:.1f} MB in {cache.where}"
    )


class PassStopped(Exception):
    """The consumer of a :class:`PassInThread` stopped it."""
