"""embed-dir on a Ray cluster: Ray Data reads, an actor pool embeds (no torch).

The plan (what to embed, what an earlier table already holds) and the writer
(Parquet parts, then one merged table) are the plain runner's, on the driver;
Ray Data reads and preprocesses each file in a task with the reader's own
:func:`~catchment_mae.batch.reader.read_one`, and embeds batches in actors that
each hold one onnxruntime session (a GPU each where the cluster has them). The
table is the same: columns, metadata, failures as rows, one row per raster (or
per chip, with the plain runner's grid), and a re-run after a crash embeds only
what is missing. Chips come back from Ray in any order; the driver holds a
raster's rows until all its chips are in, then writes them together in grid
order, as the plain runner does.

Every machine of the cluster needs cmae installed and the input directory and
the model at the same paths (a shared file system).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from catchment_mae.batch.mapper import Mapper
from catchment_mae.batch.reader import failed_row, read_one
from catchment_mae.batch.runner import (
    RunSummary,
    checked,
    chip_grid_of,
    finish,
    interrupted_kept,
    interrupted_saving,
    output_lock,
    start_run,
    take,
)
from catchment_mae.batch.schema import Row
from catchment_mae.batch.writer import (
    ROWS_PER_PART,
    check_table,
)
from catchment_mae.chips import Chip
from catchment_mae.errors import CmaeError
from catchment_mae.interrupt import sigterm_as_interrupt
from catchment_mae.io import check_writable, text_path
from catchment_mae.spec import PreprocessSpec
from catchment_mae.workers import READ_TIMEOUT, ReaderPool, failure_reason

log = logging.getLogger(__name__)


_pools: dict[float, ReaderPool] = {}  # a Ray worker's reader, by its timeout


def _read(
    item: dict[str, Any],
    root: str,
    spec: PreprocessSpec,
    timeout: float | None,
    within: str | None = None,
) -> dict[str, Any]:
    """A Ray Data task: one path (or chip) -> its row (pickled) and model input.

    With a ``timeout``, the read runs in a reader process of this Ray worker's
    own, replaced when a file takes longer (a decoder stuck in C cannot be
    interrupted in the worker itself), and the file gets a row saying so."""
    chip = pickle.loads(item["chip"]) if item["chip"] else None
    if timeout is None:
        row, sample, seconds = read_one(root, item["path"], spec, chip, within)
    else:
        pool = _pools.get(timeout) or _pools.setdefault(
            timeout, ReaderPool(1, timeout=timeout)
        )
        t0 = time.perf_counter()
        try:
            row, sample, seconds = pool.submit(
                read_one, root, item["path"], spec, chip, within
            ).result()
        except Exception as e:  # timed out, the reader died
            reason = failure_reason(e, timeout)
            row, sample = failed_row(item["path"], chip, reason), None
            seconds = time.perf_counter() - t0
    s, c = spec.image_size, int(spec.channels or 1)
    image, valid, scale = sample or (
        np.zeros((c, s, s), np.float32), np.zeros((1, s, s), np.uint8),
        np.zeros(int(spec.scale_dim or 2), np.float32),
    )  # fmt: skip
    return {
        "row": pickle.dumps(row),
        "chip": item["chip"],
        "ok": sample is not None,
        "image": image,
        "valid": valid,
        "scale": scale,
        "seconds": seconds,
    }


class _Embed:
    """A Ray Data actor: one onnxruntime session, batches of model inputs ->
    embeddings (zeros where the read failed; ``ok`` says which)."""

    settings: tuple[str, str, int | None]  # model, device, threads

    def __init__(self) -> None:
        # Loaded here: an actor that cannot load its session fails at once,
        # not as each batch's rows.
        self.mapper = Mapper(*self.settings, background=False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        ok = batch["ok"].astype(bool)
        n, dim = len(ok), self.mapper.dim
        emb = np.zeros((n, dim), np.float32)
        error = np.array([""] * n, dtype=object)
        if ok.any():
            try:
                emb[ok] = self.mapper.encode(
                    np.ascontiguousarray(batch["image"][ok], np.float32),
                    np.ascontiguousarray(batch["scale"][ok], np.float32),
                    batch["valid"][ok],
                )
            except Exception as e:  # onnxruntime's error types vary; record them
                error[ok] = f"onnxruntime failed: {failure_reason(e)}"
        return {
            "row": batch["row"],
            "chip": batch["chip"],
            "ok": ok,
            "embedding": emb,
            "error": error,
            "seconds": batch["seconds"],
        }


def embed_dir_ray(
    input_dir: str | os.PathLike[str],
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    address: str | None = None,
    batch_size: int = 32,
    actors: int | None = None,
    device: str = "auto",
    shard: tuple[int, int] | None = None,
    recursive: bool = True,
    overwrite: bool = False,
    rows_per_part: int = ROWS_PER_PART,
    within: str | os.PathLike[str] | None = None,
    num_cpus: int | None = None,
    on_row: Callable[[Row], None] | None = None,
    tile: int | None = None,
    stride: int | None = None,
    max_nodata: float = 1.0,
    tile_m: float | None = None,
    stride_m: float | None = None,
    timeout: float | None = READ_TIMEOUT,
) -> RunSummary:
    """:func:`catchment_mae.batch.runner.embed_dir` on Ray Data.

    Args:
        address: a running cluster (``ray://HOST:10001``, ``HOST:6379`` or
            ``auto``); None starts a local Ray for this run.
        actors: embedding actors (default: one per GPU with CUDA, else 1, each
            with onnxruntime's threads; the other CPUs read).
        num_cpus: CPUs of the local Ray started when ``address`` is None.
        on_row: called for every raster (or chip) read.
        timeout: seconds one file may take (None: no limit); its row says so.
        The other arguments are embed_dir's.
    """
    ray = _import_ray()
    root, out = Path(input_dir), Path(out)
    start = time.perf_counter()
    check_writable([out], overwrite=True)
    check_table(out)
    summary = RunSummary(out=str(out))
    probe = Mapper(model, "cpu", threads=1)  # the spec, width and metadata
    summary.provider = "ray"
    started = not ray.is_initialized()
    try:
        with output_lock(out), sigterm_as_interrupt():
            run = start_run(
                root, out, probe, overwrite, shard, recursive, within,
                rows_per_part, chip_grid_of(tile, stride, tile_m, stride_m),
            )  # fmt: skip
            sink = run.sink
            todo = list(run.work)
            if todo:
                if started:
                    _start_ray(ray, address, num_cpus)
                rasters = _Rasters(todo)
                try:
                    # ray.init put its own SIGTERM handler in (sys.exit): ours
                    # again, so SIGTERM saves the rows as Ctrl-C does.
                    with sigterm_as_interrupt():
                        for row, embedding, seconds, chip in _stream(
                            ray, root, model, probe.spec, todo, batch_size, actors,
                            device, timeout, within,
                        ):  # fmt: skip
                            summary.read_seconds += seconds
                            for got in rasters.complete(row, embedding, chip):
                                take(summary, sink, *got, max_nodata)
                            if on_row is not None:
                                on_row(row)
                except KeyboardInterrupt as e:
                    raise interrupted_saving(sink, overwrite) from e
            finish(out, run, summary)
    except KeyboardInterrupt as e:
        raise interrupted_kept(out, overwrite) from e
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
    return checked(summary, start)


def _import_ray() -> Any:
    """Ray, with Ray Data imported, quiet: Ray Data reads its logging set-up
    when imported (errors only on stderr), Ray's C++ core logs only what is
    fatal (its hints are not for our users)."""
    os.environ.setdefault(
        "RAY_DATA_LOGGING_CONFIG", str(Path(__file__).with_name("ray_logging.yaml"))
    )
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    try:
        import ray
        import ray.data  # noqa: F401  (with its logging set-up)
    except ImportError as e:
        raise CmaeError("--ray needs Ray Data: pip install 'catchment-mae[ray]'") from e
    return ray


class _Rasters:
    """Holds each raster's chip rows until all of them are in (Ray returns
    them in any order), then gives them in grid order; whole rasters pass
    through."""

    def __init__(self, todo: list[str | tuple[str, Chip]]) -> None:
        self.expected: dict[str, int] = {}  # by the path as rows hold it
        for item in todo:
            if isinstance(item, tuple):
                key = text_path(item[0])
                self.expected[key] = self.expected.get(key, 0) + 1
        self.held: dict[str, list[tuple[Row, Any, Chip]]] = {}

    def complete(
        self, row: Row, embedding: Any, chip: Chip | None
    ) -> list[tuple[Row, Any, Chip | None]]:
        if chip is None:
            return [(row, embedding, None)]
        held = self.held.setdefault(row.path, [])
        held.append((row, embedding, chip))
        if len(held) < self.expected[row.path]:
            return []
        del self.held[row.path]
        return sorted(held, key=lambda r: (r[2].row, r[2].col))


def _start_ray(ray: Any, address: str | None, num_cpus: int | None) -> None:
    """Joins ``address`` or starts a local Ray, quietly."""
    try:
        with _stderr_silenced():  # the C++ core's start-up lines
            ray.init(
                address=address,
                num_cpus=num_cpus if address is None else None,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,
                configure_logging=True,
            )
    except Exception as e:  # a wrong address, a cluster of another version
        raise CmaeError(f"cannot start or join Ray ({address or 'local'}): "
                        f"{failure_reason(e)}") from e  # fmt: skip
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null within the block (C++ writes there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _stream(
    ray: Any,
    root: Path,
    model: str | os.PathLike[str],
    spec: PreprocessSpec,
    todo: list[str | tuple[str, Chip]],
    batch_size: int,
    actors: int | None,
    device: str,
    timeout: float | None,
    within: str | os.PathLike[str] | None,
) -> Any:
    """(row, embedding or None, read seconds, chip or None) of every path or
    chip, as they finish."""
    gpus = int(ray.cluster_resources().get("GPU", 0)) if device != "cpu" else 0
    n_actors = actors or max(1, gpus)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    threads = max(1, cpus // (n_actors + 1)) if not gpus else None
    # Blocks of a few dozen files: a task per file cost more than its read
    # (about two thirds of the blocks' rate; benchmarks/README.md).
    blocks = max(1, min(len(todo), 4 * cpus, len(todo) // 16))
    items = [
        {"path": t[0], "chip": pickle.dumps(t[1])}
        if isinstance(t, tuple)
        else {"path": t, "chip": b""}
        for t in todo
    ]
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    # Reads are tasks of their own (their resources differ from the actors', so
    # Ray does not fuse them into the actors, which would read one file at a time).
    ds = ds.map(
        _read,
        fn_kwargs={
            "root": str(root),
            "spec": spec,
            "timeout": timeout,
            "within": None if within is None else str(within),
        },  # fmt: skip
        num_cpus=0.5,
    )
    # The actors' settings travel in their class, not as constructor arguments
    # (Ray warns that those cannot be restored if an actor restarts).
    settings = (str(Path(model).resolve()), "cuda" if gpus else "cpu", threads)
    ds = ds.map_batches(
        type("Embed", (_Embed,), {"settings": settings}),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=n_actors),
        num_gpus=1 if gpus else 0,
        num_cpus=0 if gpus else threads,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k in range(len(batch["ok"])):
            row: Row = pickle.loads(batch["row"][k])
            embedding = None
            if batch["ok"][k] and not batch["error"][k]:
                embedding = batch["embedding"][k]
            elif batch["error"][k]:
                row.error = str(batch["error"][k])
            raw = batch["chip"][k]
            chip = pickle.loads(raw) if raw else None
            yield row, embedding, float(batch["seconds"][k]), chip
