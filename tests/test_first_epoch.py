"""The first epoch trains while the first pass reads the rasters into the cache
(when the normalisation is known before any raster is read)."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest
import torch

import catchment_mae.pass_thread as pass_thread
import catchment_mae.prepare as prepare_module
from catchment_mae.errors import NoInputError
from catchment_mae.loaders import StreamedEpoch
from catchment_mae.raster import find_tiffs
from catchment_mae.spec import PreprocessSpec
from catchment_mae.trainer import TrainingInterrupted, train
from tests.conftest import python_out, write_tiff

SPEC = PreprocessSpec(image_size=32, in_chans=1, norm="per-raster")


def _cfg(tiny_config, tmp_path, **kw):
    """A run whose first epoch streams: per-raster norm, and a scale vector
    without the rasters' own facts (their centre and spread would be the
    data's, known after the pass)."""
    return {**tiny_config, "norm": "per-raster", "cache_dir": str(tmp_path / "c"),
            "log_every": 1, "scale_stats": False, **kw}  # fmt: skip


def _held_reads(monkeypatch, after):
    """The pass reads here (num_workers 0); past ``after`` rasters, each read
    waits (up to 10 s) for the returned event. Returns it and the times the
    reads ended."""
    ended, held = [], threading.Event()
    build = prepare_module.build_one

    def read(*args):
        if len(ended) >= after:
            held.wait(10)
        got = build(*args)
        ended.append(time.perf_counter())
        return got

    monkeypatch.setattr(prepare_module, "build_one", read)
    return held, ended


def test_first_epoch__steps_before_the_pass_has_read_every_raster(
    tiny_config, tmp_path, monkeypatch
):
    held, ended = _held_reads(monkeypatch, after=8)
    steps = []

    def step(info):
        steps.append((info["epoch"], time.perf_counter()))
        held.set()  # the rest of the rasters are read once a step was taken

    result = train(_cfg(tiny_config, tmp_path, max_epochs=2), progress=False,
                   on_batch_end=step)  # fmt: skip
    first_step = min(t for epoch, t in steps if epoch == 0)
    # 13: the first raster is read once more, for its band count (in_chans unset)
    assert len(ended) == 13 and first_step < ended[-1]  # stepped while reading
    assert result.files == 12 and not result.skipped
    assert [h["images"] for h in result.history] == [11, 11]  # one for validation
    assert 0 < result.first_pass_seconds
    assert "0 of 12 raster(s) reused, 12 read now" in result.cache


def test_first_epoch__a_filled_cache_trains_the_same_weights(tiny_config, tmp_path):
    cfg = _cfg(tiny_config, tmp_path, max_epochs=2)
    cold = train(cfg, progress=False)
    weights = torch.load(cold.weights_path, weights_only=True)["model"]
    warm = train(cfg, progress=False, overwrite=True)
    assert "12 of 12 raster(s) reused" in warm.cache
    again = torch.load(warm.weights_path, weights_only=True)["model"]
    assert [h["train_loss"] for h in warm.history] == [
        h["train_loss"] for h in cold.history
    ]
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_first_epoch__bad_rasters_are_skipped_and_reported(tiny_config, tmp_path):
    data = tmp_path / "in"
    shutil.copytree(tiny_config["input_dir"], data)
    (data / "broken.tif").write_bytes(b"II*\x00not a tiff")
    result = train(
        _cfg(tiny_config, tmp_path, input_dir=str(data), max_epochs=2), progress=False
    )
    assert [p for p, _ in result.skipped] == [str(data / "broken.tif")]
    assert result.files == 12
    assert sum(h["images"] for h in result.history) == 2 * 11


def test_first_epoch__interrupted_leaves_no_reader_nor_half_written_shard(
    tiny_config, tmp_path, monkeypatch
):
    held, _ = _held_reads(monkeypatch, after=8)
    close = pass_thread.PassInThread.close

    def close_then_read(self):  # the held reads go on once told to stop
        self._stop.set()
        held.set()
        close(self)

    monkeypatch.setattr(pass_thread.PassInThread, "close", close_then_read)

    def stop(info):
        raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="no epoch had finished"):
        train(_cfg(tiny_config, tmp_path), progress=False, on_batch_end=stop)
    assert not [t for t in threading.enumerate() if t.name == "cmae-first-pass"]
    cache = next((tmp_path / "c").glob("samples-*"))
    assert not list(cache.glob("*.tmp")) and not list(cache.glob("*.npy"))


