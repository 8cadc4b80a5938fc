"""The decode-once cache and training's first pass over the data."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import catchment_mae.prepare as prepare_mod
from catchment_mae.cache import SampleCache
from catchment_mae.data import CachedDataset, EpochSampler, RasterDataset, collate
from catchment_mae.errors import CmaeError
from catchment_mae.loaders import make_loader, to_model_input
from catchment_mae.prepare import prepare
from catchment_mae.preprocess import ALL_NODATA, load_sample
from catchment_mae.raster import find_tiffs
from catchment_mae.spec import PreprocessSpec
from catchment_mae.stats import scan
from tests.conftest import python_out

SPEC = PreprocessSpec(image_size=32, in_chans=None, norm="per-raster")


@pytest.fixture
def dems(tmp_path, dem_dir):
    """The session's DEMs, copied (these tests change files), plus a bad one."""
    d = tmp_path / "dems"
    shutil.copytree(dem_dir, d)
    (d / "zz_broken.tif").write_bytes(b"II*\x00 not really")
    return d


def _files(d):
    return list(find_tiffs(d))


def _prepare(d, root, **kw):
    return prepare(_files(d), SPEC, cache_root=root, workers=kw.pop("workers", 0), **kw)


def test_prepare__second_run_reads_no_tiff(dems, tmp_path, monkeypatch):
    """Nor a raster with no valid pixel: known as such (it was read again), even
    the first one listed, read while the band count is not known yet."""
    from catchment_mae.synth import dem_array, write_dem
    from tests.conftest import dem_spec

    root = tmp_path / "cache"
    spec = dem_spec(seed=9)
    write_dem(dems / "a_nodata.tif", spec, np.full_like(dem_array(spec), spec.nodata))
    first = _prepare(dems, root)
    assert first.reused == 0 and len(first.files) == 12
    broken = (str(dems / "zz_broken.tif"), first.failed[1][1])
    assert first.failed == [(str(dems / "a_nodata.tif"), ALL_NODATA), broken]
    first.cache.close()

    def refuse(*args, **kwargs):
        raise AssertionError(f"a TIFF was read: {args[0]}")

    monkeypatch.setattr(prepare_mod, "load_resampled", refuse)
    (dems / "zz_broken.tif").unlink()  # failures are not cached: they are re-read
    again = _prepare(dems, root)
    assert again.reused == 13 and again.files == first.files
    assert again.failed == [(str(dems / "a_nodata.tif"), ALL_NODATA)]
    np.testing.assert_allclose(again.mean, first.mean)
    np.testing.assert_allclose(again.std, first.std)
    again.cache.close()


def test_prepare__a_name_that_is_not_utf8_is_cached_and_found_again(
    dems, tmp_path, monkeypatch
):
    """Arrow holds UTF-8 text only: such a name (Python's surrogates) is kept as
    its bytes beside its escaped text, and the next run finds it. It crashed
    the first pass."""
    first = sorted(dems.glob("*.tif"))[0]
    odd = Path(os.fsdecode(bytes(dems) + b"/caf\xe9.tif"))  # Latin-1, not UTF-8
    first.rename(odd)
    root = tmp_path / "cache"
    _prepare(dems, root).cache.close()

    def refuse(*args, **kwargs):
        raise AssertionError(f"a TIFF was read: {args[0]}")

    monkeypatch.setattr(prepare_mod, "load_resampled", refuse)
    (dems / "zz_broken.tif").unlink()
    again = _prepare(dems, root)
    assert again.reused == 12 and odd in again.files
    again.cache.close()


