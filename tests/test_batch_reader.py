"""The reader stage: shared-memory slots, batches as views, every way out clean."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile

from catchment_mae.batch.plan import relative
from catchment_mae.batch.reader import Reader
from catchment_mae.batch.ring import SEGMENT_PREFIX, SlotRing
from catchment_mae.batch.runner import batch_rows
from catchment_mae.preprocess import VALID_LEVELS, load_sample
from catchment_mae.raster import find_tiffs
from catchment_mae.runtime import CUDA
from catchment_mae.spec import PreprocessSpec
from catchment_mae.workers import ReaderPool
from tests.conftest import copies_of, start_cmae

SPEC = PreprocessSpec(image_size=32, in_chans=1, norm="per-raster")
SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(
    not SHM.is_dir(), reason="POSIX shared memory (/dev/shm) is Linux's"
)


def _segments(pid: int | None = None) -> set[str]:
    prefix = SEGMENT_PREFIX + (f"{pid}-" if pid is not None else "")
    return {p.name for p in SHM.iterdir() if p.name.startswith(prefix)}


@pytest.fixture
def mixed(tmp_path, dem_dir):
    """Eight DEMs with two bad files among them (gaps inside a batch)."""
    d = tmp_path / "mixed"
    d.mkdir()
    for i, p in enumerate(sorted(dem_dir.glob("*.tif"))[:8]):
        shutil.copy(p, d / f"f{2 * i + 1:02d}.tif")
    (d / "f04.tif").write_bytes(b"")
    (d / "f08.tif").write_text("not a tiff")
    return d


def _read(root, workers, batch_size, overlap):
    rels = [relative(p, root) for p in find_tiffs(root)]
    got = []
    with (
        ReaderPool(workers) as pool,
        Reader(root, SPEC, pool, batch_size, overlap=overlap) as reader,
    ):
        for batch in reader.batches(rels):
            images = reader.ring.image[batch.rows]
            valid = reader.ring.valid[batch.rows]
            if batch.good:  # a view, no copy
                assert np.shares_memory(images, reader.ring.image)
            assert [it.slot for it in batch.good] == list(
                range(batch.rows.start, batch.rows.stop)
            )
            for k, it in enumerate(batch.good):
                got.append((it.path, None, images[k].copy(), valid[k].copy()))
            got += [(it.path, it.error, None, None) for it in batch.items if it.error]
    return rels, sorted(got, key=lambda g: g[0])


@pytest.mark.parametrize(
    "workers,batch_size,overlap",
    [(2, 3, False), (2, 3, True), (2, 1, False), (1, 8, True)],
)
def test_reader__batches_are_views_with_the_shared_preprocessing(
    mixed, workers, batch_size, overlap
):
    """Reading ahead (GPU) or in turns (CPU), in processes or inline: the same rows,
    the same pixels as load_sample, failures in place, good slots packed."""
    rels, got = _read(mixed, workers, batch_size, overlap)
    assert [g[0] for g in got] == rels
    errors = {path: err for path, err, _, _ in got if err}
    assert set(errors) == {"f04.tif", "f08.tif"} and "empty file" in errors["f04.tif"]
    for path, err, image, valid in got:
        if err is None:
            s = load_sample(mixed / path, SPEC)
            np.testing.assert_array_equal(image, s.image)
            assert valid.dtype == np.uint8
            np.testing.assert_array_equal(valid / np.float32(VALID_LEVELS), s.valid)
    assert _read(mixed, 0, batch_size, overlap)[1][0][0] == got[0][0]


def test_ring__segment_is_shared_and_unlinked(tmp_path):
    with SlotRing(rows=4, in_chans=3, size=8) as ring:
        name = ring.layout.name
        assert (SHM / name).exists() and name.startswith(
            f"{SEGMENT_PREFIX}{os.getpid()}-"
        )
        ring.image[2] = 7.0
        ring.valid[2] = 255
        code = (
            "import sys, json; from catchment_mae.batch.ring import RingLayout, "
            "SlotRing; r = SlotRing.attach(RingLayout(**json.loads(sys.argv[1]))); "
            "r.scale[1] = (1.5, 2.5); print(float(r.image[2].sum())); r.close()"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(ring.layout.__dict__)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert float(out.stdout) == 7.0 * 3 * 8 * 8
        assert ring.scale[1].tolist() == [1.5, 2.5]  # written by the other process
        ring.move(2, 0)
        assert ring.image[0].min() == 7.0 and ring.valid[0].min() == 255
    assert not (SHM / name).exists()


def _cmae(*args, **kw):
    return start_cmae(*args, **kw)


@pytest.fixture
def many(tmp_path, dem_dir):
    """200 rasters: a run of a few seconds with two readers."""
    return copies_of(dem_dir, tmp_path / "many", 200, link=True)


def _reading(archive, model, out):
    """An embed-dir run in a process group of its own, once its two readers
    run and rows are on disk."""
    proc = _cmae(
        "embed-dir", archive, "--model", model, "--out", out, "--num-workers", 2,
        "--batch-size", 2, "--rows-per-part", 4, start_new_session=True,
    )  # fmt: skip
    _wait_for_readers(proc, out)
    return proc


def _wait_for_readers(proc, out, n=2, timeout=60.0):
    """The run's reader processes, once ``n`` of them run and rows are on disk.
    They are forked by the forkserver (the main process's child), so they are
    its grandchildren."""
    import psutil

    parts = out.with_name(out.name + ".parts")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"ended early: {proc.communicate()}")
        kids = psutil.Process(proc.pid).children(recursive=True)
        readers = [k for k in kids if k.ppid() != proc.pid]
        if _segments(proc.pid) and len(readers) >= n and any(parts.glob("*.parquet")):
            return readers
        time.sleep(0.01)
    raise AssertionError("no readers started")


def test_ring__a_ctrl_c_while_the_segment_is_made_leaves_none(monkeypatch):
    """SharedMemory makes the segment, then registers it with Python's resource
    tracker (starting it, if need be): interrupted between the two, nothing
    held the segment and it stayed in /dev/shm."""
    from multiprocessing import shared_memory

    import catchment_mae.batch.ring as ring_mod

    real = shared_memory.SharedMemory

    def interrupted(*args, **kwargs):
        if kwargs.get("create"):
            real(*args, **kwargs)  # made, then the Ctrl-C
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ring_mod.shared_memory, "SharedMemory", interrupted)
    before = _segments(os.getpid())
    with pytest.raises(KeyboardInterrupt):
        SlotRing(rows=4, in_chans=1, size=8)
    assert _segments(os.getpid()) == before


@pytest.mark.parametrize("how", ["SIGINT to the group", "SIGTERM to the group"])
def test_embed_dir__stopped_cleanly_however_signalled(many, onnx_model, tmp_path, how):
    """A terminal's Ctrl-C (and `timeout`) signal every process of the group,
    readers included: the run still ends in seconds, exit 130, one line, rows
    kept, no shared memory left behind."""
    out = tmp_path / "s.parquet"
    proc = _reading(many, onnx_model, out)
    sig = signal.SIGINT if "INT" in how else signal.SIGTERM
    t0 = time.monotonic()
    os.killpg(proc.pid, sig)
    _, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 10
    assert proc.returncode == 130, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert lines[-1].startswith("cmae: error: interrupted"), stderr
    assert not _segments(proc.pid)
    again = _cmae("embed-dir", many, "--model", onnx_model, "--out", out, "--json")
    stdout, stderr = again.communicate(timeout=120)
    assert again.returncode == 0, stderr
    assert pq.read_table(out).num_rows == 200
    assert json.loads(stdout)["already_done"] > 0


def test_embed_dir__a_reader_killed_fails_only_its_file(many, onnx_model, tmp_path):
    """kill -9 of a reader: its file (if it was reading one) gets a row saying so,
    a new reader takes its place, the run finishes, and nothing leaks."""
    out = tmp_path / "k.parquet"
    proc = _cmae(
        "embed-dir", many, "--model", onnx_model, "--out", out, "--num-workers", 2,
        "--batch-size", 2, "--rows-per-part", 4, "--json",
    )  # fmt: skip
    victims = _wait_for_readers(proc, out)
    victims[0].kill()
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    table = pq.read_table(out)
    assert table.num_rows == 200
    errors = [e for e in table.column("error").to_pylist() if e is not None]
    assert len(errors) <= 1, errors
    assert all(
        "the reader process died while reading it (signal SIGKILL)" == e for e in errors
    )
    assert not _segments(proc.pid)


def test_embed_dir__kill_9_of_the_run_leaves_no_segment(many, onnx_model, tmp_path):
    """Nothing can run in a killed process: Python's resource tracker, which
    outlives it, unlinks the segment, and the readers exit with it."""
    import psutil

    out = tmp_path / "k9.parquet"
    proc = _cmae(
        "embed-dir", many, "--model", onnx_model, "--out", out, "--num-workers", 2,
        "--batch-size", 2, "--rows-per-part", 4,
    )  # fmt: skip
    readers = _wait_for_readers(proc, out)
    assert _segments(proc.pid)
    proc.kill()
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (
        _segments(proc.pid) or any(r.is_running() for r in readers)
    ):
        time.sleep(0.05)
    assert not _segments(proc.pid)
    assert not any(
        r.is_running() and r.status() != psutil.STATUS_ZOMBIE for r in readers
    )


def test_embed_dir__every_file_failing_leaves_no_segment(tmp_path, onnx_model):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(5):
        (bad / f"x{i}.tif").write_bytes(b"II*\x00garbage")
    proc = _cmae(
        "embed-dir", bad, "--model", onnx_model, "--out", tmp_path / "b.parquet",
        "--num-workers", 2,
    )  # fmt: skip
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "nothing embedded" in stderr
    assert not _segments(proc.pid)


def test_embed_dir__a_file_past_its_time_budget_is_a_row(tmp_path, dem_dir, onnx_model):
    from catchment_mae.batch.runner import embed_dir

    d = tmp_path / "slow"
    d.mkdir()
    for p in sorted(dem_dir.glob("*.tif"))[:3]:
        shutil.copy(p, d / p.name)
    # Uncompressed 5000 x 5000 float32: well over a second to read and resize.
    big = np.random.default_rng(0).normal(size=(5000, 5000)).astype(np.float32)
    tifffile.imwrite(d / "big.tif", big)
    del big
    summary = embed_dir(
        d, onnx_model, tmp_path / "t.parquet", num_workers=2, timeout=0.2
    )
    assert summary.embedded == 3 and summary.failed == 1
    assert summary.failures == [
        {"path": "big.tif", "error": "timed out after 0.2 s (the reader was stopped)"}
    ]
    assert not _segments(os.getpid())


def test_mapper__feeds_onnxruntime_views_of_the_ring(mixed, onnx_model, monkeypatch):
    import catchment_mae.batch.mapper as mapper_mod
    from catchment_mae.batch.mapper import Mapper

    seen = []
    real = mapper_mod.run_encoder

    def spy(session, image, scale, valid=None):
        seen.append((image, scale))
        return real(session, image, scale, valid)

    monkeypatch.setattr(mapper_mod, "run_encoder", spy)
    mapper = Mapper(onnx_model, "cpu", threads=1)
    rels = [relative(p, mixed) for p in find_tiffs(mixed)]
    with ReaderPool(2) as pool, Reader(mixed, mapper.spec, pool, 4) as reader:
        for batch in reader.batches(rels):
            rows = batch_rows(mapper, batch, reader.ring)
            image, scale = seen[-1]
            assert np.shares_memory(image, reader.ring.image)
            assert np.shares_memory(scale, reader.ring.scale)
            assert [r.path for r, _ in rows] == [it.path for it in batch.items]
            assert sum(e is not None for _, e in rows) == len(batch.good)


def _embed_all(mapper, root):
    """Every file's (path, embedding or error) through ``mapper``."""
    rels = [relative(p, root) for p in find_tiffs(root)]
    got = {}
    with ReaderPool(2) as pool, Reader(root, mapper.spec, pool, 4) as reader:
        for batch in reader.batches(rels):
            for row, embedding in batch_rows(mapper, batch, reader.ring):
                got[row.path] = row.error if embedding is None else embedding
    return got


def _load_through(monkeypatch, load):
    """The session that embeds (not the CPU probe of its metadata) is built by
    ``load(real_create_session, path, device, threads, spinning)``."""
    import catchment_mae.batch.mapper as mapper_mod

    real = mapper_mod.create_session

    def create(path, device="cpu", threads=None, spinning=True, optimise=True):
        if optimise:
            return load(real, path, device, threads, spinning)
        return real(path, device, threads, spinning, optimise)

    monkeypatch.setattr(mapper_mod, "create_session", create)


def test_mapper__reading_starts_while_the_session_loads_in_a_thread(
    mixed, onnx_model, monkeypatch
):
    """As with CUDA: what the model says about itself comes at once (a CPU
    session without graph optimisation); the real session loads in a thread
    and the first batch waits for it. The embeddings are the same."""
    import threading

    from catchment_mae.batch.mapper import Mapper

    here = Mapper(onnx_model, "cpu", threads=1, background=False)
    loading, go = threading.Event(), threading.Event()

    def slow(real, *args):
        loading.set()
        assert go.wait(30)
        return real(*args)

    _load_through(monkeypatch, slow)
    mapper = Mapper(onnx_model, "cpu", threads=1, background=True)
    try:
        assert loading.wait(30) and not mapper._session.done()  # not loaded yet
        assert (mapper.spec, mapper.dim, mapper.names) == (
            here.spec, here.dim, here.names,
        )  # fmt: skip
        assert mapper.metadata["model_sha256"] == here.metadata["model_sha256"]
        threading.Timer(0.3, go.set).start()
        got, want = _embed_all(mapper, mixed), _embed_all(here, mixed)
    finally:
        go.set()
    assert mapper.wait_seconds > 0
    assert mapper.session_seconds >= 0.3 and mapper.provider == "CPUExecutionProvider"
    assert got.keys() == want.keys() and len(got) == 10
    for path, g in got.items():
        if isinstance(g, str):
            assert g == want[path]
        else:
            np.testing.assert_allclose(g, want[path], rtol=1e-5, atol=1e-6)


def test_mapper__a_session_that_fails_to_load_ends_the_run(
    mixed, onnx_model, monkeypatch
):
    """Not each batch's rows: the load's one-line error, where the first batch
    needs the session."""
    from catchment_mae.batch.mapper import Mapper
    from catchment_mae.errors import CmaeError

    reason = "device cuda: the CUDA provider did not load (no GPU, ...)"

    def broken(real, *args):
        raise CmaeError(reason)

    _load_through(monkeypatch, broken)
    mapper = Mapper(onnx_model, "cpu", threads=1, background=True)
    assert mapper.dim > 0
    with pytest.raises(CmaeError, match="did not load"):
        _embed_all(mapper, mixed)


def test_reader__ahead_of_a_gpu_the_ring_holds_what_dev_shm_allows(
    tmp_path, monkeypatch
):
    import catchment_mae.batch.reader as reader_mod

    batch_bytes = ((4 * 1 + 1) * 32**2 + 8) * 4
    monkeypatch.setattr(reader_mod, "READ_AHEAD_BYTES", 40 * batch_bytes)
    pool = ReaderPool(0)
    cases = [(1 << 40, 40), (12 * batch_bytes, 6), (0, 3)]
    for free, batches in cases:
        monkeypatch.setattr(reader_mod, "shm_free", lambda free=free: free)
        with Reader(tmp_path, SPEC, pool, 4, overlap=True) as reader:
            assert reader.n_batches == batches
            assert reader.ring.layout.rows == batches * 4
        with Reader(tmp_path, SPEC, pool, 4, overlap=False) as reader:
            assert reader.n_batches == 4  # the CPU's waves are as they were


def _as_if_cuda(monkeypatch, load):
    """embed_dir() as on a CUDA machine: the Mapper plans for CUDA, reads the
    model's metadata from a CPU probe, and its session loads through ``load``."""
    import catchment_mae.batch.mapper as mapper_mod

    monkeypatch.setattr(
        mapper_mod, "session_providers", lambda device: [CUDA, "CPUExecutionProvider"]
    )
    _load_through(monkeypatch, load)


def test_embed_dir__a_cuda_session_that_fails_to_load_ends_the_run(
    tmp_path, mixed, onnx_model, monkeypatch
):
    from catchment_mae.batch.runner import embed_dir
    from catchment_mae.errors import CmaeError

    def fail(real, *args):
        time.sleep(0.2)  # the readers are reading by now
        raise CmaeError("device cuda: the CUDA provider did not load (test)")

    _as_if_cuda(monkeypatch, fail)
    out = tmp_path / "e.parquet"
    with pytest.raises(CmaeError, match="the CUDA provider did not load"):
        embed_dir(mixed, onnx_model, out, batch_size=2, device="cuda")
    assert not out.exists()
    assert not _segments(os.getpid())


def test_embed_dir__auto_without_cuda_after_all_embeds_on_the_cpu(
    tmp_path, mixed, onnx_model, monkeypatch, caplog
):
    """ "auto" planned for CUDA (reading ahead), whose provider then did not
    load: a warning, the CPU's waves for the rest, the same table."""
    from catchment_mae.batch.runner import embed_dir

    want = embed_dir(mixed, onnx_model, tmp_path / "cpu.parquet", batch_size=2)
    _as_if_cuda(monkeypatch, lambda real, path, device, *args: real(path, "cpu", *args))
    got = embed_dir(mixed, onnx_model, tmp_path / "auto.parquet", batch_size=2)
    assert (
        caplog.text.count("the CUDA provider did not load; embedding on the CPU") == 1
    )
    assert got.provider == want.provider == "CPUExecutionProvider"
    assert (got.embedded, got.failed) == (want.embedded, want.failed) == (8, 2)
    a = pq.read_table(tmp_path / "cpu.parquet").to_pydict()
    b = pq.read_table(tmp_path / "auto.parquet").to_pydict()
    assert a["path"] == b["path"] and a["error"] == b["error"]
    for x, y in zip(a["embedding"], b["embedding"], strict=True):
        if x is not None:
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_read_one__a_file_gone_or_a_dangling_link_says_so_in_words(tmp_path):
    """Its stat failed first, and the row held Python's own text
    ("FileNotFoundError: [Errno 2] No such file or directory: ...")."""
    import os

    from catchment_mae.batch.reader import read_one

    os.symlink("nowhere.tif", tmp_path / "dangling.tif")
    row, sample, _ = read_one(str(tmp_path), "dangling.tif", SPEC)
    assert sample is None and row.error == "a symlink to nothing (dangling)"
    row, _, _ = read_one(str(tmp_path), "gone.tif", SPEC)
    assert row.error == "file does not exist"


def test_embed_dir__kill_9_of_the_group_leaves_no_segment_past_the_next_run(
    many, onnx_model, tmp_path
):
    """kill -9 of the whole process group kills Python's resource tracker too:
    the run's segment stays in /dev/shm, and the next run removes it (its
    creator is gone); segments of running processes are left alone."""
    out = tmp_path / "k.parquet"
    proc = _reading(many, onnx_model, out)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    left = _segments(proc.pid)
    assert left  # the killed run could not unlink its own ring
    mine = SlotRing(rows=1, in_chans=1, size=8)  # a running process's ring
    try:
        again = _cmae("embed-dir", many, "--model", onnx_model, "--out", out, "--json")
        _, stderr = again.communicate(timeout=120)
        assert again.returncode == 0, stderr
        assert not _segments(proc.pid)
        assert mine.layout.name in _segments(os.getpid())
    finally:
        mine.close()