def test_first_epoch__fewer_steps_than_planned_still_count(tiny_config, tmp_path):
    """Broken files make the first epoch shorter than its planned steps; the
    loss of its last steps is still read (the loss is read every 20 steps)."""
    data = tmp_path / "in"
    shutil.copytree(tiny_config["input_dir"], data)
    for k in range(4):
        (data / f"broken{k}.tif").write_bytes(b"II*\x00not a tiff")
    seen = []
    cfg = _cfg(tiny_config, tmp_path, input_dir=str(data), max_epochs=2,
               log_every=20)  # fmt: skip
    result = train(cfg, progress=False, on_batch_end=seen.append)
    first, second = result.history
    assert first["images"] == second["images"] > 0
    (last,) = [i for i in seen if i["epoch"] == 0]  # after its last step
    assert last["loss"] == pytest.approx(first["train_loss"])
    assert last["step"] == -(-first["images"] // 4) < last["steps"]
    assert last["lr"] == pytest.approx(first["lr"])  # the schedule ends the epoch
    assert len(result.skipped) == 4


def test_first_epoch__trains_on_the_others_when_no_training_raster_reads(
    tiny_config, tmp_path
):
    from catchment_mae.train_data import split_items

    data = tmp_path / "in"
    data.mkdir()
    paths = [data / "a.tif", data / "b.tif"]
    (train_at,), _ = split_items(paths, 0.5, seed=0)
    good = sorted(find_tiffs(tiny_config["input_dir"]))[0]
    shutil.copy(good, paths[1 - train_at])
    paths[train_at].write_bytes(b"II*\x00not a tiff")
    cfg = _cfg(tiny_config, tmp_path, input_dir=str(data), max_epochs=2,
               val_fraction=0.5)  # fmt: skip
    result = train(cfg, progress=False)
    assert [h["images"] for h in result.history] == [1, 1]
    assert [h["val_loss"] for h in result.history] == [None, None]


def test_first_epoch__more_steps_than_planned_keep_to_the_schedule(
    tiny_config, tmp_path
):
    """The one training raster is broken: the first epoch trains on the nine
    others, five steps where one was planned, without running through the
    learning-rate schedule or reading the loss back at every step."""
    from catchment_mae.train_data import split_items

    data = tmp_path / "in"
    data.mkdir()
    dems = sorted(find_tiffs(tiny_config["input_dir"]))[:10]
    paths = [data / p.name for p in dems]
    (train_at,), _ = split_items(paths, 0.9, seed=0)
    for k, (dem, path) in enumerate(zip(dems, paths, strict=True)):
        if k == train_at:
            path.write_bytes(b"II*\x00not a tiff")
        else:
            shutil.copy(dem, path)
    seen = []
    cfg = _cfg(tiny_config, tmp_path, input_dir=str(data), val_fraction=0.9,
               batch_size=2, log_every=20, lr=1e-3, warmup_epochs=2.0)  # fmt: skip
    result = train(cfg, progress=False, on_batch_end=seen.append)
    assert result.history[0]["images"] == 9
    first = [i for i in seen if i["epoch"] == 0]
    assert [i["step"] for i in first] == [1, 5] and first[0]["steps"] == 1
    # 2 of the 9, then all: up the first of the two warm-up epochs (to 5e-4)
    assert [i["lr"] for i in first] == [
        pytest.approx(5e-4 * 2 / 9),
        pytest.approx(5e-4),
    ]


def test_streamed_epoch__a_pass_that_fails_gives_its_error_not_a_missing_file(
    dem_dir, tmp_path, monkeypatch
):
    from catchment_mae.errors import CmaeError

    settle, calls = prepare_module._settle, []

    def settle_then_fail(*args):
        calls.append(1)
        if len(calls) == 6:  # the shard half settled: the pass removes it
            raise CmaeError("the reader processes stopped: test")
        settle(*args)

    monkeypatch.setattr(prepare_module, "_settle", settle_then_fail)
    stream = pass_thread.PassInThread(
        list(find_tiffs(dem_dir)), SPEC, cache_root=tmp_path, workers=0
    )
    stream._thread.join()  # the shard is gone before a batch opens it
    try:
        with pytest.raises(CmaeError, match="reader processes stopped: test"):
            list(StreamedEpoch(stream, set(range(12)), SPEC, 4))
    finally:
        stream.close()
    assert not list(stream.cache_where.glob("*.npy*"))


def test_streamed_epoch__each_batch_says_how_far_through_the_epoch_it_is(
    dem_dir, tmp_path
):
    """Broken rasters are settled too: the schedule moves past them."""
    dems = list(find_tiffs(dem_dir))
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00not a tiff")
    files = [broken, *dems[:6], broken, *dems[6:]]  # 14, read in this order
    stream = pass_thread.PassInThread(files, SPEC, cache_root=tmp_path / "c", workers=0)
    try:
        batches = list(StreamedEpoch(stream, set(range(14)), SPEC, 4))
    finally:
        stream.close()
    # batches end at the 5th, the 10th and the 14th file settled
    assert [b["done"] for b in batches] == [5 / 14, 10 / 14, 1.0]
    assert [len(b["path"]) for b in batches] == [4, 4, 4]


def test_first_epoch__failures_after_its_last_batch_still_end_the_schedule(
    dem_dir, tiny_config, tmp_path
):
    """Its last batch is full and the rasters after it fail: nothing says how
    far that batch took the epoch but the end of the epoch itself."""
    from catchment_mae.config import TrainConfig
    from catchment_mae.epochs import lr_at, train_one_epoch
    from catchment_mae.model import build_model
    from catchment_mae.trainer import make_optimizer

    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00not a tiff")
    files = [*list(find_tiffs(dem_dir))[:8], broken]
    cfg = TrainConfig.from_dict({**_cfg(tiny_config, tmp_path), "in_chans": 1,
                                 "log_every": 20, "warmup_epochs": 2.0})  # fmt: skip
    model = build_model(cfg)
    stream = pass_thread.PassInThread(files, SPEC, cache_root=tmp_path / "c", workers=0)
    seen = []
    try:
        epoch = StreamedEpoch(stream, set(range(9)), SPEC, 4)
        train_one_epoch(model, epoch, make_optimizer(model, cfg), torch.device("cpu"),
                        0, cfg, on_batch_end=seen.append)  # fmt: skip
    finally:
        stream.close()
    assert [i["step"] for i in seen] == [2]
    assert seen[-1]["lr"] == pytest.approx(lr_at(1.0, cfg))


def test_norm_refusal__a_value_that_is_not_a_number_is_refused(dem_dir, tmp_path):
    from catchment_mae.preprocess import norm_refusal

    files = list(find_tiffs(dem_dir))[:1]
    stream = pass_thread.PassInThread(files, SPEC, cache_root=tmp_path, workers=0)
    try:
        entry = stream.first()
    finally:
        stream.close()
    fixed = PreprocessSpec(image_size=32, in_chans=1, norm_mean=(0.0,), norm_std=(1.0,))
    nan = np.full_like(entry.mean, np.nan)
    assert "would normalise to about nan" in norm_refusal(nan, entry.std, fixed)


def test_open_shard_file__under_its_temporary_or_final_name(tmp_path):
    from catchment_mae.data import _open_shard_file

    final = tmp_path / "s.z.npy"
    np.save(tmp_path / "x.npy", np.arange(6, dtype=np.float16))
    (tmp_path / "x.npy").rename(final.with_name("s.z.npy.tmp"))
    early = _open_shard_file(final)
    final.with_name("s.z.npy.tmp").rename(final)
    late = _open_shard_file(final)
    assert np.array_equal(early, late) and early.dtype == np.float16


def test_first_epoch__no_usable_raster_says_so(tiny_config, tmp_path):
    data = tmp_path / "in"
    data.mkdir()
    (data / "broken.tif").write_bytes(b"II*\x00not a tiff")
    with pytest.raises(NoInputError, match=f"^{data}: none of the 1 TIFF"):
        train(_cfg(tiny_config, tmp_path, input_dir=str(data)), progress=False)


def test_pass_in_thread__hands_samples_over_in_its_order_result_as_listed(
    dem_dir, tmp_path
):
    files = list(find_tiffs(dem_dir))
    order = [5, 3, 11, 0, 1, 2, 4, 6, 7, 8, 9, 10]
    stream = pass_thread.PassInThread(
        files, SPEC, cache_root=tmp_path, workers=2, order=order
    )
    try:
        assert len(stream.first().mean) == 1
        got = list(stream.samples())
        assert [p for p, _ in got] == order
        result = stream.result()
    finally:
        stream.close()
    assert result.files == files and result.positions == list(range(12))
    assert [e.key.path for _, e in got] == [str(files[i]) for i in order]


def test_streamed_epoch__only_training_samples_that_normalise(dem_dir, tmp_path):
    files = list(find_tiffs(dem_dir))
    odd = write_tiff(tmp_path / "in" / "odd.tif", np.full((40, 40), 1e7, np.float32))
    files.append(odd)
    stream = pass_thread.PassInThread(files, SPEC, cache_root=tmp_path / "c", workers=0)
    try:
        mean = float(np.median([e.mean[0] for _, e in [*stream.samples()]]))
    finally:
        stream.close()
    fixed = PreprocessSpec(image_size=32, in_chans=1, norm_mean=(mean,),
                           norm_std=(1000.0,))  # fmt: skip
    stream = pass_thread.PassInThread(
        files, fixed, cache_root=tmp_path / "c", workers=0
    )
    train_positions = {0, 2, 3, 5, 8, 12}  # 12: odd.tif, whose values are far off
    try:
        batches = list(StreamedEpoch(stream, train_positions, fixed, 4))
        result = stream.result()
    finally:
        stream.close()
    paths = [p for b in batches for p in b["path"]]
    assert paths == [str(files[i]) for i in sorted(train_positions - {12})]
    assert [len(b["z"]) for b in batches] == [4, 1]
    assert [name for name, _ in result.screened] == [str(odd)]
    rows = dict(zip(result.files, result.entries, strict=True))
    first = batches[0]
    z, valid = (np.load(stream.cache_where / f"{rows[files[0]].shard}.{n}.npy")
                for n in ("z", "valid"))  # fmt: skip
    assert np.array_equal(first["z"][0].numpy(), z[rows[files[0]].row])
    assert np.array_equal(first["valid"][0].numpy(), valid[rows[files[0]].row])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_first_epoch__on_cuda_its_batches_are_pinned(dem_dir, tiny_config, tmp_path):
    stream = pass_thread.PassInThread(
        list(find_tiffs(dem_dir)), SPEC, cache_root=tmp_path / "s", workers=0
    )
    try:
        epoch = StreamedEpoch(stream, set(range(12)), SPEC, 4, True)
        batches = list(epoch)
    finally:
        stream.close()
    assert all(b[k].is_pinned() for b in batches for k in ("z", "valid", "coef"))
    result = train(_cfg(tiny_config, tmp_path, device="cuda"), progress=False)
    assert np.isfinite(result.history[0]["train_loss"])


def test_train__sigterm_in_the_pass_before_the_first_step_stops_cleanly(
    tiny_config, tmp_path
):
    """SIGTERM was handled in the epochs only: in the pass that reads every
    raster first (statistics from the data), it killed the run without a word
    and left temporary shard files."""
    cfg = {**tiny_config, "cache_dir": str(tmp_path / "c")}
    code = f"""
import os, signal
import catchment_mae.prepare as prepare
from catchment_mae import train

read = prepare.load_resampled
def read_then_term(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return read(*args, **kwargs)
prepare.load_resampled = read_then_term
try:
    train({cfg!r}, progress=False)
except KeyboardInterrupt:
    print("stopped")
"""
    assert python_out(code) == "stopped"
    cache = next((tmp_path / "c").glob("samples-*"))
    assert not list(cache.glob("*.tmp")) and not list(cache.glob("*.npy"))
