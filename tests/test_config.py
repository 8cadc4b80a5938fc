"""The config dataclass: original keys, JSON round trip, validation, precedence."""

from __future__ import annotations

import json

import pytest

from catchment_mae.config import TrainConfig
from catchment_mae.errors import ConfigError
from catchment_mae.spec import PreprocessSpec
from tests.conftest import DATA

SEED_CONFIG = DATA / "seed_config.json"


def test_config__seed_config_loads_as_it_is():
    cfg = TrainConfig.from_json(SEED_CONFIG)
    seed = json.loads(SEED_CONFIG.read_text())
    for key, value in seed.items():
        assert cfg.to_dict()[key] == value
    assert str(cfg.weights_path) == "catchment_foundation_model.pth"
    assert str(cfg.config_path) == "catchment_foundation_model.json"


def test_config__json_round_trip(tmp_path):
    cfg = TrainConfig.from_dict(
        dict(
            input_dir="x",
            bands=[3, 2, 1],
            in_chans=3,
            norm_mean=[1, 2, 3],
            norm_std=[1, 1, 1],
        )
    )
    path = tmp_path / "c.json"
    path.write_text(cfg.to_json())
    back = TrainConfig.from_json(path)
    assert back == cfg
    assert back.preprocess.norm_mean == (1.0, 2.0, 3.0)
    assert isinstance(back.preprocess.norm_mean[0], float)


@pytest.mark.parametrize(
    "data,match",
    [
        ({"learning_rate": 1}, "Unknown config key: learning_rate"),
        ({"image_size": "224"}, "config key image_size must be int"),
        ({"batch_size": True}, "config key batch_size must be int"),
        ({"norm_mean": [1.0], "norm_std": [0.0]}, r"norm_std\[0\] must be > 0"),
        ({"norm_mean": [1.0]}, "must be given together"),
        ({"mask_ratio": 1.0}, r"mask_ratio must be in \(0, 1\)"),
        ({"lr": float("nan")}, "lr must be > 0 and finite, got nan"),
        ({"min_lr": float("inf")}, "min_lr must be >= 0 and finite"),
        ({"norm": "global"}, "norm must be one of fixed, per-raster"),
        (
            {"in_chans": 2, "bands": [1, 2, 3]},
            "bands selects 3 bands but in_chans is 2",
        ),
        ({"bands": [0]}, "1-based"),
        ({"image_size": 30, "patch_size": 8}, "not a multiple of patch_size"),
        ({"max_epochs": 0}, "max_epochs must be >= 1"),
        ({"cache_dir": ""}, r"cache_dir \(--cache\) is empty \(an unset variable\?\)"),
    ],
)
def test_config__rejects_bad_values_naming_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(data)


@pytest.mark.parametrize(
    "bad",
    [
        {"bands": [0]},
        {"norm_mean": [float("nan")], "norm_std": [1.0]},
        {"nodata": float("inf")},
        {"scale_eps": 0.0},
        {"slope_channel": True, "scale": "pixels"},
        {"slope_stats": True, "slope_channel": False},
        {"resize": "bilinear"},
    ],
)
def test_config__refuses_what_a_spec_refuses_in_the_same_words(bad):
    """The preprocessing rules are written once: a config refuses the settings a
    spec refuses, naming the same key."""
    with pytest.raises(ConfigError) as config_error:
        TrainConfig.from_dict(bad)
    spec = {"image_size": 32, "in_chans": 1, "scale": "ground", "slope_channel": True}
    spec.update({k: tuple(v) if isinstance(v, list) else v for k, v in bad.items()})
    with pytest.raises(ValueError) as spec_error:
        PreprocessSpec(**spec)
    assert str(config_error.value) == str(spec_error.value)
    assert config_error.value.key == spec_error.value.key == next(iter(bad))


def test_config__bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json: not valid JSON"):
        TrainConfig.from_json(bad)
    with pytest.raises(ConfigError, match=r"missing\.json: cannot read config"):
        TrainConfig.from_json(tmp_path / "missing.json")
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        TrainConfig.from_json(arr)


def test_config__precedence_defaults_then_file_then_flags():
    cfg = TrainConfig.from_json(SEED_CONFIG)
    merged = cfg.merged({"max_epochs": 3, "batch_size": None, "image_size": 64})
    assert merged.max_epochs == 3  # flag wins
    assert merged.batch_size == 32  # None flag keeps the file's value
    assert (
        merged.preprocess.image_size == 64
        and merged.vit_model_name == "vit_small_patch16_224"
    )


