"""Training: schedule, loss falls, saved files, checkpoints, resume, interrupts."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

import catchment_mae
from catchment_mae.config import TrainConfig
from catchment_mae.epochs import lr_at, native_cpu_bf16
from catchment_mae.errors import ConfigError, OutputExistsError, TrainingError
from catchment_mae.loaders import loader_workers
from catchment_mae.train_data import split_files
from catchment_mae.trainer import TrainingInterrupted, train
from tests.conftest import DATA, TINY


def test_lr_at__warmup_then_cosine():
    cfg = TrainConfig.from_dict(
        dict(lr=1.0, warmup_epochs=2.0, max_epochs=10, min_lr=0.1)
    )
    assert lr_at(0.0, cfg) == 0.0
    assert lr_at(1.0, cfg) == pytest.approx(0.5)
    assert lr_at(2.0, cfg) == pytest.approx(1.0)
    assert lr_at(6.0, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down
    assert lr_at(10.0, cfg) == pytest.approx(0.1)
    values = [lr_at(e / 4, cfg) for e in range(8, 41)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_split_files__seeded_disjoint_and_keeps_training_data(tmp_path):
    files = [tmp_path / f"{i}.tif" for i in range(20)]
    train_a, val_a = split_files(files, 0.1, seed=0)
    train_b, val_b = split_files(files, 0.1, seed=0)
    assert (train_a, val_a) == (train_b, val_b) and len(val_a) == 2
    assert not set(train_a) & set(val_a) and len(train_a) + len(val_a) == 20
    assert split_files(files[:1], 0.5, 0) == (files[:1], [])


def test_train__loss_falls_and_files_are_plain_data(trained):
    history = trained.history
    assert len(history) == 2 and all(math.isfinite(h["train_loss"]) for h in history)
    state = torch.load(trained.weights_path, weights_only=True)
    assert set(state) >= {"model", "config", "epoch", "cmae_version"}
    assert any(k.startswith("encoder.scale_embed.") for k in state["model"])
    saved = TrainConfig.from_json(trained.config_path)
    assert (
        saved.preprocess.in_chans == 1 and len(saved.preprocess.norm_mean) == 1
    )  # filled from the data
    assert saved == TrainConfig.from_dict(state["config"])
    ckpt = torch.load(trained.checkpoint_path, weights_only=True)
    assert ckpt["epoch"] == 1 and "optimizer" in ckpt
    lines = trained.metrics_path.read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    for png in (".loss.png", ".preview.png"):
        p = trained.weights_path.with_suffix(png)
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train__loss_falls_over_a_few_epochs(tiny_config):
    result = train({**tiny_config, "max_epochs": 6, "lr": 3e-3}, progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.8 * losses[0], losses


def test_train__resume_gives_the_same_weights(tiny_config, tmp_path):
    cfg = {**tiny_config, "max_epochs": 3}
    full = train(
        {**cfg, "model_output_path": str(tmp_path / "a" / "m.pth")}, progress=False
    )

    def stop_after_two(stats):
        if stats["epoch"] == 2:
            raise KeyboardInterrupt

    b = {**cfg, "model_output_path": str(tmp_path / "b" / "m.pth")}
    with pytest.raises(TrainingInterrupted, match="resume with --resume"):
        train(b, progress=False, on_epoch_end=stop_after_two)
    ckpt = tmp_path / "b" / "m.ckpt.pth"
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1  # epoch 2 is saved
    assert not (tmp_path / "b" / "m.pth").exists()
    resumed = train(b, progress=False, resume=ckpt)
    wa = torch.load(full.weights_path, weights_only=True)["model"]
    wb = torch.load(resumed.weights_path, weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]


def test_train__resuming_a_finished_run_says_so(tiny_config, caplog):
    """It said "resuming ... at epoch N+1" and trained nothing."""
    cfg = {**tiny_config, "max_epochs": 1}
    done = train(cfg, progress=False)
    with caplog.at_level("WARNING", logger="catchment_mae"):
        again = train(cfg, progress=False, resume=done.checkpoint_path)
    assert again.epochs_run == 0
    assert f"has all {cfg['max_epochs']} epoch(s) done: nothing to train" in (
        caplog.text
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_train__from_the_cache_or_the_tiffs_the_same_weights(
    tiny_config, tmp_path, workers
):
    """The cache changes where the pixels come from, not what they are: a run from
    the cache, one that builds it and one without it end with equal weights."""
    cfg = {**tiny_config, "max_epochs": 2, "num_workers": workers}
    cache = str(tmp_path / "cache")
    weights = []
    for name, extra in (
        ("build", {"cache_dir": cache}),
        ("reuse", {"cache_dir": cache}),
        ("none", {"cache": False}),
    ):
        out = str(tmp_path / name / "m.pth")
        r = train({**cfg, **extra, "model_output_path": out}, progress=False)
        weights.append(torch.load(r.weights_path, weights_only=True)["model"])
        if name == "reuse":
            assert r.cache.startswith("cache: 12 of 12 raster(s) reused, 0 read now")
        if name == "none":
            assert "no-cache" in r.cache
    for w in weights[1:]:
        for k in w:
            assert torch.equal(w[k], weights[0][k]), k
    assert list((tmp_path / "cache").glob("samples-*/*.z.npy"))


def test_train__the_loss_is_read_every_log_every_steps(tiny_config):
    calls = []
    cfg = {**tiny_config, "max_epochs": 1, "batch_size": 2, "log_every": 2}
    result = train(cfg, progress=False, on_batch_end=calls.append)
    # 11 training files in batches of 2: 6 steps; read after 2, 4 and 6.
    assert [c["step"] for c in calls] == [2, 4, 6]
    assert all(c["steps"] == 6 and math.isfinite(c["loss"]) for c in calls)
    images = [2, 2, 2, 2, 2, 1]
    mean = sum(c["loss"] * n for c, n in zip(calls, [4, 4, 3], strict=True)) / 11
    assert result.history[0]["train_loss"] == pytest.approx(mean)
    assert result.history[0]["images"] == sum(images)


def test_train__a_non_finite_step_is_skipped_and_named(
    tiny_config, monkeypatch, caplog
):
    """A step whose loss is not finite leaves the weights as they were (fused
    AdamW skips it on the device), the run goes on, and a warning names the
    files of that batch; an epoch with no finite step ends the run."""
    from catchment_mae.model import ScaleAwareMAE

    real = ScaleAwareMAE.forward
    calls = {"n": 0}

    def forward(self, images, valid, scale):
        loss, pred, mask = real(self, images, valid, scale)
        calls["n"] += 1
        if self.training and calls["n"] == 2:
            loss = loss * float("nan")
        return loss, pred, mask

    monkeypatch.setattr(ScaleAwareMAE, "forward", forward)
    cfg = {**tiny_config, "max_epochs": 1, "log_every": 1}
    with caplog.at_level("WARNING"):
        result = train(cfg, progress=False)
    stats = result.history[0]
    assert stats["skipped_steps"] == 1 and math.isfinite(stats["train_loss"])
    assert stats["images"] == 11 - 4  # the skipped batch of 4 does not count
    assert "skipped 1 step(s) of epoch 1 whose loss was not finite (step 2)" in (
        caplog.text
    )
    assert ".tif" in caplog.text.split("their batches held")[1]
    weights = torch.load(result.weights_path, weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in weights.values())

    def always_nan(self, images, valid, scale):
        loss, pred, mask = real(self, images, valid, scale)
        return loss * float("nan"), pred, mask

    monkeypatch.setattr(ScaleAwareMAE, "forward", always_nan)
    out = str(tiny_config["model_output_path"]).replace("m.pth", "nan.pth")
    with pytest.raises(TrainingError, match="not finite at any step of epoch 1"):
        train({**cfg, "model_output_path": out}, progress=False)


def test_train__a_raster_far_outside_the_rest_is_skipped(
    tiny_config, tmp_path, dem_dir
):
    """A DEM-like float64 raster with values of 1e16 (its nodata masked) among
    ordinary DEMs: computed statistics leave it out, given ones refuse it, the
    run goes on and names it; --strict stops on it."""
    import shutil

    import numpy as np
    import tifffile

    d = tmp_path / "dems"
    shutil.copytree(dem_dir, d)
    odd = np.random.default_rng(0).uniform(-6.5e15, 2.6e16, (216, 432))
    odd[:20] = -1.27e30
    tifffile.imwrite(d / "odd.tif", odd, extratags=[(42113, "s", 0, "-1.27e30", True)])
    base = {**tiny_config, "input_dir": str(d), "max_epochs": 1}
    for extra in ({}, {"norm_mean": [2000.0], "norm_std": [1000.0]}):
        out = str(tmp_path / f"m{len(extra)}.pth")
        result = train({**base, **extra, "model_output_path": out}, progress=False)
        assert result.files == 12 and math.isfinite(result.history[0]["train_loss"])
        reasons = dict(result.skipped)
        assert "far outside the rest" in reasons[str(d / "odd.tif")] or (
            "would normalise to about" in reasons[str(d / "odd.tif")]
        )
        saved = json.loads(result.config_path.read_text())
        assert 0 < saved["norm_mean"][0] < 10_000 and saved["norm_std"][0] < 10_000
    with pytest.raises(TrainingError, match=r"odd\.tif: .*\(--strict\)"):
        train({**base, "model_output_path": str(tmp_path / "s.pth")}, strict=True,
              progress=False)  # fmt: skip


def test_train__resume_refuses_another_config(trained, tiny_config):
    with pytest.raises(TrainingError, match="other settings.*mask_ratio"):
        train(
            {**tiny_config, "mask_ratio": 0.5},
            resume=trained.checkpoint_path,
            progress=False,
        )


def test_train__refuses_to_overwrite(trained, tiny_config):
    cfg = {**tiny_config, "model_output_path": str(trained.weights_path)}
    with pytest.raises(OutputExistsError, match="already exists"):
        train(cfg, progress=False)


def test_train__original_config_dict_through_the_python_api(tmp_path, dem_dir):
    seed = json.loads((DATA / "seed_config.json").read_text())
    seed.update(input_dir=str(dem_dir), model_output_path=str(tmp_path / "orig.pth"))
    # The original keys as they are, plus the tiny-model overrides for speed.
    seed.update(
        {
            k: TINY[k]
            for k in ("image_size", "patch_size", "embed_dim", "depth", "num_heads")
        }
    )
    seed.update(
        max_epochs=1, batch_size=4, num_workers=0, decoder_dim=32, decoder_num_heads=2
    )
    result = catchment_mae.train(seed, progress=False)
    saved = json.loads(result.config_path.read_text())
    assert saved["norm_mean"] == [2000.0] and saved["norm_std"] == [1000.0]
    assert saved["mask_ratio"] == 0.75 and saved["in_chans"] == 1
    assert list(saved)[:11] == list(json.loads((DATA / "seed_config.json").read_text()))


def test_train__data_loader_workers(tiny_config):
    result = train({**tiny_config, "num_workers": 2, "max_epochs": 1}, progress=False)
    assert result.history[0]["images"] == 11  # 12 files, 1 held out


def test_train__bf16(tiny_config, caplog):
    result = train(
        {**tiny_config, "precision": "bf16", "max_epochs": 1}, progress=False
    )
    assert math.isfinite(result.history[0]["train_loss"])
    warned = "has no native bf16" in caplog.text
    assert warned == (not native_cpu_bf16())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train__cuda(tiny_config):
    result = train({**tiny_config, "device": "cuda", "max_epochs": 1}, progress=False)
    assert math.isfinite(result.history[0]["train_loss"])


def test_loader_workers__never_more_than_cores_or_files():
    cores = len(os.sched_getaffinity(0))
    assert loader_workers(64, 1000) == cores
    assert loader_workers(4, 1) == 1
    assert loader_workers(0, 10) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_train__cuda_requested_without_a_gpu(tiny_config):
    with pytest.raises(
        ConfigError, match="cuda was asked for but torch sees no CUDA GPU"
    ):
        train({**tiny_config, "device": "cuda"}, progress=False)


def test_deferred_interrupts__a_stop_waits_for_the_write():
    import os
    import signal
    import time

    from catchment_mae.interrupt import deferred_interrupts

    before = signal.getsignal(signal.SIGINT)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal arrives here, and waits
            done.append("written")
    assert done == ["written"] and signal.getsignal(signal.SIGINT) is before
    with deferred_interrupts():  # no signal: nothing raised
        done.append("again")
    assert done == ["written", "again"]


@pytest.mark.parametrize("norm", ["fixed", "per-raster"])
def test_train__norm_values_for_other_bands_than_the_data_s(tiny_config, norm):
    """With the band count left to the data, two norm values for one-band DEMs
    ended in an 'internal error' (a ValueError of the preprocessing spec)."""
    cfg = {**tiny_config, "norm": norm, "norm_mean": [1500.0, 200.0],
           "norm_std": [700.0, 2.0], "cache_dir": None}  # fmt: skip
    with pytest.raises(ConfigError, match=r"norm_mean/norm_std have 2 value"):
        catchment_mae.train(cfg, progress=False)


def test_train__its_name_json_reproduces_the_run(tiny_config, tmp_path):
    """NAME.json holds the statistics the run computed from the data; trained
    again from it, the run streamed its first epoch in another order, and the
    weights differed (52 of 55 tensors)."""
    first = train({**tiny_config, "model_output_path": str(tmp_path / "a" / "m.pth")},
                  progress=False)  # fmt: skip
    saved = json.loads((tmp_path / "a" / "m.json").read_text())
    assert saved["extra"]["norm_stats_from"] == "data"
    again = train({**saved, "model_output_path": str(tmp_path / "b" / "m.pth")},
                  progress=False)  # fmt: skip
    wa = torch.load(first.weights_path, weights_only=True)["model"]
    wb = torch.load(again.weights_path, weights_only=True)["model"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_sigterm_as_interrupt__a_rank_that_drops_signals_keeps_dropping_them():
    """cmae train's whole run handles SIGTERM now, around the epochs' own
    handler; a rank that stops drops signals from then on (its group's threads
    abort the process if a second one cuts the shutdown), and leaving the run's
    block must not bring SIGTERM back."""
    import signal

    from catchment_mae.interrupt import ignore_interrupts, sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        with sigterm_as_interrupt(), sigterm_as_interrupt():
            pass
        assert signal.getsignal(signal.SIGTERM) is before[0]
        with sigterm_as_interrupt():  # a library's own handler (ray.init's)
            signal.signal(signal.SIGTERM, lambda *_: None)
        assert signal.getsignal(signal.SIGTERM) is before[0]
        with sigterm_as_interrupt():
            with sigterm_as_interrupt():
                pass
            ignore_interrupts()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])


def test_train__outputs_never_written_through_links(tiny_config, tmp_path):
    """A hard link or a symlink planted at an output's name loses that name;
    the file it leads to is never written."""
    out = Path(tiny_config["model_output_path"]).parent
    out.mkdir(parents=True)
    outside = tmp_path / "outside.txt"
    outside.write_text("KEEP")
    os.link(outside, out / "m.metrics.jsonl")
    (out / "m.loss.png").symlink_to(outside)
    result = train(tiny_config, progress=False)
    assert outside.read_text() == "KEEP"
    lines = result.metrics_path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["epoch"] == 2
    assert not (out / "m.loss.png").is_symlink()
