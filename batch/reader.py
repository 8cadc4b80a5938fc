"""Reader stage: reader processes preprocess TIFFs straight into shared-memory slots.

The main process hands each file a slot of a :class:`~catchment_mae.batch.ring.
SlotRing`; a reader process reads and preprocesses it into that slot and sends
back only its :class:`~catchment_mae.batch.schema.Row` (a few hundred bytes).
Slots come in batches: ``batch_size`` consecutive slots per batch, so a batch
reaches onnxruntime as a view of the ring. A file that fails leaves a gap, which
the last good slots of its batch fill (a copy of one slot per failure).

Two schedules (``overlap``): with a GPU, reading runs ahead of the model, as far
as the ring's free batches allow (READ_AHEAD_BYTES of them: the readers also read
while the CUDA session loads); on the CPU, readers and the model take turns,
each on every core: a wave of batches is read, then embedded (overlapping, they
only slowed each other down: benchmarks/README.md). Memory is the ring's, fixed,
however many files there are. No torch here.
"""

from __future__ import annotations

import itertools
import os
import stat
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from catchment_mae.batch.ring import RingLayout, SlotRing
from catchment_mae.batch.schema import Row
from catchment_mae.chips import Chip
from catchment_mae.errors import BadRasterError
from catchment_mae.geo import Footprint, footprint
from catchment_mae.preprocess import check_in_range, load_resampled, normalise, resample
from catchment_mae.raster import check_file
from catchment_mae.spec import PreprocessSpec
from catchment_mae.workers import ReaderPool, failure_reason, preload
from catchment_mae.zone_reader import read_zone
from catchment_mae.zones import Zone

preload(__name__)  # reader processes run this module's tasks

# Bytes of ring the wave of batches read in one turn may take (the CPU schedule),
# beyond which a turn holds fewer batches (many bands); never less than one.
WAVE_BYTES = 64 << 20
# Bytes of ring the readers may fill ahead of a GPU (at most half the free space
# of /dev/shm, never under three batches). They read while its session loads and
# while a batch runs: 256 MB is about 1,000 one-band slots of 224 px, about a
# second of 16 readers.
READ_AHEAD_BYTES = 256 << 20


@dataclass
class Item:
    """One file after the reader: its row, and where its input lies in the ring."""

    row: Row
    slot: int | None = None  # None: the file failed (``row.error`` says why)
    read_seconds: float = 0.0
    chip: Chip | Zone | None = None  # which chip of the file, or the zone read

    @property
    def path(self) -> str:
        return self.row.path

    @property
    def error(self) -> str | None:
        return self.row.error


@dataclass
class Batch:
    """Consecutive ring slots ``rows`` holding the inputs of ``good``, in order;
    ``items`` are all the batch's files in listing order, failures included."""

    items: list[Item]
    good: list[Item] = field(default_factory=list)
    rows: slice = field(default_factory=lambda: slice(0, 0))


# Rings this process writes into, by name: the reader's own ring when reading
# inline, else the one a reader process attached to (its latest: a web server's
# reader processes serve one run after another).
_rings: dict[str, SlotRing] = {}


def _ring(layout: RingLayout) -> SlotRing:
    ring = _rings.get(layout.name)
    if ring is None:
        for old in _rings.values():
            old.close()
        _rings.clear()
        ring = _rings[layout.name] = SlotRing.attach(layout)
    return ring


def read_into_slot(
    root: str,
    rel: str,
    spec: PreprocessSpec,
    layout: RingLayout,
    slot: int,
    chip: Chip | Zone | None = None,
    within: str | None = None,
) -> tuple[Row, float]:
    """Reads and preprocesses one file (or chip) into ``slot`` of the ring: its
    row and the seconds it took. A file that cannot be used is a row with its
    reason."""
    row, sample, seconds = read_one(root, rel, spec, chip, within)
    if sample is not None:
        ring = _ring(layout)
        ring.image[slot], ring.valid[slot], ring.scale[slot] = sample
    return row, seconds