def test_prepare__pyarrow_imports_pandas_beside_the_readers(dem_dir, tmp_path):
    """A shard's index is pyarrow's first table, which imports pandas (0.7 s on
    2 cores): in its thread, not in the main one while the readers run dry."""
    pytest.importorskip("pandas", reason="pyarrow imports pandas only if present")
    code = (
        "import importlib.abc, sys, threading\n"
        "seen = []\n"
        "class Hook(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'pandas':\n"
        "            seen.append(threading.current_thread().name)\n"
        "sys.meta_path.insert(0, Hook())\n"
        "from catchment_mae.prepare import prepare\n"
        "from catchment_mae.spec import PreprocessSpec\n"
        "from catchment_mae.raster import find_tiffs\n"
        "spec = PreprocessSpec(image_size=32, in_chans=1, norm='per-raster')\n"
        f"r = prepare(find_tiffs({str(dem_dir)!r}), spec,\n"
        f"            cache_root={str(tmp_path / 'c')!r}, workers=0)\n"
        "r.cache.close()\n"
        "print(seen[:1])\n"
    )
    assert python_out(code) == "['cmae-warm-up']"


def test_prepare__statistics_are_the_scans(dems, tmp_path):
    """The norm statistics merged from each raster's own equal a pass over all
    the pixels (these DEMs have no overviews: the level read is the full one)."""
    got = _prepare(dems, tmp_path / "c", workers=2)
    ref = scan(_files(dems))
    np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-9)
    np.testing.assert_allclose(got.std, ref.std, rtol=1e-6)
    assert got.bands == ref.bands == 1
    assert [p for p, _ in got.failed] == [p for p, _ in ref.failed]
    got.cache.close()


def test_prepare__a_changed_file_is_read_again(dems, tmp_path):
    root = tmp_path / "cache"
    _prepare(dems, root).cache.close()
    target = sorted(dems.glob("*.tif"))[3]
    shutil.copy(sorted(dems.glob("*.tif"))[4], target)  # new content
    os.utime(target, ns=(1, 1))
    again = _prepare(dems, root)
    assert again.reused == 11
    entry = again.entries[again.files.index(target)]
    z, _ = again.cache.arrays(entry.shard)
    ref = prepare_mod.load_resampled(target, SPEC)
    np.testing.assert_array_equal(z[entry.row], ref.z)
    again.cache.close()


def test_prepare__other_settings_or_version_use_another_directory(
    dems, tmp_path, monkeypatch
):
    root = tmp_path / "cache"
    a = _prepare(dems, root)
    a.cache.close()
    import dataclasses

    b = prepare(
        _files(dems), dataclasses.replace(SPEC, image_size=16), cache_root=root,
        workers=0,
    )  # fmt: skip
    assert b.reused == 0 and b.cache.where != a.cache.where
    b.cache.close()
    # Normalisation is applied per batch: it does not change the key.
    c = prepare(
        _files(dems), dataclasses.replace(SPEC, norm="fixed"), cache_root=root,
        workers=0,
    )  # fmt: skip
    assert c.reused == 12 and c.cache.where == a.cache.where
    c.cache.close()
    monkeypatch.setattr("catchment_mae.cache.__version__", "99.0")
    d = _prepare(dems, root)
    assert d.reused == 0 and d.cache.where not in (a.cache.where, b.cache.where)
    d.cache.close()


@pytest.mark.parametrize(
    "damage", ["flip a byte", "truncate", "bad index", "flip a statistic"]
)
def test_cache__a_damaged_shard_is_rebuilt_never_trusted(
    dems, tmp_path, damage, caplog
):
    root = tmp_path / "cache"
    first = _prepare(dems, root)
    stem = first.entries[0].shard
    first.cache.close()
    d = first.cache.where
    if damage == "flip a byte":
        z = np.load(d / f"{stem}.z.npy", mmap_mode="r+")
        z[first.entries[5].row, 0, 3, 3] += 1
        z.flush()
        del z
    elif damage == "truncate":
        path = d / f"{stem}.valid.npy"
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "bad index":
        (d / f"{stem}.arrow").write_bytes(b"garbage")
    else:  # one bit of a raster's mean in the index: it was trusted
        import struct

        index = d / f"{stem}.arrow"
        raw = bytearray(index.read_bytes())
        at = raw.find(struct.pack("<d", float(first.entries[0].mean[0])))
        assert at >= 0
        raw[at + 6] ^= 0x10
        index.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        again = _prepare(dems, root)
    assert again.reused == 0  # one shard held them all: every raster read again
    assert "cache" in caplog.text
    entry = again.entries[5]
    z, _ = again.cache.arrays(entry.shard)
    ref = prepare_mod.load_resampled(again.files[5], SPEC)
    np.testing.assert_array_equal(z[entry.row], ref.z)
    again.cache.close()
    third = _prepare(dems, root)
    assert third.reused == 12
    assert len(list(d.glob("*.arrow"))) == 1  # the damaged shard was removed
    third.cache.close()


