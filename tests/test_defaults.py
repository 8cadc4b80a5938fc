"""The settings cmae train chooses from the archive and the device."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from catchment_mae.cli.main import cli
from catchment_mae.config import TrainConfig
from catchment_mae.defaults import (
    MAX_EPOCHS,
    MIN_EPOCHS,
    SAMPLES_GPU,
    SMALL_VIT,
    epochs_for,
    native_image_size,
    resolve,
)
from catchment_mae.raster import find_tiffs


def test_resolve__georeferenced_dems_get_ground_and_a_slope_channel(dem_dir):
    paths = list(find_tiffs(dem_dir))
    cfg, line = resolve(TrainConfig(), paths, len(paths), "cpu", threads=2)
    assert cfg.resolved
    assert (
        cfg.preprocess.scale,
        cfg.preprocess.slope_channel,
        cfg.preprocess.norm,
    ) == ("ground", True, "per-raster")
    assert {k: cfg.setting(k) for k in SMALL_VIT} == SMALL_VIT
    assert cfg.max_epochs == epochs_for(len(paths), "cpu", cores=cfg_cores())
    assert cfg.threads is None  # a machine's setting: never written to NAME.json
    for said in ("vit_tiny_patch16_224", "64 px", "2 thread(s)", "scale ground",
                 "slope channel", f"{cfg.max_epochs} epoch(s)"):  # fmt: skip
        assert said in line, line


def cfg_cores() -> int:
    from catchment_mae.workers import available_cores

    return available_cores()


def test_resolve__rasters_without_georeferencing_get_pixels(tmp_path, dem_dir):
    d = tmp_path / "mixed"
    d.mkdir()
    for p in sorted(dem_dir.glob("*.tif"))[:3]:
        (d / p.name).write_bytes(p.read_bytes())
    tifffile.imwrite(d / "plain.tif", np.ones((20, 20), np.float32))  # no GeoKeys
    paths = list(find_tiffs(d))
    cfg, line = resolve(TrainConfig(), paths, len(paths), "cpu")
    assert (cfg.preprocess.scale, cfg.preprocess.slope_channel) == ("pixels", False)
    assert "scale pixels (1 of 4 probed rasters have no size in metres)" in line


def test_resolve__several_bands_get_no_slope_and_given_settings_stay(tmp_path):
    from catchment_mae.synth import generate_multiband

    paths = generate_multiband(tmp_path, 2, bands=3, seed=1)
    cfg, _ = resolve(TrainConfig(), paths, 2, "cpu")
    assert (cfg.preprocess.scale, cfg.preprocess.slope_channel) == ("ground", False)
    given = TrainConfig.from_dict(dict(
        vit_model_name="vit_small_patch16_224", max_epochs=7, norm_mean=[1.0],
        norm_std=[2.0], scale="pixels",
    ))  # fmt: skip
    cfg, line = resolve(given, paths, 2, "cuda")
    assert (cfg.vit_model_name, cfg.preprocess.image_size, cfg.patch_size) == (
        "vit_small_patch16_224", 224, None,
    )  # fmt: skip
    assert native_image_size("vit_base_patch16_384") == 384
    assert (cfg.max_epochs, cfg.preprocess.norm, cfg.preprocess.scale) == (
        7,
        "fixed",
        "pixels",
    )
    assert "thread" not in line and "scale" not in line.split(";")[1]


@pytest.mark.parametrize("samples", [1, 100, 500, 5000, 10**6])
def test_epochs_for__a_budget_of_samples_within_bounds(samples):
    cpu, gpu = epochs_for(samples, "cpu", cores=2), epochs_for(samples, "cuda", 2)
    assert MIN_EPOCHS <= cpu <= gpu <= MAX_EPOCHS
    if samples == 500:
        assert cpu * samples <= 30_000  # about 3 minutes on 2 cores
    if samples == 5000:
        assert gpu == round(SAMPLES_GPU / 5000)


def test_cli_train__defaults_say_what_they_chose_and_how_long(
    runner, tmp_path, dem_dir
):
    """No model options: the auto model (shrunk here by flags to stay fast),
    one line saying what was chosen, then an estimate of the time."""
    dec = tmp_path / "dec.json"
    dec.write_text(json.dumps({"decoder_dim": 32, "decoder_depth": 1,
                               "decoder_num_heads": 2}))  # fmt: skip
    r = runner.invoke(cli, [
        "train", str(dem_dir), "--out", str(tmp_path / "m.pth"), "--embed-dim", "32",
        "--depth", "1", "--num-heads", "2", "--epochs", "2", "--batch-size", "4",
        "--num-workers", "0", "--device", "cpu", "--config", str(dec),
        "--threads", "1",
    ])  # fmt: skip
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    plan = [ln for ln in lines if ln.startswith("training ")]
    assert len(plan) == 1 and "at 64 px" in plan[0] and "1 thread(s)" in plan[0]
    assert any(ln.endswith("to go (2 epochs)") for ln in lines), r.stderr
    saved = json.loads((tmp_path / "m.json").read_text())
    assert (saved["vit_model_name"], saved["image_size"], saved["patch_size"]) == (
        "vit_tiny_patch16_224", 64, 8,
    )  # fmt: skip
    assert (saved["scale"], saved["slope_channel"], saved["threads"]) == (
        "ground", True, 1,
    )  # fmt: skip
    assert len(saved["scale_mean"]) == len(saved["scale_std"]) == 8
    assert saved["slope_stats"] is True  # with the slope channel
    assert saved["extra"]["scale_stats_from"] == "data"


@pytest.mark.parametrize(
    "flags,says",
    [
        (["--image-size", "60"], "60 is not a multiple of the patch size 8"),
        (
            ["--model", "vit_small_patch16_224", "--image-size", "72"],
            "72 is not a multiple of the patch size 16",
        ),  # fmt: skip
        (["--image-size", "60", "--patch-size", "12"], None),
    ],
)
def test_cli_train__an_image_size_the_patches_do_not_tile_is_a_usage_error(
    runner, tmp_path, flags, says
):
    r = runner.invoke(cli, ["train", str(tmp_path), "--out", str(tmp_path / "m.pth"),
                            *flags])  # fmt: skip
    if says is None:  # a valid size: the run goes on (and finds no TIFF here)
        assert r.exit_code == 1 and "no .tif/.tiff files" in r.stderr
        return
    assert r.exit_code == 2 and says in r.stderr and "Traceback" not in r.output


def test_train__resuming_keeps_what_the_first_part_chose(tiny_config, tmp_path):
    """A run resumed with settings left to choose takes its checkpoint's
    choices (its epochs among them), not new ones."""
    from catchment_mae.trainer import train

    first = train({**tiny_config, "max_epochs": 2}, progress=False)
    open_cfg = {k: v for k, v in tiny_config.items() if k != "max_epochs"}
    again = train(open_cfg, resume=first.checkpoint_path, progress=False)
    assert again.config.max_epochs == 2 and again.epochs_run == 0
    assert again.config.preprocess.scale == first.config.preprocess.scale == "ground"
