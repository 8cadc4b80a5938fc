"""The one preprocessing path: resize, nodata, normalisation, scale vector."""

from __future__ import annotations

import math

import numpy as np
import pytest

from catchment_mae.errors import BadRasterError
from catchment_mae.preprocess import (
    load_sample,
    norm_coefficients,
    normalise,
    preprocess,
    resample,
    resize_valid_weighted,
    resize_weights,
)
from catchment_mae.raster import GeoInfo, Raster, RasterInfo
from catchment_mae.spec import PreprocessSpec


def _raster(data: np.ndarray, valid: np.ndarray | None = None, **info) -> Raster:
    c, h, w = data.shape
    base = dict(
        path="mem.tif", height=h, width=w, bands=c, dtype="float32", nodata=None
    )
    base.update(read_height=h, read_width=w)
    base.update(info)
    valid = np.ones((h, w), bool) if valid is None else valid
    return Raster(data=data.astype(np.float32), valid=valid, info=RasterInfo(**base))


def _spec(**kw) -> PreprocessSpec:
    base = dict(image_size=16, in_chans=1, norm_mean=(0.0,), norm_std=(1.0,))
    base.update(kw)
    return PreprocessSpec(**base)


@pytest.mark.parametrize(
    "n_in,n_out", [(1, 8), (3, 16), (16, 16), (17, 5), (1000, 32), (64, 63)]
)
def test_resize_weights__rows_sum_to_one(n_in, n_out):
    w = resize_weights(n_in, n_out)
    assert w.shape == (n_out, n_in)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)
    assert (w >= 0).all()


def test_resize_weights__identity_at_same_size():
    np.testing.assert_allclose(resize_weights(12, 12), np.eye(12), atol=1e-7)


def test_resize__downsample_by_two_matches_antialiased_bilinear():
    # Factor 2: the triangle widens to 2 input pixels, so an interior output pixel
    # weighs its inputs 1/8, 3/8, 3/8, 1/8 (PIL's and torch's antialias bilinear).
    x = (np.arange(8, dtype=np.float32) ** 2)[None, None, :].repeat(2, axis=1)
    num, den = resize_valid_weighted(x, np.ones((2, 8), np.float32), 2)
    w = resize_weights(8, 4)
    np.testing.assert_allclose(w[1, :6], [0, 1 / 8, 3 / 8, 3 / 8, 1 / 8, 0], atol=1e-7)
    assert (x[0, 0] @ w[1]) == pytest.approx(56 / 8)
    assert num.shape == (1, 2, 2) and den.shape == (2, 2)
    np.testing.assert_allclose(den, 1.0, rtol=1e-6)


def test_resize__block_reduction_path_matches_direct_filter_on_smooth_input():
    h, w = 900, 700  # > 2 * size: the block-mean shortcut is taken
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    x = (np.sin(yy / 150) + np.cos(xx / 120))[None]
    num, den = resize_valid_weighted(x, np.ones((h, w), np.float32), 32)
    direct = resize_weights(h, 32) @ x[0] @ resize_weights(w, 32).T
    np.testing.assert_allclose(num[0] / den, direct, atol=0.03)


@pytest.mark.parametrize("shape", [(5, 7), (16, 16), (300, 120), (1, 256), (2, 2)])
def test_preprocess__constant_raster_stays_constant(shape):
    r = _raster(np.full((1, *shape), 3.0))
    s = preprocess(r, _spec(norm_mean=(1.0,), norm_std=(2.0,)))
    assert s.image.shape == (1, 16, 16) and s.image.dtype == np.float32
    np.testing.assert_allclose(s.image, 1.0, atol=1e-5)  # (3 - 1) / 2
    np.testing.assert_allclose(s.valid, 1.0, atol=1e-5)


