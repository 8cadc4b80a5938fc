"""``cmae embed-dir --tile``: chips of large scenes, one row each."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from catchment_mae.chips import grid
from catchment_mae.cli.main import cli
from catchment_mae.preprocess import load_sample, trimmed
from catchment_mae.raster import pixel_metres, read_raster
from catchment_mae.runtime import create_session, read_metadata, spec_from_metadata
from tests.conftest import dem_spec


def test_grid__edge_chips_shift_inside():
    assert grid(250, 96, 96) == [0, 96, 154]  # the last one ends at the edge
    assert grid(192, 96, 96) == [0, 96]
    assert grid(50, 96, 96) == [0]  # smaller than a tile: one chip, the raster
    assert grid(200, 100, 50) == [0, 50, 100]  # overlapping stride


@pytest.fixture
def scenes(tmp_path):
    """A UTM DEM of 200 x 300 px whose right third is nodata, and a broken file."""
    from catchment_mae.synth import dem_array, write_dem

    d = tmp_path / "scenes"
    d.mkdir()
    spec = dem_spec(height=200, width=300, pixel=10.0, seed=4)
    data = dem_array(spec)
    data[:, 200:] = spec.nodata
    write_dem(d / "big.tif", spec, data)
    (d / "broken.tif").write_bytes(b"II*\x00garbage")
    return d


def _embed(runner, scenes, model, out, *extra):
    args = ["embed-dir", str(scenes), "--model", str(model), "--out", str(out),
            "--tile", "100", "--json", *extra]  # fmt: skip
    r = runner.invoke(cli, args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_embed_dir_tile__one_row_per_chip(runner, scenes, onnx_model, tmp_path):
    out = tmp_path / "chips.parquet"
    summary = _embed(runner, scenes, onnx_model, out)
    # 2 x 3 chips; the right column is all nodata: skipped and counted.
    assert summary["embedded"] == 4 and summary["chips_skipped"] == 2
    again = runner.invoke(
        cli,
        [
            "embed-dir",
            str(scenes),
            "--model",
            str(onnx_model),
            "--out",
            str(tmp_path / "c2.parquet"),
            "--tile",
            "100",
        ],
    )
    assert "2 chip(s) left out (nodata above --max-nodata)" in again.stderr
    assert summary["failed"] == 1  # broken.tif: one row with its reason
    rows = pq.read_table(out).to_pylist()
    chips = [r for r in rows if r["path"] == "big.tif"]
    assert [(r["tile_row"], r["tile_col"]) for r in chips] == [
        (0, 0),
        (0, 1),
        (1, 0),
        (1, 1),
    ]
    assert [(r["x0"], r["y0"]) for r in chips] == [
        (0, 0),
        (100, 0),
        (0, 100),
        (100, 100),
    ]
    assert all((r["height"], r["width"]) == (200, 300) for r in chips)  # the raster's
    assert all((r["tile_height"], r["tile_width"]) == (100, 100) for r in chips)
    info = runner.invoke(cli, ["info", str(out), "--json"])
    assert json.loads(info.stdout)["chips"] == {
        "chips": 4, "rasters": 1, "min_per_raster": 4, "max_per_raster": 4,
        "median_per_raster": 4.0,
        "grid": {"tile": 100, "stride": 100, "unit": "px"},
    }  # fmt: skip
    assert (
        "chips:      4 of 1 raster(s), 4-4 per raster (median 4); 100 px every 100 px"
        in runner.invoke(cli, ["info", str(out)]).stdout
    )
    r = runner.invoke(cli, ["eval", str(out), "--labels", str(out)])
    assert r.exit_code == 1 and "a table of chips" in r.stderr
    broken = next(r for r in rows if r["path"] == "broken.tif")
    assert (
        broken["error"] and broken["tile_row"] is None and broken["embedding"] is None
    )
    # Each chip's embedding is the ONNX encoder on that chip, read on its own.
    sess = create_session(onnx_model, "cpu")
    spec = spec_from_metadata(read_metadata(sess, onnx_model))
    for r in chips:
        s = load_sample(scenes / "big.tif", spec, window=(r["x0"], r["y0"], 100, 100))
        feed = {"image": s.image[None], "scale": s.scale[None], "valid": s.valid[None]}
        (ref,) = sess.run(["embedding"], feed)
        np.testing.assert_allclose(r["embedding"], ref[0], atol=1e-5)


def test_embed_dir_tile__footprints_are_the_chips(runner, scenes, onnx_model, tmp_path):
    """On a UTM raster: each chip's centre lies inside its footprint, and
    neighbouring chips share their edge."""
    from pyproj import Transformer
    from shapely import wkb
    from shapely.geometry import Point

    out = tmp_path / "chips.parquet"
    _embed(runner, scenes, onnx_model, out)
    chips = {(r["tile_row"], r["tile_col"]): r for r in pq.read_table(out).to_pylist()
             if r["path"] == "big.tif"}  # fmt: skip
    spec = dem_spec(height=200, width=300, pixel=10.0, seed=4)
    to_lonlat = Transformer.from_crs(spec.epsg, 4326, always_xy=True)
    shapes = {k: wkb.loads(r["geometry"]) for k, r in chips.items()}
    for (i, j), r in chips.items():
        x = spec.origin[0] + (r["x0"] + 50) * 10.0
        y = spec.origin[1] - (r["y0"] + 50) * 10.0
        assert shapes[i, j].contains(Point(*to_lonlat.transform(x, y)))
    shared = shapes[0, 0].intersection(shapes[0, 1])
    assert shared.length > 0 and shared.area < 1e-12  # an edge, not an overlap
    assert shapes[0, 0].intersection(shapes[1, 0]).length > 0


def test_embed_dir_tile__resume_and_a_changed_raster(
    runner, scenes, onnx_model, tmp_path
):
    out = tmp_path / "chips.parquet"
    _embed(runner, scenes, onnx_model, out)
    before = pq.read_table(out)
    written = out.stat().st_mtime_ns
    again = _embed(runner, scenes, onnx_model, out)
    assert again["embedded"] == 0 and again["already_done"] == 1
    assert again["nothing_new"] and out.stat().st_mtime_ns == written  # not rewritten
    assert pq.read_table(out).equals(before)
    # The raster changes (smaller now): its chips are replaced, none left over.
    from catchment_mae.synth import write_dem

    write_dem(scenes / "big.tif", dem_spec(height=120, width=150, pixel=10.0, seed=5))
    third = _embed(runner, scenes, onnx_model, out)
    assert third["embedded"] == 4
    rows = [r for r in pq.read_table(out).to_pylist() if r["path"] == "big.tif"]
    assert [(r["x0"], r["y0"]) for r in rows] == [(0, 0), (50, 0), (0, 20), (50, 20)]
    # A table of whole rasters is not continued as chips (nor the other way).
    whole = tmp_path / "whole.parquet"
    r = runner.invoke(cli, ["embed-dir", str(scenes), "--model", str(onnx_model),
                            "--out", str(whole)])  # fmt: skip
    assert r.exit_code == 0  # broken.tif fails, big.tif is embedded
    r = runner.invoke(cli, ["embed-dir", str(scenes), "--model", str(onnx_model),
                            "--out", str(whole), "--tile", "100"])  # fmt: skip
    assert r.exit_code == 1 and "holds whole rasters, this run embeds chips" in r.stderr


def test_readme__chip_queries_run(runner, scenes, onnx_model, tmp_path):
    """The README's DuckDB block for chips, run as it stands there."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    _embed(runner, scenes, onnx_model, tmp_path / "chips.parquet")
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"<!-- test:read-chips -->\n```python\n(.*?)```", readme, re.S)
    assert block is not None
    r = subprocess.run([sys.executable, "-c", block.group(1)], cwd=tmp_path,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    nearest, per_raster = r.stdout.splitlines()
    assert nearest.count("'big.tif'") == 3
    assert per_raster == "[('big.tif', 40)]"


# ------------------------------------------------------------ training on chips
def test_chip_items__large_rasters_as_chips_others_whole(scenes, dem_dir):
    from catchment_mae.prepare import chip_items

    small = sorted(dem_dir.glob("*.tif"))[0]  # at most 96 px a side
    items = chip_items([scenes / "big.tif", small, scenes / "broken.tif"], 100)
    big = [w for p, w in items if p.name == "big.tif"]
    # 200 x 300 in 100 px chips: 2 rows of 3, each the chip's full-size window.
    assert big == [(x, y, 100, 100) for y in (0, 100) for x in (0, 100, 200)]
    assert (small, None) in items and (scenes / "broken.tif", None) in items
    overlapping = chip_items([scenes / "big.tif"], 100, stride=50)
    assert len(overlapping) == 3 * 5


def test_train_tile__a_sample_per_chip_nodata_chips_left_out(scenes, tmp_path):
    """The scene trains as its chips (its nodata third left out and counted),
    cached with their windows; each cached chip is the chip as read from the
    file, and a second run reads no chip again."""
    from catchment_mae.cache import FileKey, SampleCache
    from catchment_mae.data import CachedDataset, RasterDataset
    from catchment_mae.trainer import train
    from tests.conftest import TINY

    (scenes / "broken.tif").unlink()
    cfg = dict(
        TINY, input_dir=str(scenes), model_output_path=str(tmp_path / "m.pth"),
        max_epochs=1, tile=100, cache_dir=str(tmp_path / "cache"), val_fraction=0.0,
    )  # fmt: skip
    result = train(cfg, progress=False)
    assert (result.files, result.rasters, result.chips_skipped) == (4, 1, 2)
    assert "0 of 6 raster(s) and chip(s) reused" in result.cache
    spec = result.config.preprocess_spec()
    with SampleCache(tmp_path / "cache", spec) as cache:
        keys = [
            FileKey.of(scenes / "big.tif", (x, y, 100, 100))
            for y in (0, 100)
            for x in (0, 100)
        ]
        found = cache.lookup(keys)
        assert set(found) == set(keys)  # the four chips with valid pixels
        entries = [found[k] for k in keys]
        cached = CachedDataset(entries, spec, cache.where).__getitems__(range(4))
    read = RasterDataset([scenes / "big.tif"] * 4, spec, [k.window for k in keys])
    for i in range(len(keys)):
        item = read[i]
        assert np.array_equal(cached["z"][i].numpy(), item["z"])
        assert np.array_equal(cached["valid"][i].numpy(), item["valid"])
        # A chip's scale input is its own size on the ground (without its
        # border rows and columns of nodata), not the scene's.
        _, _, dy, dx = pixel_metres(scenes / "big.tif")
        _, _, (ky, kx) = trimmed(read_raster(scenes / "big.tif", window=keys[i].window))
        assert ky * kx < 1.0  # the catchment's outline leaves a margin
        extent = np.log([100 * dy * ky, 100 * dx * kx])
        assert np.allclose(item["scale"][:2], extent, atol=1e-4)
    # The nodata chips are known too: a second run reads no chip (it read
    # those two again, every run).
    again = train(cfg, progress=False, overwrite=True)
    assert "6 of 6 raster(s) and chip(s) reused, 0 read now" in again.cache
    assert (again.files, again.chips_skipped) == (4, 2)


def test_split_items__a_rasters_chips_stay_on_one_side(tmp_path):
    from catchment_mae.train_data import split_items

    paths = [tmp_path / f"r{i}.tif" for i in range(20) for _ in range(i % 4 + 1)]
    train_idx, val_idx = split_items(paths, 0.25, seed=3)
    assert sorted(train_idx + val_idx) == list(range(len(paths)))
    assert val_idx and not {paths[i] for i in train_idx} & {paths[i] for i in val_idx}
    assert 0.25 * len(paths) <= len(val_idx) <= 0.375 * len(paths)  # of the samples
    # One scene of 1,000 chips among nine small rasters is never the whole
    # validation set, and one raster alone has no validation.
    for seed in range(5):
        lop = [tmp_path / "scene.tif"] * 1000 + [
            tmp_path / f"s{i}.tif" for i in range(9)
        ]
        train_idx, val_idx = split_items(lop, 0.1, seed)
        assert len(train_idx) > len(val_idx) and len(val_idx) <= 150
    assert split_items([tmp_path / "scene.tif"] * 50, 0.1, 0) == (list(range(50)), [])


def test_cli_train_tile__counts_and_refusals(runner, scenes, tmp_path):
    from tests.conftest import cli_train

    r = cli_train(runner, tmp_path, scenes, "--tile", "100", "--max-nodata", "0.2",
               "--json", "--no-cache")  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    # broken.tif is skipped with its reason; the nodata third and the chips
    # half nodata at the border are left out and counted.
    assert summary["skipped"] == 1 and summary["rasters"] == 1
    assert summary["files"] + summary["chips_skipped"] == 6
    assert summary["chips_skipped"] >= 2
    r = cli_train(runner, tmp_path, scenes, "--stride", "50", out="n.pth")
    assert r.exit_code == 1
    assert "tile_stride (--stride) needs tile (--tile)" in r.output


def test_embed_dir_tile_m__chips_in_ground_metres(runner, scenes, onnx_model, tmp_path):
    """1,000 m on a 10 m DEM are the 100 px chips of --tile 100; a raster without
    georeferencing gets a row saying why; another grid on the same table is
    refused, naming both."""
    import tifffile

    tifffile.imwrite(scenes / "plain.tif", np.ones((50, 50), np.float32))
    by_px = tmp_path / "px.parquet"
    by_m = tmp_path / "m.parquet"
    _embed(runner, scenes, onnx_model, by_px)
    args = ["embed-dir", str(scenes), "--model", str(onnx_model), "--out", str(by_m),
            "--tile-m", "1000", "--json"]  # fmt: skip
    r = runner.invoke(cli, args)
    assert r.exit_code == 0, r.output
    px = {(r["path"], r["x0"], r["y0"]): r for r in pq.read_table(by_px).to_pylist()}
    m = {(r["path"], r["x0"], r["y0"]): r for r in pq.read_table(by_m).to_pylist()}
    big = sorted(k for k in m if k[0] == "big.tif")
    assert big and big == sorted(k for k in px if k[0] == "big.tif")
    for k in big:
        assert (m[k]["tile_width"], m[k]["tile_height"]) == (100, 100)
        np.testing.assert_allclose(m[k]["embedding"], px[k]["embedding"], atol=1e-6)
    plain = m["plain.tif", None, None]
    assert plain["embedding"] is None
    assert "no usable georeferencing (needed for sizes in metres)" in plain["error"]
    meta = pq.read_schema(by_m).metadata
    assert json.loads(meta[b"chip_grid"]) == {"tile": 1000.0, "stride": 1000.0,
                                              "unit": "m"}  # fmt: skip
    r = runner.invoke(cli, [*args[:-1], "--stride-m", "500"])
    assert r.exit_code == 1
    assert "holds chips of 1000 m every 1000 m, this run cuts 1000 m every 500 m" in (
        r.output
    )
    r = runner.invoke(cli, [*args, "--tile", "100"])
    assert r.exit_code == 2 and "choose one" in r.output
    whole = ["embed-dir", str(scenes), "--model", str(onnx_model), "--out",
             str(tmp_path / "w.parquet"), "--max-nodata", "0.5"]  # fmt: skip
    r = runner.invoke(cli, whole)  # it was accepted, and did nothing
    assert r.exit_code == 2 and "--max-nodata needs --tile or --tile-m" in r.output


def test_train_tile__an_outlier_scene_is_named_once(dem_dir, tmp_path, caplog):
    """A mis-scaled scene among ordinary DEMs: each of its chips is left out (and
    listed with its window), one warning names the scene."""
    import shutil

    from catchment_mae.synth import dem_array, write_dem
    from catchment_mae.trainer import train
    from tests.conftest import TINY

    data = tmp_path / "d"
    shutil.copytree(dem_dir, data)
    spec = dem_spec(height=200, width=300, pixel=10.0, seed=4)
    spec = dataclasses.replace(spec, dtype="float32")
    write_dem(data / "scaled.tif", spec, dem_array(spec).astype(np.float32) * 1e15)
    cfg = dict(
        TINY, input_dir=str(data), model_output_path=str(tmp_path / "m.pth"),
        max_epochs=1, tile=100, cache=False, val_fraction=0.0,
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="catchment_mae"):
        result = train(cfg, progress=False)
    scaled = [(p, r) for p, r in result.skipped if "scaled.tif" in p]
    assert len(scaled) == 6 and all("(chip at x " in p for p, _ in scaled)
    lines = [r.getMessage() for r in caplog.records if "scaled.tif" in r.getMessage()]
    assert len(lines) == 1, lines
    assert result.files == 12  # the ordinary DEMs, whole


def test_chips_in_metres__too_few_pixels_is_a_row_saying_so(scenes):
    from catchment_mae.chips import chips

    (got,) = chips(["big.tif"], scenes, 50.0, 50.0, metres=True)  # 5 px of 10 m
    assert got[1].error.startswith("a 50 m chip is 5x5 of its pixels")
    assert len(list(chips(["big.tif"], scenes, 1000.0, 500.0, metres=True))) == 3 * 5


def test_outlier_screen__a_scene_of_flat_sea_chips_keeps_its_land():
    """60 flat chips (sea stored as 0) and 40 land chips of one scene, beside
    five DEMs: chip by chip, every land chip looked far from the flat median;
    pooled per raster, nothing is left out."""
    from pathlib import Path

    from catchment_mae.stats import ScanResult

    r = ScanResult()
    scene = Path("scene.tif")
    r.files = [scene] * 100 + [Path(f"s{i}.tif") for i in range(5)]
    flat, land = (100, np.zeros(1), np.zeros(1)), (100, np.full(1, 500.0), np.ones(1))
    r.per_file = [flat] * 60 + [land] * 40 + [(100, np.full(1, 400.0), np.ones(1))] * 5
    assert not r.finish().any()
    r.per_file[-1] = (100, np.full(1, 4e15), np.ones(1))  # a mis-scaled DEM still is
    assert r.finish().tolist() == [False] * 104 + [True]


def test_embed_dir_tile__interrupted_mid_raster_resumes_every_chip(
    scenes, onnx_model, tmp_path
):
    """Ctrl-C while a raster's chips are being embedded saves none of them: a
    table holding some of its chips would count the raster done, and the run
    that continues it would never embed the rest."""
    from catchment_mae.batch.runner import EmbedInterrupted, embed_dir

    whole = tmp_path / "whole.parquet"
    first = embed_dir(scenes, onnx_model, whole, tile=50, num_workers=0)
    assert first.embedded > 5
    seen = []

    def stop_at_the_fifth_chip(item):
        seen.append(item)
        if len(seen) == 5:
            raise KeyboardInterrupt

    out = tmp_path / "resumed.parquet"
    with pytest.raises(EmbedInterrupted, match="0 raster"):
        embed_dir(scenes, onnx_model, out, tile=50, num_workers=0, rows_per_part=1,
                  on_item=stop_at_the_fifth_chip)  # fmt: skip
    summary = embed_dir(scenes, onnx_model, out, tile=50, num_workers=0)
    assert summary.already_done == 0 and summary.embedded == first.embedded
    assert (
        pq.read_table(out)
        .drop_columns(["mtime"])
        .equals(pq.read_table(whole).drop_columns(["mtime"]))
    )


def test_embed_dir_tile__a_scene_of_nodata_alone_still_lets_a_rerun_be_nothing_new(
    runner, scenes, onnx_model, tmp_path
):
    """A raster whose chips are all skipped has no row: a finished job run again
    never said 'nothing new' (and rewrote its table); its rows count said one
    per raster, not per chip."""
    from catchment_mae.synth import dem_array, write_dem

    spec = dem_spec(height=200, width=200, pixel=10.0, seed=6)
    write_dem(scenes / "void.tif", spec, np.full_like(dem_array(spec), spec.nodata))
    out = tmp_path / "chips.parquet"
    first = _embed(runner, scenes, onnx_model, out)
    assert first["chips_skipped"] == 2 + 4
    written = out.stat().st_mtime_ns
    again = _embed(runner, scenes, onnx_model, out)
    assert again["nothing_new"] and out.stat().st_mtime_ns == written
    assert again["rows"] == pq.read_table(out).num_rows == first["rows"]


def test_ray_chip_rows__a_name_that_is_not_utf8_completes_its_raster():
    """--ray --tile holds a raster's chip rows until all are in, counted by the
    name as listed; the rows hold it escaped (KeyError: 'bad\\\\xff.tif')."""
    import os

    from catchment_mae.batch.ray_runner import _Rasters
    from catchment_mae.batch.schema import Row
    from catchment_mae.chips import chip_grid

    name = os.fsdecode(b"bad\xff.tif")
    grid = chip_grid(200, 100, 100, 100)
    rasters = _Rasters([(name, chip) for chip in grid])
    first = rasters.complete(Row(name), None, grid[0])
    last = rasters.complete(Row(name), None, grid[1])
    assert first == [] and [r.path for r, _, _ in last] == ["bad\\xff.tif"] * 2
