"""``cmae stats``: per-channel figures, bad files, JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from catchment_mae.cli.main import cli
from catchment_mae.raster import read_raster


def test_stats__json_matches_numpy(runner, make_tiff, tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(100, 10, (3, 20, 30)).astype(np.float32)
    b = rng.normal(300, 5, (3, 15, 10)).astype(np.float32)
    b[:, 0, 0] = np.nan  # nodata in one band masks the pixel in all
    make_tiff("a.tif", a, planarconfig="separate", photometric="minisblack")
    make_tiff("sub/b.TIFF", b, planarconfig="separate", photometric="minisblack")
    result = runner.invoke(cli, ["stats", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    vals = np.concatenate([a.reshape(3, -1), b.reshape(3, -1)[:, 1:]], axis=1).astype(
        np.float64
    )
    assert out["files"] == 2 and out["failed"] == 0 and out["bands"] == 3
    assert out["mean"] == pytest.approx(vals.mean(axis=1).tolist(), rel=1e-9)
    assert out["std"] == pytest.approx(vals.std(axis=1).tolist(), rel=1e-6)
    assert out["valid_pixels"] == [vals.shape[1]] * 3


def test_stats__bands_and_human_output(runner, make_tiff, tmp_path):
    data = np.stack([np.full((4, 4), v, np.uint16) for v in (1, 2, 3)])
    make_tiff("x.tif", data, planarconfig="separate", photometric="minisblack")
    result = runner.invoke(cli, ["stats", str(tmp_path), "--bands", "3,1"])
    assert result.exit_code == 0
    assert "band 1: mean 3" in result.stdout and "band 2: mean 1" in result.stdout
    # A flat band has std 0; the suggestion uses 1 there, as cmae train does.
    assert "std 0 " in result.stdout
    assert "--norm-mean 3,1 --norm-std 1,1" in result.stdout


def test_stats__real_files_skip_the_broken_ones(runner, real_dir, tmp_path):
    import shutil

    dem_name = "rioxarray_small_dem_3m_merged.tif"
    for name in [dem_name, "rasterio_corrupt.tif", "rioxarray_cint16.tif"]:
        shutil.copy(real_dir / name, tmp_path / name)
    # At full resolution (a model input larger than the files): the damaged
    # JPEG's own image (its overviews read well, as a 64 px model reads them).
    full = ["--image-size", "600"]
    result = runner.invoke(cli, ["stats", str(tmp_path), "--json", *full])
    assert result.exit_code == 0
    out = json.loads(result.stdout)
    assert out["files"] == 1 and out["failed"] == 2
    dem = read_raster(tmp_path / dem_name)
    assert out["mean"][0] == pytest.approx(
        float(dem.data[0, dem.valid].mean()), rel=1e-6
    )
    assert "rasterio_corrupt.tif: cannot decode TIFF" in result.stderr
    assert "rioxarray_cint16.tif: complex data" in result.stderr
    strict = runner.invoke(cli, ["stats", str(tmp_path), "--strict", *full])
    assert strict.exit_code == 1 and "(--strict)" in strict.stderr


def test_stats__errors(runner, tmp_path):
    result = runner.invoke(cli, ["stats", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert (
        result.stderr.strip()
        == f"cmae: error: {tmp_path / 'nope'}: input directory does not exist"
    )
    (tmp_path / "bad.tif").write_bytes(b"")
    result = runner.invoke(cli, ["stats", str(tmp_path)])
    assert (
        result.exit_code == 1
        and "none of the 1 TIFF file(s) could be used" in result.stderr
    )


def test_stats__one_raster_cannot_decide_the_statistics(runner, tmp_path, dem_dir):
    import shutil

    import numpy as np
    import tifffile

    d = tmp_path / "d"
    shutil.copytree(dem_dir, d)
    calm = runner.invoke(cli, ["stats", str(d), "--json"])
    odd = np.random.default_rng(0).uniform(-6.5e15, 2.6e16, (216, 432))
    tifffile.imwrite(d / "odd.tif", odd)
    result = runner.invoke(cli, ["stats", str(d), "--json"])
    assert result.exit_code == 0
    out, before = json.loads(result.stdout), json.loads(calm.stdout)
    assert out["mean"] == pytest.approx(before["mean"])  # as if it were not there
    assert out["std"] == pytest.approx(before["std"])
    assert [o["path"] for o in out["outliers"]] == [str(d / "odd.tif")]
    assert "far outside the rest of the data" in result.stderr
    assert abs(out["median_mean"][0]) < 1e5 and out["median_std"][0] < 1e5
    text = runner.invoke(cli, ["stats", str(d)])
    assert "1 raster(s) left out as far outside the rest" in text.stdout


def test_stats__reads_the_pixels_training_reads(runner, tmp_path):
    """A raster with overviews: cmae stats gives the figures training computes
    (the overview of at least the model's size, not the full image)."""
    from catchment_mae.preprocess import load_resampled
    from catchment_mae.spec import PreprocessSpec

    path = tmp_path / "cog.tif"
    with tifffile.TiffWriter(path) as tw:
        for level, size in enumerate((256, 128, 32)):
            tw.write(
                np.full((size, size), 10.0 * (level + 1), np.float32),
                photometric="minisblack",
                tile=(32, 32),
                subfiletype=1 if level else 0,
            )
    for size in (64, 200):
        result = runner.invoke(cli, ["stats", str(tmp_path), "--image-size",
                                     str(size), "--json"])  # fmt: skip
        assert result.exit_code == 0, result.output
        spec = PreprocessSpec(image_size=size, in_chans=1, norm="per-raster")
        trained = load_resampled(path, spec)
        assert json.loads(result.stdout)["mean"] == pytest.approx(trained.mean.tolist())
    default = runner.invoke(cli, ["stats", str(tmp_path), "--json"])
    assert json.loads(default.stdout)["mean"] == pytest.approx([20.0])  # 128 px