@pytest.mark.parametrize("size", [(40, 40), (400, 400), (9, 33)])
def test_preprocess__nodata_never_smears_into_valid_pixels(size):
    h, w = size
    data = np.full((1, h, w), 1.0)
    valid = np.ones((h, w), bool)
    valid[:, : w // 2] = False
    data[0, ~valid] = 1e6  # a huge nodata value must not leak
    s = preprocess(_raster(data, valid), _spec())
    assert s.image.max() <= 1.0 + 1e-5
    assert set(np.unique(np.round(s.image, 4))) <= {0.0, 1.0}
    # The valid fraction falls from 1 to 0 across the edge.
    assert s.valid[0, :, 0].max() == 0 and s.valid[0, :, -1].min() == pytest.approx(1.0)


def test_preprocess__invalid_pixels_become_zero_after_normalising():
    data = np.full((2, 10, 10), 7.0)
    valid = np.zeros((10, 10), bool)
    valid[5:, 5:] = True
    s = preprocess(
        _raster(data, valid),
        _spec(in_chans=2, norm_mean=(1.0, 2.0), norm_std=(2.0, 5.0)),
    )
    assert np.allclose(s.image[:, :4, :4], 0.0)  # far from any valid pixel
    assert s.image[0, -1, -1] == pytest.approx(3.0) and s.image[
        1, -1, -1
    ] == pytest.approx(1.0)


def test_preprocess__per_raster_norm():
    # A tilted plane at 2000 m: per-raster norm keeps the relief, drops the altitude.
    data = 2000 + 50 * np.linspace(-1, 1, 64)[None, None, :].repeat(64, axis=1)
    s = preprocess(
        _raster(data), _spec(norm="per-raster", norm_mean=None, norm_std=None)
    )
    assert abs(float(s.image.mean())) < 0.02
    assert float(s.image.std()) == pytest.approx(1.0, abs=0.05)
    assert s.image[0, 0, 0] < -1.5 and s.image[0, 0, -1] > 1.5
    flat = preprocess(
        _raster(np.full((1, 8, 8), 5.0)),
        _spec(norm="per-raster", norm_mean=None, norm_std=None),
    )
    np.testing.assert_allclose(flat.image, 0.0)  # std 0: stays flat, no NaN


def test_preprocess__scale_vector_in_pixels():
    s = preprocess(_raster(np.ones((1, 30, 500))), _spec())
    np.testing.assert_allclose(
        s.scale, [math.log(30 + 1e-6), math.log(500 + 1e-6)], rtol=1e-6
    )
    assert s.scale.dtype == np.float32


def test_preprocess__scale_uses_the_full_size_not_the_read_size():
    r = _raster(np.ones((1, 64, 64)), height=4096, width=2048)  # read from an overview
    s = preprocess(r, _spec())
    np.testing.assert_allclose(s.scale, np.log([4096, 2048]), rtol=1e-6)


def test_preprocess__ground_scale_equal_for_one_catchment_at_two_resolutions(make_dem):
    # The same 3 km x 4.5 km catchment at 5 m and at 30 m.
    fine = make_dem("fine.tif", height=600, width=900, pixel=5.0)
    coarse = make_dem("coarse.tif", height=100, width=150, pixel=30.0)
    spec = _spec(norm="per-raster", norm_mean=None, norm_std=None, scale="ground")
    a, b = load_sample(fine, spec), load_sample(coarse, spec)
    np.testing.assert_allclose(a.scale, b.scale, rtol=1e-6)
    np.testing.assert_allclose(a.scale, np.log([3000.0, 4500.0]), rtol=1e-6)
    pix = _spec(norm="per-raster", norm_mean=None, norm_std=None)
    assert not np.allclose(load_sample(fine, pix).scale, load_sample(coarse, pix).scale)


def test_preprocess__scale_none_is_zeros_whatever_the_raster():
    """The ablation: no scale input, and no georeferencing needed for it."""
    spec = _spec(scale="none")
    for h, w in ((30, 500), (64, 64)):
        s = preprocess(_raster(np.ones((1, h, w)), geo=GeoInfo()), spec)
        assert s.scale.tolist() == [0.0, 0.0] and s.scale.dtype == np.float32
    with pytest.raises(
        ValueError, match="scale must be one of auto, pixels, ground, none"
    ):
        _spec(scale="metres")


def test_preprocess__ground_scale_without_georeferencing_is_a_file_error():
    r = _raster(np.ones((1, 8, 8)), geo=GeoInfo())
    with pytest.raises(BadRasterError, match=r"mem\.tif: has no usable georeferencing"):
        preprocess(r, _spec(scale="ground"))


@pytest.mark.parametrize(
    "data,valid,match",
    [
        (np.ones((1, 1, 1)), None, r"1x1 pixels, too small"),
        (np.ones((1, 8, 8)), np.zeros((8, 8), bool), "no valid pixels"),
        (np.ones((3, 8, 8)), None, r"has 3 band\(s\) but the model takes 1"),
    ],
)
def test_preprocess__unusable_rasters(data, valid, match):
    with pytest.raises(BadRasterError, match=match):
        preprocess(_raster(data, valid), _spec())


def test_preprocess_spec__validates_and_round_trips():
    with pytest.raises(ValueError, match=r"norm_std\[0\] must be > 0"):
        _spec(norm_std=(0.0,))
    with pytest.raises(ValueError, match="given together"):
        _spec(norm_std=None)
    # Fixed norm without its statistics (training's first pass) resamples, and
    # refuses only to normalise.
    unknown = _spec(norm_mean=None, norm_std=None)
    r = resample(_raster(np.ones((1, 8, 8))), unknown)
    with pytest.raises(ValueError, match="needs norm_mean and norm_std"):
        normalise(r, unknown)
    with pytest.raises(
        ValueError, match="norm_mean/norm_std have 1 values but in_chans is 2"
    ):
        _spec(in_chans=2)
    spec = _spec(bands=(3,), nodata=-1.0, scale="ground")
    assert PreprocessSpec.from_mapping(spec.to_dict()) == spec


def test_load_sample__synthetic_dem_end_to_end(make_dem):
    path = make_dem(height=90, width=45)
    s = load_sample(
        path, _spec(image_size=32, norm="per-raster", norm_mean=None, norm_std=None)
    )
    assert s.image.shape == (1, 32, 32) and s.valid.shape == (1, 32, 32)
    assert np.isfinite(s.image).all()
    assert 0.2 < float((s.valid > 0.5).mean()) < 0.95  # the catchment outline survives
    assert (s.info.height, s.info.width) == (90, 45)


@pytest.mark.parametrize("norm", ["fixed", "per-raster"])
def test_norm_coefficients__many_rasters_at_once_as_one_by_one(norm):
    rng = np.random.default_rng(0)
    mean, std = rng.normal(500, 100, (6, 3)), rng.uniform(0, 50, (6, 3))
    std[2, 1] = 0.0  # a flat band
    fixed = norm == "fixed"
    spec = PreprocessSpec(
        image_size=32, in_chans=3, norm=norm,
        norm_mean=(1.0, 2.0, 3.0) if fixed else None,
        norm_std=(4.0, 5.0, 6.0) if fixed else None,
    )  # fmt: skip
    a, b = norm_coefficients(mean, std, spec)
    rows = [norm_coefficients(m, s, spec) for m, s in zip(mean, std, strict=True)]
    assert a.shape == b.shape == (6, 3) and a.dtype == b.dtype == np.float32
    assert np.array_equal(a, np.stack([r[0] for r in rows]))
    assert np.array_equal(b, np.stack([r[1] for r in rows]))


# ------------------------------------------------------------ terrain inputs
def _terrain(**kw) -> PreprocessSpec:
    base = dict(
        image_size=16, in_chans=1, norm="per-raster", scale="ground", trim=True,
        scale_stats=True, slope_channel=True,
    )  # fmt: skip
    base.update(kw)
    return PreprocessSpec(**base)


def test_preprocess__a_nodata_margin_changes_nothing(make_dem):
    """A catchment alone, and inside a margin of nodata half its size on every
    side: the same model input, extent and facts."""
    from catchment_mae.synth import dem_array
    from tests.conftest import dem_spec

    spec = dem_spec(height=40, width=60, pixel=30.0, seed=3)
    z = dem_array(spec)
    padded = np.full((80, 120), spec.nodata, np.float32)
    padded[20:60, 30:90] = z
    alone = make_dem("alone.tif", z, height=40, width=60, pixel=30.0)
    margin = make_dem("margin.tif", padded, height=80, width=120, pixel=30.0)
    a, b = load_sample(alone, _terrain()), load_sample(margin, _terrain())
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.valid, b.valid)
    np.testing.assert_array_equal(a.scale, b.scale)
    # Without trimming, the margin is part of the input and of the extent.
    c = load_sample(margin, _terrain(trim=False))
    assert not np.array_equal(a.image, c.image)
    assert c.scale[0] > a.scale[0] + 0.5