def test_cache__a_build_that_died_leaves_nothing_used(dems, tmp_path):
    root = tmp_path / "cache"
    cache = SampleCache(root, SPEC)
    build = cache.new_shard(4, 1)  # never committed: as if killed mid-build
    cache.close()
    assert list(cache.where.glob("*.tmp"))
    got = _prepare(dems, root)
    assert got.reused == 0
    got.cache.close()
    again = _prepare(dems, root)
    assert again.reused == 12
    # Its own process is alive, so its files stay until it is gone.
    assert build.z_tmp.exists()
    again.cache.close()


def test_cached_dataset__batches_equal_the_embedding_path(dems, tmp_path):
    """What training sees from the cache (normalised on the device) is what
    load_sample gives embedding, for fixed and per-raster norm, and what the
    uncached dataset gives."""
    import dataclasses

    got = _prepare(dems, tmp_path / "c")
    for norm in ("per-raster", "fixed"):
        spec = dataclasses.replace(
            SPEC, norm=norm, in_chans=1,
            norm_mean=(got.mean if norm == "fixed" else None),
            norm_std=(got.std if norm == "fixed" else None),
        )  # fmt: skip
        idx = [3, 0, 7, 11, 5]
        cached = CachedDataset([got.entries[i] for i in idx], spec, got.cache.where)
        batch = cached.__getitems__(list(range(len(idx))))
        images, valid, scale = to_model_input(batch, torch.device("cpu"))
        plain = collate([RasterDataset(got.files, spec)[i] for i in idx])
        p_images, p_valid, p_scale = to_model_input(plain, torch.device("cpu"))
        torch.testing.assert_close(images, p_images, rtol=0, atol=0)
        torch.testing.assert_close(valid, p_valid, rtol=0, atol=0)
        for k, i in enumerate(idx):
            s = load_sample(got.files[i], spec)
            np.testing.assert_allclose(images[k].numpy(), s.image, atol=1e-5)
            np.testing.assert_array_equal(valid[k].numpy(), s.valid)
            np.testing.assert_array_equal(scale[k].numpy(), s.scale)
    got.cache.close()


def test_loader__workers_persist_across_epochs_and_the_order_follows_the_epoch(
    dems, tmp_path
):
    got = _prepare(dems, tmp_path / "c")
    spec = PreprocessSpec(image_size=32, in_chans=1, norm="per-raster")
    ds = CachedDataset(got.entries, spec, got.cache.where)
    loader = make_loader(
        ds, 4, shuffle=True, seed=3, num_workers=2, device=torch.device("cpu")
    )
    assert loader.persistent_workers and loader.num_workers == 2
    orders = []
    for epoch in (0, 1, 0):
        loader.sampler.set_epoch(epoch)
        orders.append([p for batch in loader for p in batch["path"]])
    assert sorted(orders[0]) == sorted(ds.paths)
    assert orders[0] == orders[2] != orders[1]
    got.cache.close()