def read_one(
    root: str,
    rel: str,
    spec: PreprocessSpec,
    chip: Chip | Zone | None = None,
    within: str | None = None,
) -> tuple[Row, tuple[np.ndarray, np.ndarray, np.ndarray] | None, float]:
    """One file's (or chip's, or zone's) row and its model input (normalised
    image, valid levels as uint8, scale), or None with the row's reason; and the
    seconds it took. A chip's row has the raster's size and the chip's window,
    footprint and nodata fraction. ``within``: the file opened must lie in this
    folder."""
    t0 = time.perf_counter()
    if isinstance(chip, Zone):
        row, sample = read_zone_sample(root, chip, spec, within)
        return row, sample, time.perf_counter() - t0
    path = Path(root) / rel
    size = mtime = None
    try:
        try:
            st = path.stat()
        except OSError:
            check_file(path)  # says why in words (gone, a dangling link, a loop)
            raise
        if stat.S_ISREG(st.st_mode):
            size, mtime = st.st_size, st.st_mtime
        if chip is not None and chip.error is not None:
            raise BadRasterError(path, chip.error)
        window = chip.window if chip else None
        r = load_resampled(path, spec, window=window, within=within)
        check_in_range(r, spec)
        image = normalise(r, spec).image
    except BadRasterError as e:
        row = Row(path=rel, file_size=size, mtime=mtime, error=e.reason)
        return _chip_row(row, chip, None), None, time.perf_counter() - t0
    except Exception as e:  # a reader must report, not die: keep the reason
        row = Row(path=rel, file_size=size, mtime=mtime, error=failure_reason(e))
        return _chip_row(row, chip, None), None, time.perf_counter() - t0
    info = r.info
    where = footprint(info.geo, info.height, info.width)
    row = Row.of_raster(rel, info, 1.0 - r.valid_fraction, where, (size, mtime))
    return _chip_row(row, chip, r), (image, r.valid, r.scale), time.perf_counter() - t0