def test_config__lr_rule():
    assert TrainConfig.from_dict(dict(batch_size=32)).base_lr == pytest.approx(5e-4)
    assert TrainConfig.from_dict(dict(batch_size=128)).base_lr == pytest.approx(
        1e-3
    )  # sqrt
    assert TrainConfig.from_dict(dict(batch_size=64, lr=0.01)).base_lr == 0.01
    # A format-1 NAME.json keeps MAE's linear rule it was trained with.
    old = TrainConfig.from_dict({"batch_size": 256, "format_version": 1})
    assert old.base_lr == pytest.approx(1.5e-4)


def test_config__norm_statistics_given_anew_are_not_the_data_s():
    """A NAME.json whose statistics came from the data, with --norm-mean and
    --norm-std on top: those are the user's (its first epoch may stream)."""
    saved = TrainConfig.from_dict(
        {"norm_mean": [1.0], "norm_std": [2.0], "extra": {"norm_stats_from": "data"}}
    )
    assert saved.merged({"epochs": None}).extra == {"norm_stats_from": "data"}
    given = saved.merged({"norm_mean": [5.0], "norm_std": [6.0]})
    assert given.extra == {} and given.preprocess.norm_mean == (5.0,)


def test_config__scale_statistics_fit_the_scale_vector():
    TrainConfig.from_dict(dict(in_chans=1, scale_mean=[0.0] * 6, scale_std=[1.0] * 6))
    TrainConfig.from_dict(
        dict(scale_stats=False, scale_mean=[0.0] * 2, scale_std=[1.0] * 2)
    )
    with pytest.raises(ConfigError, match="scale_mean and scale_std must be given"):
        TrainConfig.from_dict(dict(scale_mean=[0.0] * 6))
    with pytest.raises(ConfigError, match="have 2/2 values; the scale vector has 6"):
        TrainConfig.from_dict(
            dict(in_chans=1, scale_mean=[0.0] * 2, scale_std=[1.0] * 2)
        )
    with pytest.raises(ConfigError, match="scale_std values must be > 0"):
        TrainConfig.from_dict(
            dict(in_chans=1, scale_mean=[0.0] * 6, scale_std=[0.0] * 6)
        )


def test_config__a_format_2_name_json_has_no_slope_statistics():
    """Models saved before the slope statistics keep their scale vector; new
    configs choose them with the slope channel."""
    old = TrainConfig.from_dict({"format_version": 2, "slope_channel": True,
                                 "scale": "ground", "in_chans": 1})  # fmt: skip
    assert old.preprocess.slope_stats is False and old.scale_dim == 6
    new = TrainConfig.from_dict(
        dict(slope_channel=True, scale="ground", in_chans=1, slope_stats=True)
    )
    assert new.scale_dim == 8 and new.format_version == 3
    with pytest.raises(ConfigError, match="slope_stats needs the slope channel"):
        TrainConfig.from_dict(dict(slope_channel=False, slope_stats=True))


def test_config__the_preprocessing_is_one_spec_flat_in_name_json():
    """The config holds its preprocessing as one PreprocessSpec (none of its own
    fields repeats one of the spec's); NAME.json holds the spec's fields flat,
    the original tool's keys among them, and reads back to the same spec."""
    import dataclasses

    from catchment_mae.spec import fields_of_spec

    own = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not own & set(fields_of_spec()) and "preprocess" in own
    cfg = TrainConfig.from_dict(dict(
        vit_model_name="vit_tiny_patch16_224", image_size=32, in_chans=2,
        norm="fixed", norm_mean=[1, 2.0], norm_std=[3.0, 4.0], max_epochs=1,
        scale="pixels", slope_channel=False, slope_stats=False, bands=[2, 1],
        nodata=-5.0, trim=False, scale_stats=False, max_pixels=1000,
    ))  # fmt: skip
    flat = json.loads(cfg.to_json())
    assert "preprocess" not in flat and flat["norm_mean"] == [1.0, 2.0]
    assert {"image_size", "in_chans", "norm_mean", "norm_std"} <= set(flat)
    assert set(fields_of_spec()) <= set(flat)
    assert cfg.preprocess_spec() is cfg.preprocess and cfg.preprocess.bands == (2, 1)
    assert TrainConfig.from_dict(flat) == cfg
    with pytest.raises(ConfigError, match="Unknown config key: preprocess"):
        TrainConfig.from_dict({"preprocess": {}})
