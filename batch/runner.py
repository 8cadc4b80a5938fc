"""The runner: reader -> onnxruntime -> writer, timing each stage (no torch).

clip-retrieval's split: the reader decodes and preprocesses in worker processes
while onnxruntime runs the previous batch in this one; rows reach Parquet in row
groups. The preprocessing comes from the model's own metadata.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from catchment_mae import __version__
from catchment_mae.batch.reader import Item, Reader, in_shard, relative
from catchment_mae.batch.writer import ParquetSink
from catchment_mae.errors import CmaeError, NoInputError
from catchment_mae.io import check_writable, sha256_file
from catchment_mae.raster import find_tiffs
from catchment_mae.runtime import (
    ONNX_FORMAT_VERSION,
    create_session,
    read_metadata,
    spec_from_metadata,
)

log = logging.getLogger(__name__)


class NothingEmbeddedError(CmaeError):
    """Every file failed; the table with their reasons was still written."""


@dataclass
class RunSummary:
    """Counts and per-stage seconds of one run."""

    out: str
    embedded: int = 0
    failed: int = 0
    provider: str = ""
    seconds: float = 0.0
    read_seconds: float = 0.0  # summed over workers
    inference_seconds: float = 0.0
    write_seconds: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return f"{self.embedded} embedded, {self.failed} failed"


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
    on_item: Callable[[Item], None] | None = None,
) -> RunSummary:
    """Embeds every TIFF under ``input_dir`` with the ``.onnx`` ``model``.

    Args:
        input_dir: the archive.
        model: an encoder written by ``cmae export``.
        out: the ``.parquet`` to write (atomically).
        batch_size: rasters per onnxruntime call.
        num_workers: reader processes (default: one per core; 0 reads inline).
        device: "auto" (CUDA when it loads, else CPU), "cpu" or "cuda".
        shard: (K, N): only the files whose sha1(relative path) % N == K - 1.
        recursive: search sub-directories.
        overwrite: replace an existing ``out``.
        on_item: called for every raster (progress bars).

    Raises:
        NoInputError: no input directory or no TIFF in it (nothing is written).
        NothingEmbeddedError: every raster failed (the table is written).
    """
    root = Path(input_dir)
    out = Path(out)
    start = time.perf_counter()
    files = find_tiffs(root, recursive=recursive)  # raises for a missing directory
    check_writable([out], overwrite=overwrite)
    cores = available_cores()
    workers = cores if num_workers is None else num_workers
    summary = RunSummary(out=str(out))
    # Fork the readers before onnxruntime starts its threads in this process.
    with Reader(root, workers, max_in_flight=2 * batch_size + 2 * workers) as reader:
        # The readers mostly wait on decoding while onnxruntime computes; give it
        # the cores, less one where readers run beside it.
        threads = max(1, cores - (1 if workers else 0))
        sess = create_session(model, device, threads=threads)
        summary.provider = sess.get_providers()[0]
        meta = read_metadata(sess, model)
        spec = spec_from_metadata(meta)
        names = [i.name for i in sess.get_inputs()]
        dim = int(meta["embedding_dim"])
        log.info(
            "embedding with %s on %s", Path(model).name, _device_name(summary.provider)
        )
        sink = ParquetSink(out, dim, _file_metadata(model, meta))
        try:
            rels = (r for r in (relative(p, root) for p in files) if in_shard(r, shard))
            pending: list[Item] = []  # in file order, failures included
            n_ok = 0
            for item in reader.read(rels, spec):
                summary.read_seconds += item.read_seconds
                pending.append(item)
                if item.error is None:
                    n_ok += 1
                if n_ok == batch_size:
                    _run_batch(sess, names, pending, sink, summary)
                    pending, n_ok = [], 0
                if on_item is not None:
                    on_item(item)
            if pending:
                _run_batch(sess, names, pending, sink, summary)
            if summary.embedded + summary.failed == 0:
                sink.abort()
                where = f" in shard {shard[0]}/{shard[1]}" if shard else ""
                raise NoInputError(f"{root}: no .tif/.tiff files found{where}")
            t0 = time.perf_counter()
            sink.commit()
            summary.write_seconds += time.perf_counter() - t0
        except BaseException:
            sink.abort()
            raise
    summary.seconds = time.perf_counter() - start
    if summary.embedded == 0:
        raise NothingEmbeddedError(
            f"nothing embedded: all {summary.failed} file(s) failed; their reasons "
            f"are in the error column of {out}"
        )
    return summary


def _run_batch(
    sess: Any,
    names: list[str],
    items: list[Item],
    sink: ParquetSink,
    summary: RunSummary,
) -> None:
    """Embeds the good items in one call; writes every item's row in order."""
    good = [it for it in items if it.error is None]
    embeddings: list[Any] = []
    if good:
        feed = {
            "image": np.stack([it.image for it in good]),
            "scale": np.stack([it.scale for it in good]),
        }
        if "valid" in names:
            feed["valid"] = np.stack([it.valid for it in good])
        t0 = time.perf_counter()
        try:
            (emb,) = sess.run(["embedding"], {k: feed[k] for k in names})
            embeddings = list(emb)
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
    sink: ParquetSink, summary: RunSummary, rows: list[tuple[Item, Any]]
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