def test_device_loader__gives_the_batches_of_the_worker_loader(
    dems, tmp_path, monkeypatch
):
    """The cache held on the device (here the CPU stands in for the GPU) batches
    exactly as the DataLoader over the same dataset, epoch by epoch."""
    from catchment_mae.loaders import DeviceLoader

    got = _prepare(dems, tmp_path / "c")
    spec = PreprocessSpec(image_size=32, in_chans=1, norm="per-raster")
    ds = CachedDataset(got.entries, spec, got.cache.where)
    cpu = torch.device("cpu")
    loader = make_loader(ds, 3, shuffle=True, seed=5, num_workers=0, device=cpu)
    held = DeviceLoader(ds, 3, EpochSampler(len(ds), 5, True, batch=3), cpu)
    monkeypatch.setattr(DeviceLoader, "CHUNK", 2)  # several chunks on the way in
    held_small = DeviceLoader(ds, 3, EpochSampler(len(ds), 5, True, batch=3), cpu)
    assert ds.nbytes == len(ds) * (32 * 32 * 2 + 32 * 32)
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        held.sampler.set_epoch(epoch)
        held_small.sampler.set_epoch(epoch)
        want = list(loader)
        assert len(held) == len(want) == len(loader)
        for other in (held, held_small):
            for a, b in zip(want, other, strict=True):
                assert a["path"] == b["path"] and b["failed"] == []
                for key in ("z", "valid", "coef", "scale"):
                    torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    got.cache.close()


def test_cache_on_gpu__when_it_fits_and_a_clear_error_when_forced(
    dems, tmp_path, monkeypatch
):
    """Auto holds the cache on the GPU only within a quarter of its free memory;
    --cache-on-gpu with too little free memory is refused in words (no CUDA is
    touched here: the free memory is given)."""
    from catchment_mae.errors import ConfigError
    from catchment_mae.loaders import hold_on_gpu

    got = _prepare(dems, tmp_path / "c")
    spec = PreprocessSpec(image_size=32, in_chans=1, norm="per-raster")
    ds = CachedDataset(got.entries, spec, got.cache.where)
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _: (4 * ds.nbytes, 0))
    assert hold_on_gpu(ds, cuda, None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _: (ds.nbytes, 0))
    assert not hold_on_gpu(ds, cuda, None)
    assert not hold_on_gpu(ds, cuda, False)  # --no-cache-on-gpu
    with pytest.raises(ConfigError, match="more than half of .* --no-cache-on-gpu"):
        make_loader(
            ds, 3, shuffle=True, seed=0, num_workers=0, device=cuda, on_gpu=True
        )
    got.cache.close()


