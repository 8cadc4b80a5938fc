"""The runner: reader -> onnxruntime -> writer, timing each stage (no torch).

clip-retrieval's split: the reader decodes and preprocesses in worker processes
while onnxruntime runs the previous batch in this one; rows reach Parquet in row
groups. The preprocessing comes from the model's own metadata.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from catchment_mae import __version__
from catchment_mae.batch.reader import Item, Reader, in_shard, relative
from catchment_mae.batch.writer import (
    ROWS_PER_PART,
    PartSink,
    clear_parts,
    done_rows,
    merge,
    parts_dir,
    read_previous,
)
from catchment_mae.errors import CmaeError, NoInputError, OutputError
from catchment_mae.interrupt import sigterm_as_interrupt
from catchment_mae.io import check_writable, sha256_file, try_lock
from catchment_mae.raster import find_tiffs
from catchment_mae.runtime import (
    ONNX_FORMAT_VERSION,
    create_session,
    read_metadata,
    run_encoder,
    spec_from_metadata,
)

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"


class NothingEmbeddedError(CmaeError):
    """Every file failed; the table with their reasons was still written."""


class EmbedInterrupted(CmaeError):
    """Ctrl-C or SIGTERM; what was embedded is saved for the next run."""

    exit_code = 130


@dataclass
class RunSummary:
    """Counts and per-stage seconds of one run."""

    out: str
    embedded: int = 0  # this run
    failed: int = 0  # this run
    already_done: int = 0  # kept from an earlier run (same path, size, mtime, model)
    rows: int = 0  # in the table now
    nothing_new: bool = False
    provider: str = ""
    seconds: float = 0.0
    read_seconds: float = 0.0  # summed over workers
    inference_seconds: float = 0.0
    write_seconds: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        if self.nothing_new:
            return f"nothing new: all {self.already_done} raster(s) already embedded"
        done = f" ({self.already_done} already done)" if self.already_done else ""
        return f"{self.embedded} embedded, {self.failed} failed{done}"


def available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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
    on_item: Callable[[Item], None] | None = None,
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
        on_item: called for every raster read (progress bars).

    Raises:
        NoInputError: no input directory or no TIFF in it (nothing is written).
        NothingEmbeddedError: every raster failed (the table is written).
        EmbedInterrupted: Ctrl-C or SIGTERM (the rows so far are kept).
    """
    root, out = Path(input_dir), Path(out)
    start = time.perf_counter()
    files = find_tiffs(root, recursive=recursive)  # raises for a missing directory
    check_writable([out], overwrite=True)  # an existing table is continued
    cores = available_cores()
    workers = cores if num_workers is None else num_workers
    summary = RunSummary(out=str(out))
    try:
        with _lock(out), sigterm_as_interrupt():
            if overwrite:
                clear_parts(out)
            with Reader(
                root, workers, max_in_flight=2 * batch_size + 2 * workers
            ) as reader:
                # onnxruntime gets every core, and so do the readers (one BLAS thread
                # each); on the CPU they take turns (below). With one onnxruntime
                # thread beside the readers, vit_small ran at 7.2 img/s against a
                # limit of 11.4 (benchmarks/README.md).
                sess = create_session(model, device, threads=cores)
                summary.provider = sess.get_providers()[0]
                meta = read_metadata(sess, model)
                spec = spec_from_metadata(meta)
                names = [i.name for i in sess.get_inputs()]
                dim = int(meta["embedding_dim"])
                metadata = _file_metadata(model, meta)
                previous = (
                    None if overwrite else read_previous(out, metadata["model_sha256"])
                )
                done = done_rows(previous)
                device_name = _device_name(summary.provider)
                log.info("embedding with %s on %s", Path(model).name, device_name)
                order: dict[str, int] = {}  # the listing: path -> position

                def todo() -> Iterator[str]:
                    for p in files:
                        rel = relative(p, root)
                        if not in_shard(rel, shard):
                            continue
                        order[rel] = len(order)
                        if rel in done and done[rel] == _stat_key(p):
                            summary.already_done += 1
                            continue
                        yield rel

                sink = PartSink(out, dim, metadata, rows_per_part)
                try:
                    # With CUDA, reading runs ahead of the model. On the CPU they take
                    # turns, each on all cores: overlapping, they only slowed each
                    # other down (vit_small int8: 18.5 img/s, taking turns 20.4).
                    chunk = (
                        None if summary.provider == CUDA else _chunk(spec, batch_size)
                    )
                    items = reader.read(todo(), spec, chunk=chunk)
                    _embed_all(items, sess, names, sink, summary, batch_size, on_item)
                except KeyboardInterrupt as e:
                    sink.flush()
                    n = summary.embedded + summary.failed
                    raise EmbedInterrupted(
                        f"interrupted: {n} raster(s) of this run are saved in "
                        f"{sink.dir}; run the same command to continue"
                    ) from e
                sink.flush()
            if not order:
                clear_parts(out)
                where = f" in shard {shard[0]}/{shard[1]}" if shard else ""
                raise NoInputError(f"{root}: no .tif/.tiff files found{where}")
            t0 = time.perf_counter()
            if _nothing_new(out, previous, order, sink, summary):
                # Only failures that failed again, for the same reasons: keep the table.
                clear_parts(out)
                summary.nothing_new, summary.rows = True, len(order)
            else:
                summary.rows = merge(out, previous, order, dim, metadata)
            summary.write_seconds += time.perf_counter() - t0
    except KeyboardInterrupt as e:  # between batches, while merging, ...
        raise EmbedInterrupted(
            f"interrupted: the rows written so far are kept in {parts_dir(out)}; "
            "run the same command to continue"
        ) from e
    summary.seconds = time.perf_counter() - start
    if summary.embedded + summary.already_done == 0:
        raise NothingEmbeddedError(
            f"nothing embedded: all {summary.failed} file(s) failed; their reasons "
            f"are in the error column of {out}"
        )
    return summary


