"""The runner: wires reader -> mapper -> writer and times each stage (no torch).

clip-retrieval's split: :mod:`.plan` decides what to embed, :mod:`.reader`
preprocesses files into shared-memory slots in reader processes, :mod:`.mapper`
runs onnxruntime on those slots, :mod:`.writer` flushes rows to Parquet parts and
merges them. The preprocessing comes from the model's own metadata.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from catchment_mae.batch import schema as table
from catchment_mae.batch.mapper import Mapper
from catchment_mae.batch.plan import Plan, ZonePlan, check_input
from catchment_mae.batch.reader import Batch, Item, Reader
from catchment_mae.batch.ring import SlotRing
from catchment_mae.batch.schema import Row
from catchment_mae.batch.writer import (
    ROWS_PER_PART,
    PartSink,
    check_table,
    clear_parts,
    listing_of,
    merge,
    parts_dir,
    read_previous,
    remove_stale_temps,
)
from catchment_mae.chips import Chip, chips
from catchment_mae.errors import CmaeError, NoInputError, OutputError
from catchment_mae.interrupt import sigterm_as_interrupt
from catchment_mae.io import check_writable, try_lock
from catchment_mae.preprocess import ALL_NODATA
from catchment_mae.warmup import warming_up
from catchment_mae.workers import READ_TIMEOUT, ReaderPool, available_cores
from catchment_mae.zones import Zone

log = logging.getLogger(__name__)


class NothingEmbeddedError(CmaeError):
    """Every file failed; the table with their reasons was still written
    (``summary`` says so, as a run that embedded something would)."""

    def __init__(self, message: str, summary: RunSummary) -> None:
        super().__init__(message)
        self.summary = summary


class EmbedInterrupted(CmaeError):
    """Ctrl-C or SIGTERM; what was embedded is saved for the next run."""

    exit_code = 130


@dataclass
class RunSummary:
    """Counts and per-stage seconds of one run."""

    out: str
    unit: str = "raster"  # what a row stands for, in the summary's line
    embedded: int = 0  # this run
    failed: int = 0  # this run
    already_done: int = 0  # kept from an earlier run (same path, size, mtime, model)
    rows: int = 0  # in the table now
    nothing_new: bool = False
    provider: str = ""
    seconds: float = 0.0
    session_seconds: float = 0.0  # loading the session (CUDA's: beside reading)
    session_wait_seconds: float = 0.0  # the first batch waiting for CUDA's session
    first_batch_seconds: float = 0.0  # from the start to the first batch read
    wait_seconds: float = 0.0  # waiting for the readers (the first batch's included)
    read_seconds: float = 0.0  # summed over workers
    inference_seconds: float = 0.0
    write_seconds: float = 0.0  # rows to Parquet parts, and the final merge
    failures: list[dict[str, str]] = field(default_factory=list)
    chips_skipped: int = 0  # --tile: chips above --max-nodata (all nodata)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        if self.nothing_new and self.failed:
            return (
                f"nothing new: {self.already_done} {self.unit}(s) already embedded, "
                f"{self.failed} failed again for the same reasons"
            )
        if self.nothing_new:
            return (
                f"nothing new: all {self.already_done} {self.unit}(s) already embedded"
            )
        done = f" ({self.already_done} already done)" if self.already_done else ""
        skipped = (
            f", {self.chips_skipped} chip(s) left out (nodata above --max-nodata)"
            if self.chips_skipped
            else ""
        )
        return f"{self.embedded} embedded, {self.failed} failed{done}{skipped}"


def embed_dir(
    input_dir: str | os.PathLike[str],
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    batch_size: int = 32,
    num_workers: int | None = None,
    device: str = "auto",
    shard: tuple[int, int] | None = None,
    recursive: bool = True,
    overwrite: bool = False,
    rows_per_part: int = ROWS_PER_PART,
    timeout: float | None = READ_TIMEOUT,
    within: str | os.PathLike[str] | None = None,
    on_item: Callable[[Item], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    tile: int | None = None,
    stride: int | None = None,
    max_nodata: float = 1.0,
    tile_m: float | None = None,
    stride_m: float | None = None,
) -> RunSummary:
    """Embeds every TIFF under ``input_dir`` with the ``.onnx`` ``model``.

    Running it again continues: rows of the earlier table (and parts of an
    interrupted run) whose path, size and mtime still match, with the same model,
    are kept; failed files are tried again.

    Args:
        input_dir: the archive.
        model: an encoder written by ``cmae export``.
        out: the ``.parquet`` to write (atomically).
        batch_size: rasters per onnxruntime call.
        num_workers: reader processes (default: one per core; 0 reads inline).
        device: "auto" (CUDA when it loads, else CPU), "cpu" or "cuda".
        shard: (K, N): only the files whose sha1(relative path) % N == K - 1.
        recursive: search sub-directories.
        overwrite: start over instead of continuing.
        rows_per_part: rows flushed to disk at a time (at most these are lost if
            the machine dies).
        timeout: seconds one file may take in a reader process (None: no limit).
        within: skip files (symlinks included) that resolve outside this folder
            (the web UI's --data-root).
        on_item: called for every raster (or chip) read (progress bars).
        on_total: called once, from a thread of its own, with the number of
            rasters this run will read, when a walk beside the run has counted
            them (whole rasters only: chips are counted as they are cut).
        tile: embed chips of ``tile`` x ``tile`` pixels (full resolution), one
            row each, instead of whole rasters; edge chips are shifted inside,
            a raster smaller than a tile is one chip.
        stride: pixels between chips (default ``tile``: no overlap).
        max_nodata: chips whose nodata fraction is above this are skipped and
            counted (all-nodata chips always are).
        tile_m, stride_m: chips of ``tile_m`` ground metres instead (each
            raster's pixels per metre from its georeferencing; a raster without
            it gets a row saying so), ``stride_m`` apart (default ``tile_m``).
            The grid is recorded in the table: a re-run with another grid is
            refused (start over with ``overwrite``).

    Raises:
        NoInputError: no input directory or no TIFF in it (nothing is written).
        NothingEmbeddedError: every raster failed (the table is written).
        EmbedInterrupted: Ctrl-C or SIGTERM (the rows so far are kept).
    """
    root = Path(input_dir)
    grid = chip_grid_of(tile, stride, tile_m, stride_m)
    how = How(batch_size, num_workers, device, overwrite, timeout, within,
              on_item, on_total, max_nodata)  # fmt: skip

    def start(mapper: Mapper, out: Path) -> Run:
        return start_run(root, out, mapper, overwrite, shard, recursive, within,
                         rows_per_part, grid)  # fmt: skip

    return run_embedding(root, model, Path(out), start, how)


@dataclass
class How:
    """How a run reads and embeds (embed_dir's and embed_zones' arguments)."""

    batch_size: int = 32
    num_workers: int | None = None
    device: str = "auto"
    overwrite: bool = False
    timeout: float | None = READ_TIMEOUT
    within: str | os.PathLike[str] | None = None
    on_item: Callable[[Item], None] | None = None
    on_total: Callable[[int], None] | None = None
    max_nodata: float = 1.0
    unit: str = "raster"  # what a row stands for (RunSummary.unit)
    # What turns the rows read into the rows kept: (item's chip or zone, row,
    # embedding) -> the row and embedding to keep, or None while a zone's
    # chips are still coming (embed-zones --chips).
    combine: Callable[[Any, Row, Any], tuple[Row, Any] | None] | None = None


def run_embedding(
    root: Path,
    model: str | os.PathLike[str],
    out: Path,
    start_fn: Callable[[Mapper, Path], Run],
    how: How,
) -> RunSummary:
    """The run both commands share: readers, the model, the table; ``start_fn``
    plans the work once the model is loaded (its metadata goes in the table)."""
    start = time.perf_counter()
    check_writable([out], overwrite=True)  # an existing table is continued
    check_table(out)
    cores = available_cores()
    workers = cores if how.num_workers is None else how.num_workers
    summary = RunSummary(out=str(out), unit=how.unit)
    try:
        with (
            output_lock(out),
            sigterm_as_interrupt(),
            ReaderPool(workers, timeout=how.timeout) as pool,
            warming_up(),
        ):
            # onnxruntime gets every core, and so do the readers (one BLAS thread
            # each); on the CPU they take turns (reader.py). With one onnxruntime
            # thread beside the readers, vit_small ran at about 0.6 of its
            # limit (benchmarks/README.md).
            mapper = Mapper(model, how.device, threads=cores)
            run = start_fn(mapper, out)
            log.info("embedding with %s on %s", Path(model).name, mapper.device_name)
            if how.on_total is not None and run.grid is None:
                count_beside(run.plan, how.on_total)
            try:
                with Reader(
                    root, mapper.spec, pool, how.batch_size, overlap=mapper.gpu,
                    within=how.within,
                ) as reader:  # fmt: skip
                    _embed_all(run.work, reader, mapper, run.sink, summary, how)
            except KeyboardInterrupt as e:
                pool.close(kill=True)
                raise interrupted_saving(run.sink, how.overwrite) from e
            pool.close(kill=True)  # all read: nothing of theirs is left to lose
            _timings(summary, start, reader, mapper)
            finish(out, run, summary)
    except KeyboardInterrupt as e:  # between batches, while merging, ...
        raise interrupted_kept(out, how.overwrite) from e
    return checked(summary, start)


def _timings(summary: RunSummary, start: float, reader: Reader, mapper: Mapper) -> None:
    """Where the run's time went, from its reader and mapper."""
    summary.first_batch_seconds = (reader.first_batch_at or start) - start
    summary.wait_seconds = reader.wait_seconds
    summary.provider = mapper.provider
    summary.session_seconds = mapper.session_seconds
    summary.session_wait_seconds = mapper.wait_seconds
    summary.inference_seconds = mapper.inference_seconds


# -------------------------------------------------- shared with ray_runner.py
@dataclass
class Run:
    """What a run starts from (plain or Ray): the rows an earlier run left, the
    plan, the sink for this run's rows, the work (paths, or (path, chip) with a
    chip ``grid``) and the table's metadata."""

    previous: Any
    plan: Plan | ZonePlan
    sink: PartSink
    work: Iterable[str | tuple[str, Chip] | tuple[str, Zone]]
    metadata: dict[str, Any]
    grid: dict[str, Any] | None
    extra: Callable[[Any], Any] | None = None  # the final table's own columns

    @property
    def tiled(self) -> bool:
        return self.grid is not None


def start_run(
    root: Path,
    out: Path,
    mapper: Mapper,
    overwrite: bool,
    shard: tuple[int, int] | None,
    recursive: bool,
    within: str | os.PathLike[str] | None,
    rows_per_part: int,
    grid: dict[str, Any] | None,
) -> Run:
    """Reads what an earlier run left (nothing with ``overwrite``), plans, and
    opens the sink; parts of an earlier run are dropped with ``overwrite``, stale
    temps always. With ``grid`` (chip_grid_of), the work is each file's chips
    and the grid is recorded in the table."""
    tiled = grid is not None
    check_input(root)  # before the table's listing is compared with it
    listing = listing_of(root, shard, recursive)
    metadata = {**mapper.metadata, table.LISTING: listing}
    if tiled:
        metadata[table.CHIP_GRID] = grid
    previous = None if overwrite else read_previous(out, mapper.sha256, grid, listing)
    fence = Path(within) if within is not None else None
    plan = Plan(root, previous, shard, recursive, within=fence)
    if overwrite:
        clear_parts(out)
    remove_stale_temps(out)
    sink = PartSink(out, mapper.dim, metadata, rows_per_part, tiled)
    work: Iterable[str | tuple[str, Chip]] = plan
    if grid is not None:
        metres = grid["unit"] == "m"
        work = chips(plan, root, grid["tile"], grid["stride"], metres)
    return Run(previous, plan, sink, work, metadata, grid)


def count_beside(plan: Plan, on_total: Callable[[int], None]) -> None:
    """Counts what ``plan`` will yield in a daemon thread, then says it."""

    def count() -> None:
        with contextlib.suppress(Exception):  # a progress bar's total, no more
            on_total(plan.count_todo())

    threading.Thread(target=count, daemon=True, name="cmae-count").start()


def chip_grid_of(
    tile: int | None,
    stride: int | None,
    tile_m: float | None,
    stride_m: float | None,
) -> dict[str, Any] | None:
    """The chip grid asked for, as recorded in the table (None: whole rasters)."""
    if tile is not None and tile_m is not None:
        raise ValueError("tile and tile_m exclude each other")
    if tile is not None:
        return {"tile": tile, "stride": stride or tile, "unit": "px"}
    if tile_m is not None:
        return {"tile": tile_m, "stride": stride_m or tile_m, "unit": "m"}
    return None


def count(summary: RunSummary, row: Row) -> None:
    """Counts one row of this run (a failure is named in the log)."""
    if row.error is None:
        summary.embedded += 1
    else:
        summary.failed += 1
        summary.failures.append({"path": row.path, "error": row.error})
        log.warning("failed %s: %s", row.path, row.error)


def finish(out: Path, run: Run, summary: RunSummary) -> None:
    """Flushes the last rows and merges the table (or keeps it, when nothing
    changed).

    Raises:
        NoInputError: the listing held no TIFF.
    """
    previous, plan, sink = run.previous, run.plan, run.sink
    t0 = time.perf_counter()
    sink.flush()
    summary.already_done = plan.already_done
    if not plan.order:
        clear_parts(out)
        raise NoInputError(plan.nothing_listed())
    if _nothing_new(out, previous, plan.order, sink, summary):
        # Only failures that failed again, for the same reasons: keep the table.
        clear_parts(out)
        summary.nothing_new, summary.rows = True, previous.num_rows
    else:
        summary.rows = merge(
            out, previous, plan.order, sink.dim, run.metadata, run.tiled, sink.dir,
            run.extra,
        )  # fmt: skip
    summary.write_seconds += time.perf_counter() - t0


def interrupted_saving(sink: PartSink, overwrite: bool) -> EmbedInterrupted:
    """Flushes what this run embedded; the error that says where it is."""
    sink.flush()
    return EmbedInterrupted(
        f"interrupted: {sink.rasters} raster(s) of this run are saved in "
        f"{sink.where}; {_to_continue(overwrite)}"
    )


def interrupted_kept(out: Path, overwrite: bool) -> EmbedInterrupted:
    return EmbedInterrupted(
        f"interrupted: the rows written so far are kept in {parts_dir(out)}; "
        f"{_to_continue(overwrite)}"
    )


def _to_continue(overwrite: bool) -> str:
    if overwrite:  # run again with it, the saved rows would be thrown away
        return "run the same command without --overwrite to continue"
    return "run the same command to continue"


def checked(summary: RunSummary, start: float) -> RunSummary:
    """The summary with its time, unless every file failed.

    Raises:
        NothingEmbeddedError: nothing embedded now or before (the table holds
            the failures' reasons).
    """
    summary.seconds = time.perf_counter() - start
    if summary.embedded + summary.already_done == 0:
        raise NothingEmbeddedError(
            f"nothing embedded: all {summary.failed} file(s) failed; their reasons "
            f"are in the error column of {summary.out}",
            summary,
        )
    return summary


def _embed_all(
    work: Iterable[Any],
    reader: Reader,
    mapper: Mapper,
    sink: PartSink,
    summary: RunSummary,
    how: How,
) -> None:
    on_item, max_nodata = how.on_item, how.max_nodata
    for batch in reader.batches(work):
        rows = batch_rows(mapper, batch, reader.ring)
        reader.overlap = reader.overlap and mapper.gpu  # CUDA did not load: waves
        t0 = time.perf_counter()
        for item, (row, embedding) in zip(batch.items, rows, strict=True):
            summary.read_seconds += item.read_seconds
            kept = (
                (row, embedding)
                if how.combine is None
                else how.combine(item.chip, row, embedding)
            )
            if kept is not None:
                take(summary, sink, *kept, item.chip, max_nodata)
            if on_item is not None:
                on_item(item)
        summary.write_seconds += time.perf_counter() - t0


def batch_rows(mapper: Mapper, batch: Batch, ring: SlotRing) -> list[tuple[Row, Any]]:
    """Every file's row with its embedding (None for a failure), in order. An
    onnxruntime error fails the batch's good files with its reason (their
    items then hold the rows that say so)."""
    if not batch.good:
        return [(it.row, None) for it in batch.items]
    out, reason = mapper.embed_slots(ring, batch.rows)
    if out is None:
        for it in batch.good:
            it.row = dataclasses.replace(it.row, error=reason)
        return [(it.row, None) for it in batch.items]
    embeddings = {id(it): out[k] for k, it in enumerate(batch.good)}
    return [(it.row, embeddings.get(id(it))) for it in batch.items]


def take(
    summary: RunSummary,
    sink: PartSink,
    row: Row,
    embedding: Any,
    chip: Chip | Zone | None,
    max_nodata: float,
) -> None:
    """Counts a row of this run and hands it to the sink; a chip with nothing
    (or too little) to embed is counted as skipped instead. A raster's rows
    end with its last chip (they must come in grid order)."""
    if isinstance(chip, Chip) and _empty_chip(row, max_nodata):
        summary.chips_skipped += 1
        if chip.last:
            sink.end_raster(row.path)
        return
    count(summary, row)
    sink.add(row, embedding, last_of_raster=not isinstance(chip, Chip) or chip.last)


def _empty_chip(row: Row, max_nodata: float) -> bool:
    """A chip with nothing (or too little) to embed: skipped, not a failure."""
    if row.error is not None:
        return row.error == ALL_NODATA
    return row.nodata_fraction is not None and row.nodata_fraction > max_nodata


def _nothing_new(
    out: Path,
    previous: Any,
    order: dict[str, int],
    sink: PartSink,
    summary: RunSummary,
) -> bool:
    """Whether this run changed nothing in the finished table ``out``."""
    if summary.embedded or sink.first_seq or previous is None or not out.exists():
        return False
    # A table of chips holds a raster's path once per chip, and none for a
    # raster whose chips were all skipped (read again, so known this run).
    listed = [p for p in order if p not in sink.without_rows]
    if list(dict.fromkeys(previous.column("path").to_pylist())) != listed:
        return False
    errors = dict(
        zip(
            previous.column("path").to_pylist(),
            previous.column("error").to_pylist(),
            strict=True,
        )
    )
    return all(errors.get(f["path"]) == f["error"] for f in summary.failures)


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """One writer per output: a second run on the same --out is refused."""
    lock_path = out.with_name(f".{out.name}.lock")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle = try_lock(lock_path, nofollow=True)  # held for the whole block
    except OSError as e:
        raise OutputError(f"{out}: cannot write there: {e.strerror or e}") from e
    if handle is None:  # the holder's lock file stays
        raise CmaeError(
            f"{out}: another cmae embed-dir is writing it (lock {lock_path})"
        )
    try:
        yield
    finally:
        handle.close()
        with contextlib.suppress(OSError):
            lock_path.unlink()