def test_loader_worker__reports_of_its_threads_print_no_traceback():
    """A Ctrl-C in the middle of a batch's hand-over reset the resource sharer's
    connection, and the worker printed that thread's traceback under the
    one-line message: its reports are now logged at debug."""
    import subprocess
    import sys

    code = (
        "import sys, threading\n"
        "from catchment_mae.loaders import _init_worker\n"
        "_init_worker(0)\n"
        "def serve():\n"  # as multiprocessing.resource_sharer's thread reports
        "    try:\n"
        "        raise ConnectionResetError(104, 'Connection reset by peer')\n"
        "    except ConnectionResetError:\n"
        "        sys.excepthook(*sys.exc_info())\n"
        "t = threading.Thread(target=serve)\n"
        "t.start(); t.join()\n"
        "print('went on')\n"
        "raise ValueError('the main thread still reports')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout == "went on\n", r.stderr
    assert "Connection reset" not in r.stderr
    assert "ValueError: the main thread still reports" in r.stderr


def test_entry__travels_as_plain_values_and_comes_back_exactly():
    """Readers send an Entry back per raster: without numpy's array pickling
    (its cost was half the pool thread's share of a raster), same values and
    dtypes."""
    import pickle

    from catchment_mae.cache import Entry, FileKey

    e = Entry(FileKey("/d/a.tif", 123, 456, (0, 0, 64, 64)), 300, 200, 2, "int16",
              5_000, 0.25, np.array([812.123456789, -3.5]), np.array([1e-9, 7.0]),
              np.array([5.7, 5.3], np.float32), "shard", 3, 2**32 - 1)  # fmt: skip
    data = pickle.dumps(e, protocol=pickle.HIGHEST_PROTOCOL)
    assert b"numpy" not in data
    back = pickle.loads(data)
    for name in ("mean", "std", "scale"):
        got, want = getattr(back, name), getattr(e, name)
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert (back.key, back.height, back.width, back.bands, back.dtype, back.count,
            back.nodata_fraction, back.shard, back.row, back.crc) == (
            e.key, e.height, e.width, e.bands, e.dtype, e.count,
            e.nodata_fraction, e.shard, e.row, e.crc)  # fmt: skip


def test_cache__a_full_disk_is_one_clear_error(dems, tmp_path, monkeypatch):
    """A row's blocks are reserved before it is written: a disk that filled up
    killed every reader with SIGBUS (each raster blamed), then ended in an
    'internal error'."""
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(CmaeError, match=r"cannot write the cache \(No space left"):
        _prepare(dems, tmp_path / "cache")


def test_cache__deleted_while_the_pass_writes_it(dems, tmp_path, monkeypatch):
    """'Delete the directory at any time': during the pass that was an
    'internal error' (FileNotFoundError of a rename); now the run says so."""
    root = tmp_path / "cache"
    read = prepare_mod.load_resampled
    seen = []

    def read_then_delete(*args, **kwargs):
        seen.append(args[0])
        if len(seen) == 3:
            shutil.rmtree(root)
        return read(*args, **kwargs)

    monkeypatch.setattr(prepare_mod, "load_resampled", read_then_delete)
    with pytest.raises(CmaeError, match=r"cannot write the cache \(No such file"):
        _prepare(dems, root)


def test_cache__deleted_during_the_epochs_the_run_ends_well(tiny_config, tmp_path):
    """The epochs read the memory-mapped shards, which outlive their files; the
    run reported the cache's size at its end and failed there ('internal
    error', FileNotFoundError), its model written."""
    from catchment_mae.trainer import train

    root = tmp_path / "cache"
    cfg = {**tiny_config, "cache_dir": str(root), "max_epochs": 2}
    result = train(cfg, progress=False,
                   on_epoch_end=lambda stats: shutil.rmtree(root, True))  # fmt: skip
    assert len(result.history) == 2 and not root.exists()
    assert os.path.exists(cfg["model_output_path"])


def test_cache__a_link_planted_for_its_folder_is_refused_never_written_through(
    tmp_path,
):
    """A link at the cache's folder (``ROOT/samples-*``, or its ``.lock``) that
    leads out: refused, never written through; the folder is used through
    the descriptor it was opened by, whatever its name leads to later."""
    from catchment_mae.errors import CmaeError

    root, outside = tmp_path / "cache", tmp_path / "outside"
    outside.mkdir()
    root.mkdir()
    SampleCache.dir_for(root, SPEC).symlink_to(outside)
    with pytest.raises(CmaeError, match="cannot use the cache there"):
        SampleCache(root, SPEC)
    SampleCache.dir_for(root, SPEC).unlink()
    SampleCache.dir_for(root, SPEC).mkdir()
    (SampleCache.dir_for(root, SPEC) / ".lock").symlink_to(outside / "planted")
    with pytest.raises(CmaeError, match="cannot use the cache there"):
        SampleCache(root, SPEC)
    (SampleCache.dir_for(root, SPEC) / ".lock").unlink()
    with SampleCache(root, SPEC) as cache:
        where = cache.where
        where.rename(tmp_path / "moved")
        where.symlink_to(outside)  # swapped after it was opened
        build = cache.new_shard(2, 1)
        build.discard()
        atomic = cache.dir / "probe.txt"
        atomic.write_text("x")
    assert list(outside.iterdir()) == []
    assert (tmp_path / "moved" / "probe.txt").read_text() == "x"
