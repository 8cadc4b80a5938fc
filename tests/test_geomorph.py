"""Terrain numbers by hand: attributes with known answers, baseline features."""

from __future__ import annotations

import math

import numpy as np
import pytest

from catchment_mae import geomorph
from catchment_mae.raster import GeoInfo, Raster, RasterInfo


def _raster(z, valid, pixel_m=10.0):
    h, w = z.shape
    geo = GeoInfo(
        crs="EPSG:32633", epsg=32633, crs_kind="projected", linear_unit_m=1.0,
        pixel_size=(pixel_m, pixel_m), bounds=(0.0, 0.0, w * pixel_m, h * pixel_m),
        transform=(0.0, pixel_m, 0.0, h * pixel_m, 0.0, -pixel_m),
    )  # fmt: skip
    info = RasterInfo("plane.tif", h, w, 1, "float32", None, h, w, geo=geo)
    return Raster(z[None].astype(np.float32), valid, info)


def test_attributes__a_tilted_plane_and_a_disc():
    yy, xx = np.mgrid[0:101, 0:101].astype(float)
    z = 100.0 + 0.2 * xx * 10.0  # 0.2 m/m on 10 m pixels
    disc = np.hypot(yy - 50, xx - 50) <= 50
    a = geomorph.attributes(z, disc, 10.0, 10.0, outlet=(50, 0))  # outlet on the rim
    assert a["mean_slope"] == pytest.approx(0.2, rel=1e-6)
    assert a["log10_slope"] == pytest.approx(math.log10(0.2), rel=1e-6)
    assert 10 ** a["log10_area_km2"] == pytest.approx(math.pi * 0.5**2, rel=0.02)
    assert a["relief"] == pytest.approx(200.0)  # 100 columns of 2 m
    assert a["mean_elevation"] == pytest.approx(200.0, rel=1e-3)
    assert a["hypsometric_integral"] == pytest.approx(0.5, abs=1e-3)
    assert a["elongation"] == pytest.approx(1.0, abs=0.02)  # a disc from its rim
    strip = np.zeros_like(disc)
    strip[45:55, :] = True  # 10 x 101 pixels, measured from one end
    assert geomorph.attributes(z, strip, 10.0, 10.0, outlet=(50, 0))[
        "elongation"
    ] == pytest.approx(2 * math.sqrt(10 * 101 / math.pi) / 100, rel=0.02)


def test_handmade_features__slopes_on_the_ground_and_size():
    yy, xx = np.mgrid[0:40, 0:60].astype(float)
    valid = np.ones((40, 60), bool)
    valid[:5] = False
    coarse = geomorph.handmade_features(_raster(0.3 * xx * 30.0, valid, pixel_m=30.0))
    fine = geomorph.handmade_features(_raster(0.3 * xx * 5.0, valid, pixel_m=5.0))
    names = list(geomorph.FEATURES)
    assert len(names) == len(coarse) == 24
    hist = [names.index(n) for n in names if n.startswith("slope_hist_")]
    assert coarse[hist].sum() == pytest.approx(1.0)
    # The same slope on other pixels: the same histogram, another pixel size.
    np.testing.assert_allclose(coarse[hist], fine[hist])
    assert coarse[names.index("log_pixel_m")] == pytest.approx(math.log(30.0))
    assert coarse[names.index("log_valid_pixels")] == pytest.approx(math.log(35 * 60))
    assert coarse[names.index("log_height_px")] == pytest.approx(math.log(35))


def test_slope__strips_give_the_whole_raster_s_gradient(monkeypatch):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(53, 40)).cumsum(axis=0) * 10.0
    valid = rng.random((53, 40)) > 0.1
    zz = np.where(valid, z, np.nan)
    gy, gx = np.gradient(zz, 5.0, 7.0)
    whole = np.hypot(gy, gx)
    monkeypatch.setattr(geomorph, "SLOPE_STRIP_ROWS", 8)  # 7 strips, halos between
    np.testing.assert_allclose(geomorph.slope(z, valid, 5.0, 7.0), whole)
    narrow = geomorph.slope(z, valid, 5.0, 7.0, np.float32)
    assert narrow.dtype == np.float32
    np.testing.assert_allclose(narrow, whole, rtol=1e-5)