def _chunk(spec: Any, batch_size: int, budget: int = 64 << 20) -> int:
    """Files read per turn: four batches, or fewer when their tensors pass
    ``budget`` bytes (many bands), never less than one batch."""
    item = (spec.in_chans + 1) * spec.image_size**2 * 4  # image + valid, float32
    return max(batch_size, min(4 * batch_size, budget // item))


def _embed_all(
    items: Iterator[Item],
    sess: Any,
    names: list[str],
    sink: PartSink,
    summary: RunSummary,
    batch_size: int,
    on_item: Callable[[Item], None] | None,
) -> None:
    pending: list[Item] = []  # in file order, failures included
    n_ok = 0
    for item in items:
        summary.read_seconds += item.read_seconds
        pending.append(item)
        n_ok += item.error is None
        if n_ok == batch_size:
            _run_batch(sess, names, pending, sink, summary)
            pending, n_ok = [], 0
            _trim_heap()
        if on_item is not None:
            on_item(item)
    if pending:
        _run_batch(sess, names, pending, sink, summary)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


def _trim_heap() -> None:
    """Gives the heap's free pages back to the OS after each batch.

    Tensors from the readers (a few hundred kB each) come and go in the heap,
    which fragments; without this, peak memory grew by 90 MB between 200 and
    2,000 files, with it by 50 MB (benchmarks/README.md). Costs nothing
    measurable; a no-op off glibc.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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
    if previous.column("path").to_pylist() != list(order):
        return False
    errors = dict(
        zip(
            previous.column("path").to_pylist(),
            previous.column("error").to_pylist(),
            strict=True,
        )
    )
    return all(errors.get(f["path"]) == f["error"] for f in summary.failures)


def _stat_key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, int(st.st_mtime * 1e6)


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """One writer per output: a second run on the same --out is refused."""
    lock_path = out.with_name(f".{out.name}.lock")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle = try_lock(lock_path)  # held for the whole block
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


def _run_batch(
    sess: Any,
    names: list[str],
    items: list[Item],
    sink: PartSink,
    summary: RunSummary,
) -> None:
    """Embeds the good items in one call; writes every item's row in order."""
    good = [it for it in items if it.error is None]
    embeddings: list[Any] = []
    if good:
        image = np.stack([it.image for it in good])
        scale = np.stack([it.scale for it in good])
        # The valid masks only for a --pool mean encoder (stacking costs a copy).
        valid = np.stack([it.valid for it in good]) if "valid" in names else None
        t0 = time.perf_counter()
        try:
            embeddings = list(run_encoder(sess, image, scale, valid))
        except Exception as e:  # onnxruntime error types vary; record, don't crash
            reason = f"onnxruntime failed: {(str(e).strip().splitlines() or [''])[0]}"
            for it in good:
                it.error = reason
        summary.inference_seconds += time.perf_counter() - t0
    by_id = dict(zip(map(id, good), embeddings, strict=False))
    rows = []
    for it in items:
        if it.error is None:
            summary.embedded += 1
        else:
            summary.failed += 1
            summary.failures.append({"path": it.path, "error": it.error})
            log.warning("failed %s: %s", it.path, it.error)
        rows.append((it, by_id.get(id(it))))
    _timed_add(sink, summary, rows)


def _timed_add(
    sink: PartSink, summary: RunSummary, rows: list[tuple[Item, Any]]
) -> None:
    t0 = time.perf_counter()
    for item, emb in rows:
        item.image = item.valid = None  # free the pixels once used
        sink.add(item, emb)
    summary.write_seconds += time.perf_counter() - t0


def _file_metadata(
    model: str | os.PathLike[str], meta: dict[str, str]
) -> dict[str, Any]:
    return {
        "cmae_version": __version__,
        "cmae_format_version": str(ONNX_FORMAT_VERSION),
        "model": Path(model).name,
        "model_sha256": sha256_file(model),
        "model_metadata": meta,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _device_name(provider: str) -> str:
    return {"CUDAExecutionProvider": "CUDA", "CPUExecutionProvider": "the CPU"}.get(
        provider, provider
    )