def test_preprocess__slope_channel_and_the_raster_s_facts(make_dem):
    """A plane rising 0.2 m per metre on 10 m pixels: the slope channel is
    (log10(0.2) + 1) / 0.7 wherever there is data; the scale vector holds the
    extents, then the valid share and the band's mean, std and log std."""
    xx = np.mgrid[0:32, 0:48][1].astype(np.float32)
    z = 500.0 + 0.2 * 10.0 * xx
    valid = np.ones((32, 48), bool)
    valid[:, :6] = False  # nodata on the left: trimmed
    valid[10:20, 20:30] = False  # a hole inside: kept
    path = make_dem("plane.tif", np.where(valid, z, -9999.0), height=32, width=48,
                    pixel=10.0)  # fmt: skip
    s = load_sample(path, _terrain())
    assert s.image.shape == (2, 16, 16)
    inside = s.valid[0] > 0.99
    expected = (math.log10(0.2) + 1.0) / 0.7
    np.testing.assert_allclose(s.image[1][inside], expected, atol=1e-3)
    np.testing.assert_allclose(s.image[1][s.valid[0] == 0], 0.0)
    kept = z[valid]
    share = valid[:, 6:].mean()
    np.testing.assert_allclose(
        s.scale,
        [math.log(320.0), math.log(420.0), math.log(share), kept.mean(), kept.std(),
         math.log(kept.std() + 1e-6)],
        rtol=1e-5,
    )  # fmt: skip
    # Normalising passes the slope channel as it is, with any norm.
    a, b = norm_coefficients(np.array([5.0]), np.array([2.0]), _terrain())
    assert a.tolist() == [1.0, 1.0] and b.tolist() == [0.0, 0.0]
    fixed = _terrain(norm="fixed", norm_mean=(1.0,), norm_std=(4.0,))
    a, b = norm_coefficients(np.array([5.0]), np.array([2.0]), fixed)
    assert a.tolist() == [0.5, 1.0] and b.tolist() == [1.0, 0.0]