def read_zone_sample(
    root: str, zone: Zone, spec: PreprocessSpec, within: str | None = None
) -> tuple[Row, tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
    """A zone's row and model input (or None, the row saying why): its window
    of the mosaic through the one preprocessing path. Its nodata fraction is
    that of the pixels inside its polygon; its geometry the polygon's."""
    try:
        raster, inside = read_zone(
            root, zone, bands=spec.bands, nodata=spec.nodata,
            max_pixels=spec.max_pixels, max_memory_mb=spec.max_memory_mb,
            in_chans=spec.in_chans if spec.bands is None else None, within=within,
        )  # fmt: skip
        valid = int(raster.valid.sum())
        r = resample(raster, spec)
        check_in_range(r, spec)
        image = normalise(r, spec).image
    except BadRasterError as e:
        return failed_zone_row(zone, e.reason), None
    except Exception as e:  # a reader must report, not die: keep the reason
        return failed_zone_row(zone, failure_reason(e)), None
    geo = r.info.geo
    where = Footprint(
        zone.crs, *(geo.pixel_size or (None, None)), zone.wkb84, zone.bbox84
    )
    row = Row.of_raster(zone.key, r.info, 1.0 - valid / max(inside, 1), where)
    return row, (image, r.valid, r.scale)


def failed_zone_row(zone: Zone, reason: str) -> Row:
    """The row of a zone that could not be embedded: its polygon, the grid it
    was to be read from, and why."""
    return Row(
        zone.key, geometry=zone.wkb84, bbox=zone.bbox84, crs=zone.crs, error=reason
    )


def failed_row(rel: str, chip: Chip | Zone | None, reason: str) -> Row:
    """The row of a file (or chip, or zone) whose read did not report: it
    timed out, its reader died."""
    if isinstance(chip, Zone):
        return failed_zone_row(chip, reason)
    return _chip_row(Row(rel, error=reason), chip, None)


def _chip_row(row: Row, chip: Chip | None, r: Any) -> Row:
    """A chip's row: its window, and the raster's own size (not the chip's)."""
    if chip is None or chip.error is not None:  # not cut: no window
        return row
    row.tile_row, row.tile_col = chip.row, chip.col
    row.x0, row.y0 = chip.x0, chip.y0
    row.tile_width, row.tile_height = chip.width, chip.height
    if r is not None and r.info.raster_size is not None:
        row.height, row.width = r.info.raster_size
    return row


@dataclass
class _Pending:
    """A batch whose files are being read into ring batch ``index``."""

    index: int
    jobs: list[tuple[str, Chip | Zone | None, Future]]


class Reader:
    """Reads files (relative to ``root``) into a ring, batch by batch, in order.

    Args:
        root: the input directory.
        spec: the model's preprocessing (``in_chans`` and ``image_size`` set).
        pool: the reader processes (``ReaderPool(0)`` reads in this process).
        batch_size: slots per batch.
        overlap: read ahead while the caller runs the model (a GPU); else take
            turns with it (the CPU).
    """

    def __init__(
        self,
        root: Path,
        spec: PreprocessSpec,
        pool: ReaderPool,
        batch_size: int,
        *,
        overlap: bool = False,
        within: str | os.PathLike[str] | None = None,
    ) -> None:
        if spec.channels is None or spec.scale_dim is None:
            raise ValueError("the reader needs spec.in_chans")
        self.root, self.spec, self.pool = root, spec, pool
        self.within = None if within is None else str(within)
        self.batch_size, self.overlap = batch_size, overlap
        per_row = (4 * spec.channels + 1) * spec.image_size**2 + 4 * spec.scale_dim
        batch_bytes = per_row * batch_size
        # One wave: up to four batches, within WAVE_BYTES. Ahead of a GPU: one
        # batch embedding, the others being read. ``overlap`` may turn False
        # (CUDA did not load): the rest is read in waves.
        self.wave = max(1, min(4, WAVE_BYTES // batch_bytes))
        self.n_batches = self.wave
        if overlap:
            room = min(READ_AHEAD_BYTES, shm_free() // 2)
            self.n_batches = max(3, room // batch_bytes)
        self.ring = SlotRing(
            self.n_batches * batch_size,
            spec.channels,
            spec.image_size,
            shared=pool.workers > 0,
            scale_dim=spec.scale_dim,
        )
        _rings[self.ring.layout.name] = self.ring  # reading inline finds it
        self.first_batch_at: float | None = None  # perf_counter() at its handing over
        self.wait_seconds = 0.0  # the caller's time spent waiting for the readers

    def batches(
        self, rel_paths: Iterable[str | tuple[str, Chip | Zone]]
    ) -> Iterator[Batch]:
        """Batches in the order of ``rel_paths`` (paths, or (path, chip) or
        (key, zone) pairs);
        a batch's slots stay the caller's until it asks for the next batch."""
        rels = iter(rel_paths)
        free = deque(range(self.n_batches))
        pending: deque[_Pending] = deque()
        more = True
        while True:
            if self.overlap or not pending:
                while free and more and (self.overlap or len(pending) < self.wave):
                    chunk = list(itertools.islice(rels, self.batch_size))
                    if not chunk:
                        more = False
                        break
                    pending.append(self._submit(free.popleft(), chunk))
            if not pending:
                return
            t0 = time.perf_counter()
            if not self.overlap:  # the whole wave read before the model runs
                for p in pending:
                    for *_, future in p.jobs:
                        future.exception()
            p = pending.popleft()
            batch = self._collect(p)
            t1 = time.perf_counter()
            self.wait_seconds += t1 - t0
            if self.first_batch_at is None:
                self.first_batch_at = t1
            yield batch
            free.append(p.index)

    def _submit(
        self, index: int, rels: list[str | tuple[str, Chip | Zone]]
    ) -> _Pending:
        base = index * self.batch_size
        root, spec, layout = str(self.root), self.spec, self.ring.layout
        jobs = []
        for j, item in enumerate(rels):
            rel, chip = item if isinstance(item, tuple) else (item, None)
            future = self.pool.submit(
                read_into_slot, root, rel, spec, layout, base + j, chip, self.within
            )
            jobs.append((rel, chip, future))
        return _Pending(index, jobs)

    def _collect(self, p: _Pending) -> Batch:
        """Waits for a batch's files; moves good slots down into failures' gaps."""
        base = p.index * self.batch_size
        items = []
        for j, (rel, chip, future) in enumerate(p.jobs):
            try:
                row, seconds = future.result()
            except Exception as e:  # timed out, reader died, ...: the file's row
                row = failed_row(rel, chip, failure_reason(e, self.pool.timeout))
                items.append(Item(row, chip=chip))
                continue
            slot = base + j if row.error is None else None
            items.append(Item(row, slot, seconds, chip))
        good = [it for it in items if it.slot is not None]
        for k, it in enumerate(good):
            if it.slot != base + k:
                self.ring.move(it.slot, base + k)
                it.slot = base + k
        return Batch(items, good, slice(base, base + len(good)))

    def close(self) -> None:
        """Frees the ring (its shared memory is unlinked). Stop the pool first:
        a reader may still be writing into it."""
        _rings.pop(self.ring.layout.name, None)
        self.ring.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def shm_free(where: str = "/dev/shm") -> int:
    """Bytes free for shared memory (Docker gives 64 MB by default); where there
    is no ``/dev/shm`` (macOS), as much as the ring may take."""
    try:
        st = os.statvfs(where)
    except OSError:
        return 2 * READ_AHEAD_BYTES
    return st.f_bavail * st.f_frsize
