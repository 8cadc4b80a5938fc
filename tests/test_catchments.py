"""The real-terrain benchmark: catchments delineated from a real DEM."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from catchment_mae.cli.main import cli
from catchment_mae.raster import read_raster
from tests.conftest import DATA

pytest.importorskip("pyflwdir", reason="delineation needs the catchments extra")

DEM = DATA / "flowdem_dem.tif"  # SRTM, ~31 m, MIT (tests/data/README.md)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    src = tmp_path_factory.mktemp("dems")
    (src / DEM.name).symlink_to(DEM)
    out = src / "bench"  # inside the source folder: never read back as a DEM
    from catchment_mae.catchments import write_catchment_benchmark

    rows, skipped = write_catchment_benchmark(src, out, per_dem=6, min_cells=100)
    assert skipped == []
    return out, rows


def test_catchments__outlines_attributes_and_copies(bench):
    out, rows = bench
    with open(out / "labels.csv") as f:
        assert [dict(r) for r in csv.DictReader(f)] == [
            {k: str(v) for k, v in r.items()} for r in rows
        ]
    originals = [r for r in rows if r["copy_of"] == ""]
    assert 3 <= len(originals) <= 6
    areas = sorted(r["log10_area_km2"] for r in originals)
    assert areas[-1] - areas[0] > math.log10(4)  # spread over sizes
    src = read_raster(DEM)
    pixel_m2 = None
    for r in originals:
        c = read_raster(out / r["path"])
        assert c.info.geo.crs == "EPSG:4326"
        assert 0.0 < c.valid.mean() < 1.0  # nodata outside the outline
        # Every valid pixel is the source DEM's pixel at the same place.
        _, a, _, f, _, e = c.info.geo.transform
        x0 = round((c.info.geo.transform[0] - src.info.geo.transform[0]) / a)
        y0 = round((f - src.info.geo.transform[3]) / e)
        h, w = c.data.shape[1:]
        window = src.data[0, y0 : y0 + h, x0 : x0 + w]
        np.testing.assert_array_equal(c.data[0][c.valid], window[c.valid])
        assert c.valid[0].any() and c.valid[-1].any()  # its bounding box
        assert c.valid[:, 0].any() and c.valid[:, -1].any()
        # The attributes are on the ground: ~31 m pixels at 24 degrees south.
        vals = c.data[0][c.valid]
        assert r["relief"] == pytest.approx(float(vals.max() - vals.min()), abs=1e-3)
        pixel_m2 = 10 ** r["log10_area_km2"] * 1e6 / c.valid.sum()
        assert 25.0**2 < pixel_m2 < 32.0**2
        assert 0 < r["mean_slope"] < 1 and 0 < r["hypsometric_integral"] < 1
        assert r["group"].startswith("flowdem_dem.tif:") and r["dem"] == DEM.name
    copies = [r for r in rows if r["copy_of"]]
    assert copies, "the larger catchments have coarser copies"
    for r in copies:
        k = int(r["path"].rsplit("_x", 1)[1].split(".")[0])
        orig = next(o for o in originals if o["path"] == r["copy_of"])
        assert {key: r[key] for key in ("group", "mean_slope", "relief")} == {
            key: orig[key] for key in ("group", "mean_slope", "relief")
        }  # the same land
        assert r["log10_resolution_m"] == pytest.approx(
            orig["log10_resolution_m"] + math.log10(k)
        )
        a, b = read_raster(out / r["path"]), read_raster(out / orig["path"])
        assert a.info.height == b.info.height // k
        assert a.info.geo.transform[1] == pytest.approx(b.info.geo.transform[1] * k)


def test_cli_synth_catchments_then_eval_with_baseline(runner, bench, tmp_path):
    """eval scores the hand-made baseline beside an embedding (a fake one here:
    the figures of six catchments say little; the plumbing is what is tested)."""
    from tests.conftest import write_table

    out, rows = bench
    rng = np.random.default_rng(0)
    x = np.column_stack(
        [[r["log10_area_km2"] for r in rows], rng.normal(size=(len(rows), 3))]
    )
    table = write_table(tmp_path / "t.parquet", [r["path"] for r in rows], x)
    r = runner.invoke(cli, [
        "eval", str(table), "--labels", str(out / "labels.csv"), "--within", "dem",
        "--baseline", "--rasters", str(out), "--folds", "2", "--json", "--no-report",
    ])  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    originals = sum(1 for row in rows if row["copy_of"] == "")
    assert res["labels"]["log10_area_km2"]["rows"] == originals  # copies left out
    assert res["baseline"]["unreadable"] == 0
    # The baseline's figures are those of the features computed from the rasters.
    from catchment_mae import evaluate as ev

    joined = ev.join(ev.read_embeddings(table), ev.read_labels(out / "labels.csv"))
    features, problems = ev.handmade_vectors(joined.paths, out)
    assert problems == [] and features.shape == (len(rows), 24)
    direct = ev.evaluate(joined.with_vectors(features), folds=2, within="dem")
    assert res["baseline"]["labels"]["relief"]["r2"] == direct["labels"]["relief"]["r2"]
    assert res["labels"]["relief"]["r2"] != direct["labels"]["relief"]["r2"]
    assert res["copies"]["rows"] == len(rows) - originals
    assert "r2_within" in res["labels"]["mean_slope"]
    text = runner.invoke(cli, [
        "eval", str(table), "--labels", str(out / "labels.csv"), "--baseline",
        "--rasters", str(out), "--folds", "2", "--no-report",
    ])  # fmt: skip
    assert text.exit_code == 0 and "embedding/baseline" in text.stdout
    assert "copies: nearest original is its own" in text.stdout
    no_root = runner.invoke(cli, [
        "eval", str(table), "--labels", str(out / "labels.csv"), "--baseline",
    ])  # fmt: skip
    assert no_root.exit_code == 2 and "--rasters" in no_root.stderr


def test_synth_windows__squares_of_the_dem_with_their_copies(runner, tmp_path):
    src = tmp_path / "dems"
    src.mkdir()
    (src / DEM.name).symlink_to(DEM)
    out = tmp_path / "windows"
    r = runner.invoke(cli, ["synth", str(out), "--windows-of", str(src), "--per-dem",
                            "4", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    with open(out / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    originals = [row for row in rows if row["copy_of"] == ""]
    groups = {row["group"] for row in rows}
    assert 1 <= len(originals) == len(groups) <= 4  # as many as fit, apart
    src_raster = read_raster(DEM)
    taken = np.zeros(src_raster.valid.shape, int)
    for row in originals:
        w = read_raster(out / row["path"])
        h, wd = w.data.shape[1:]
        assert h == wd and 64 <= h <= 97  # square, within the DEM's 97 px
        assert w.valid.mean() >= 0.5
        _, a, _, f, _, e = w.info.geo.transform
        x0 = round((w.info.geo.transform[0] - src_raster.info.geo.transform[0]) / a)
        y0 = round((f - src_raster.info.geo.transform[3]) / e)
        window = src_raster.data[0, y0 : y0 + h, x0 : x0 + wd]
        np.testing.assert_array_equal(w.data[0][w.valid], window[w.valid])
        taken[y0 : y0 + h, x0 : x0 + wd] += 1
        assert float(row["relief"]) == pytest.approx(
            float(w.data[0][w.valid].max() - w.data[0][w.valid].min()), abs=1e-3
        )
    assert taken.max() == 1  # no pixel in two windows
    copies = [row for row in rows if row["copy_of"]]
    assert copies and all(c["copy_of"].endswith("_x1.tif") for c in copies)
    both = runner.invoke(cli, ["synth", str(out), "--windows-of", str(src),
                               "--catchments-of", str(src)])  # fmt: skip
    assert both.exit_code == 2 and "exclude each other" in both.output
