"""Streaming per-channel statistics and the directory scan."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from catchment_mae.errors import NoInputError
from catchment_mae.raster import find_tiffs, read_raster
from catchment_mae.stats import RunningStats, scan, scan_dir


def test_running_stats__merge_equals_numpy_over_everything():
    rng = np.random.default_rng(1)
    chunks = [rng.normal(3000, 200, (2, h, 9)) for h in (1, 5, 17, 40)]
    masks = [rng.random((c.shape[1], 9)) > 0.3 for c in chunks]
    rs = RunningStats()
    for c, m in zip(chunks, masks, strict=True):
        rs.update(c, m)
    allv = np.concatenate([c[:, m] for c, m in zip(chunks, masks, strict=True)], axis=1)
    np.testing.assert_allclose(rs.mean, allv.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(rs.std, allv.std(axis=1), rtol=1e-9)
    assert rs.count.tolist() == [allv.shape[1]] * 2


def test_running_stats__merge_many_equals_numpy_and_skips_empty_sets():
    rng = np.random.default_rng(2)
    sets = [rng.normal(3000, 200, (2, n)) for n in rng.integers(1, 400, 300)]
    n = np.array([s.shape[1] for s in sets] + [0])
    mean = np.stack([s.mean(axis=1) for s in sets] + [np.full(2, np.nan)])
    std = np.stack([s.std(axis=1) for s in sets] + [np.full(2, np.nan)])
    first = rng.normal(2900, 10, (2, 1, 5))
    rs = RunningStats()
    rs.update(first, np.ones((1, 5), bool))  # then added to what it holds
    rs.merge_many(n, mean, std)
    allv = np.concatenate([first[:, 0], *sets], axis=1)
    np.testing.assert_allclose(rs.mean, allv.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(rs.std, allv.std(axis=1), rtol=1e-9)
    assert rs.count.tolist() == [allv.shape[1]] * 2


def test_scan__matches_a_direct_computation_and_skips_bad_files(dem_dir, tmp_path):
    d = tmp_path / "in"
    shutil.copytree(dem_dir, d)
    (d / "zz_broken.tif").write_bytes(b"II*\x00garbage")
    result = scan(sorted(find_tiffs(d)))
    rasters = [read_raster(p) for p in sorted(find_tiffs(dem_dir))]
    vals = np.concatenate([r.data[:, r.valid] for r in rasters], axis=1).astype(float)
    assert result.mean == pytest.approx(vals.mean(axis=1).tolist(), rel=1e-9)
    assert result.std == pytest.approx(vals.std(axis=1).tolist(), rel=1e-6)
    assert len(result.files) == 12 and result.bands == 1
    assert [p for p, _ in result.failed] == [str(d / "zz_broken.tif")]


def test_scan__band_count_must_match(make_tiff, tmp_path):
    make_tiff("a.tif", np.ones((8, 8), np.uint8))
    make_tiff(
        "b.tif",
        np.ones((3, 8, 8), np.uint8),
        planarconfig="separate",
        photometric="minisblack",
    )
    result = scan_dir(tmp_path)  # the first good file sets the band count
    assert result.bands == 1 and len(result.files) == 1
    assert "has 3 band(s)" in result.failed[0][1]


def test_scan_dir__no_tiffs_and_all_bad(tmp_path):
    with pytest.raises(NoInputError, match="no .tif/.tiff files found"):
        scan_dir(tmp_path)
    (tmp_path / "x.tif").write_bytes(b"")
    with pytest.raises(
        NoInputError, match=r"none of the 1 TIFF file\(s\) could be used"
    ):
        scan_dir(tmp_path)


def test_scan__in_reader_processes_with_a_time_budget(tmp_path, dem_dir):
    """The same statistics in reader processes as in this one; a raster past its
    time budget is skipped with its reason, the pass goes on."""
    import tifffile

    for p in sorted(dem_dir.glob("*.tif"))[:4]:
        shutil.copy(p, tmp_path / p.name)
    inline = scan(sorted(tmp_path.glob("*.tif")))
    big = np.random.default_rng(0).normal(size=(5000, 5000)).astype(np.float32)
    tifffile.imwrite(tmp_path / "zz_big.tif", big)  # seconds to read and reduce
    del big
    pooled = scan(sorted(tmp_path.glob("*.tif")), workers=2, timeout=0.2)
    assert pooled.files == inline.files
    np.testing.assert_allclose(pooled.mean, inline.mean)
    np.testing.assert_allclose(pooled.std, inline.std)
    assert pooled.failed == [
        (str(tmp_path / "zz_big.tif"), "timed out after 0.2 s (the reader was stopped)")
    ]
