"""The synthetic catchment DEMs: realistic enough to train on and test with."""

from __future__ import annotations

import numpy as np

from catchment_mae.raster import read_raster
from catchment_mae.synth import generate_dems


def test_generate_dems__georeferenced_catchments_of_varied_size(tmp_path):
    paths = generate_dems(tmp_path, 10, min_size=24, max_size=200, seed=3)
    assert [p.name for p in paths] == [f"catchment_{i:04d}.tif" for i in range(10)]
    sizes, dtypes = set(), set()
    for p in paths:
        r = read_raster(p)
        h, w = r.data.shape[1:]
        assert 24 <= h <= 200 and 24 <= w <= 200
        sizes.add((h, w))
        dtypes.add(r.info.dtype)
        assert 0.2 < r.valid.mean() < 0.98  # nodata outside the outline
        assert not r.valid[0, 0] and r.valid[h // 2, w // 2]
        assert (
            r.info.geo.crs.startswith("EPSG:32") and r.info.geo.crs_kind == "projected"
        )
        assert r.info.geo.pixel_size[0] in (5.0, 10.0, 30.0, 90.0)
        elev = r.data[0, r.valid]
        assert 50 < elev.min() < elev.max() < 6000  # metres, with relief
    assert len(sizes) == 10 and dtypes == {"int16", "float32"}


def test_generate_dems__same_seed_same_files(tmp_path):
    a = generate_dems(tmp_path / "a", 3, seed=5)
    b = generate_dems(tmp_path / "b", 3, seed=5)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(read_raster(x).data, read_raster(y).data)


def test_generate_multiband__any_band_count(tmp_path):
    from catchment_mae.synth import generate_multiband

    for bands in (1, 4):
        paths = generate_multiband(tmp_path / str(bands), 2, bands, seed=2)
        for p in paths:
            r = read_raster(p)
            assert r.data.shape[0] == bands and r.valid.any() and r.info.geo.epsg