def test_preprocess__slope_channel_needs_ground_and_says_so():
    with pytest.raises(ValueError, match=r"needs scale 'ground' \(slopes in metres\)"):
        _terrain(scale="pixels")
    s = _terrain()
    assert (s.channels, s.scale_dim) == (2, 6)
    assert (_terrain(in_chans=3, slope_channel=False).scale_dim) == 12
    assert PreprocessSpec(image_size=8, in_chans=2).scale_dim == 2  # format 1


def test_preprocess__slope_statistics_join_the_scale_vector(make_dem):
    """slope_stats: the mean and std of log10 of the ground slope at the
    resolution read, after the raster's facts; computed here from the DEM."""
    from catchment_mae.geomorph import slope, spacing_m
    from catchment_mae.preprocess import resample, trimmed
    from catchment_mae.raster import read_raster

    path = make_dem("d.tif", height=48, width=40, pixel=25.0, seed=4)
    spec = _terrain(slope_stats=True)
    assert spec.scale_dim == _terrain().scale_dim + 2 == 8
    r = read_raster(path)
    got = resample(r, spec).scale
    plain = resample(r, _terrain()).scale
    np.testing.assert_array_equal(got[:-2], plain)
    dy, dx = spacing_m(r)
    data, valid, _ = trimmed(r)  # as the slope channel sees the raster
    v = slope(data[0].astype(np.float64), valid, dy, dx, np.float64)
    logs = np.log10(np.maximum(v[np.isfinite(v)], 1e-4))
    np.testing.assert_allclose(got[-2:], [logs.mean(), logs.std()], rtol=1e-4)
    with pytest.raises(ValueError, match="slope_stats needs the slope channel"):
        _terrain(slope_stats=True, slope_channel=False)
