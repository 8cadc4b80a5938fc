"""The embeddings table as users read it: pandas, geopandas, DuckDB; cmae info."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import duckdb
import geopandas
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import shapely
from pyproj import CRS, Transformer

from catchment_mae.batch.runner import embed_dir
from catchment_mae.cli.main import cli
from catchment_mae.demo import nearest_neighbours
from catchment_mae.raster import read_raster
from tests.conftest import REPO


@pytest.fixture(scope="module")
def table(tmp_path_factory, dem_dir, real_dir, onnx_model):
    """Generated DEMs (random UTM zones, both hemispheres), a real DEM in
    EPSG:4326, a raster without georeferencing (a model of ground extents cannot
    embed it: a row with its reason), and a file that fails."""
    d = tmp_path_factory.mktemp("geo_archive")
    for p in sorted(dem_dir.glob("*.tif")):
        shutil.copy(p, d / p.name)
    shutil.copy(real_dir / "torchgeo_mmflood_dem.tif", d / "dem_4326.tif")
    shutil.copy(real_dir / "imagetiff_int16_zstd.tif", d / "no_geo.tif")
    (d / "empty.tif").write_bytes(b"")
    out = d.parent / "geo_emb" / "embeddings.parquet"
    summary = embed_dir(d, onnx_model, out, num_workers=0)
    assert (summary.embedded, summary.failed) == (13, 2)
    return d, out


def test_table__geopandas_reads_footprints_in_crs84(table):
    archive, out = table
    gdf = geopandas.read_parquet(out)
    assert isinstance(gdf, geopandas.GeoDataFrame)
    assert gdf.crs == CRS("OGC:CRS84") and gdf.geometry.name == "geometry"
    rows = gdf.set_index("path")
    boxes = pd.read_parquet(out, columns=["path", "bbox"]).set_index("path")["bbox"]
    assert rows.geometry.notna().sum() == 13
    for name in ("no_geo.tif", "empty.tif"):
        assert rows.loc[name, "geometry"] is None and pd.isna(rows.loc[name, "crs"])
    zones = set()
    for path, row in rows.iterrows():
        if row.geometry is None:
            continue
        info = read_raster(archive / path).info
        assert row.crs == info.geo.crs and row.pixel_size_x > 0
        # The native centre, reprojected on its own, lies inside the footprint.
        minx, miny, maxx, maxy = info.geo.bounds
        to_lonlat = Transformer.from_crs(row.crs, "OGC:CRS84", always_xy=True)
        centre = shapely.Point(
            to_lonlat.transform((minx + maxx) / 2, (miny + maxy) / 2)
        )
        assert row.geometry.contains(centre), path
        assert [boxes[path][k] for k in ("xmin", "ymin", "xmax", "ymax")] == (
            pytest.approx(row.geometry.bounds)
        )
        zones.add(row.crs)
    assert len(zones) >= 5  # an archive that mixes UTM zones (and EPSG:4326)
    geo = json.loads(pq.read_schema(out).metadata[b"geo"])
    box = geo["columns"]["geometry"]["bbox"]
    assert box == pytest.approx(list(gdf.total_bounds))


def test_table__pandas_and_duckdb_nearest_neighbour(table):
    _, out = table
    df = pd.read_parquet(out)
    ok = df[df["error"].isna()].sort_values("path")
    vectors = np.stack(ok["embedding"].to_numpy()).astype(np.float64)
    assert vectors.shape == (13, 40) and np.isfinite(vectors).all()
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cos = unit @ unit[0]
    expected = [ok["path"].iloc[i] for i in np.argsort(-cos)[1:4]]
    got = duckdb.sql(
        f"""WITH t AS (SELECT path, embedding::FLOAT[40] AS e FROM '{out}'
                       WHERE error IS NULL),
                 q AS (SELECT path, e FROM t ORDER BY path LIMIT 1)
            SELECT t.path, array_cosine_similarity(t.e, q.e) AS c
            FROM t, q WHERE t.path <> q.path ORDER BY c DESC LIMIT 3"""
    ).fetchall()
    assert [p for p, _ in got] == expected
    np.testing.assert_allclose([c for _, c in got], np.sort(cos)[::-1][1:4], atol=1e-5)
    # The bbox covering filters by area with no spatial extension.
    north = duckdb.sql(f"SELECT count(*) FROM '{out}' WHERE bbox.ymin > 0").fetchall()[
        0
    ]
    gdf = geopandas.read_parquet(out)
    assert north[0] == int((gdf.geometry.bounds["miny"] > 0).sum())
    # The demo's printout: the same query, raw or on centred embeddings.
    first = nearest_neighbours(out, count=1, centre=False)[0]
    assert first["query"]["path"] == ok["path"].iloc[0]
    assert first["nearest"]["path"] == expected[0]
    centred = vectors - vectors.mean(axis=0)
    centred /= np.linalg.norm(centred, axis=1, keepdims=True)
    j = int(np.argsort(-(centred @ centred[0]))[1])
    first = nearest_neighbours(out, count=1)[0]
    assert first["nearest"]["path"] == ok["path"].iloc[j]
    assert first["cosine"] == pytest.approx(float(centred[j] @ centred[0]))


def test_table__readme_reading_block_runs(table):
    """The README's pandas/geopandas/DuckDB block, run as it stands there."""
    _, out = table
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- test:read-table -->\n```python\n(.*?)```", readme, re.S)
    assert block is not None
    r = subprocess.run(
        [sys.executable, "-c", block.group(1)],
        cwd=out.parent,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "13 embedded, 2 failed, width 40"
    assert lines[1] == "('OGC', 'CRS84') 13 footprints"
    assert lines[3].endswith("rasters north of the equator")


def test_table__older_layout_is_refused_on_resume(table, onnx_model, tmp_path):
    archive, out = table
    old = tmp_path / "old.parquet"
    t = pq.read_table(out)
    pq.write_table(t.drop_columns(["crs", "bbox"]), old)
    with pytest.raises(Exception, match="other columns.*--overwrite"):
        embed_dir(archive, onnx_model, old, num_workers=0)
    assert pq.read_table(old).num_rows == t.num_rows  # left as it was
    assert embed_dir(archive, onnx_model, old, num_workers=0, overwrite=True).rows == 15


# ------------------------------------------------------------------- cmae info
def test_info__onnx(runner, onnx_model):
    r = runner.invoke(cli, ["info", str(onnx_model), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert [i["name"] for i in info["inputs"]] == ["image", "scale", "valid"]
    assert info["inputs"][0]["shape"] == ["batch", 2, 32, 32]  # band and slope
    assert info["inputs"][1]["shape"] == ["batch", 8]
    assert info["outputs"] == [
        {"name": "embedding", "shape": ["batch", 40], "type": "tensor(float)"}
    ]
    meta = info["metadata"]
    assert meta["embedding_dim"] == 40 and meta["preprocess"]["image_size"] == 32
    assert len(meta["weights_sha256"]) == 64
    human = runner.invoke(cli, ["info", str(onnx_model)])
    assert human.exit_code == 0
    assert "input:      image ['batch', 2, 32, 32]" in human.stdout
    assert "embedding width 40" in human.stdout


def test_info__weights_say_how_they_were_trained(runner, trained, tmp_path):
    r = runner.invoke(cli, ["info", str(trained.weights_path), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["kind"] == "weights" and info["config"]["image_size"] == 32
    assert info["last_epoch"]["epoch"] == 2 and info["onnx"] is None
    human = runner.invoke(cli, ["info", str(trained.weights_path)]).stdout
    assert "last epoch: 2, train loss" in human
    assert f"none yet: cmae export {trained.weights_path} --out" in human
    lone = tmp_path / "lone.pth"
    lone.write_bytes(b"")
    r = runner.invoke(cli, ["info", str(lone)])
    assert r.exit_code == 1 and "lone.json: missing" in r.stderr


def test_info__table_and_unfinished_run(runner, table, onnx_model, tmp_path):
    archive, out = table
    r = runner.invoke(cli, ["info", str(out), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert (info["rows"], info["embedded"], info["failed"]) == (15, 13, 2)
    assert info["with_footprint"] == 13 and info["embedding_dim"] == 40
    assert info["model"] == onnx_model.name and "unfinished_run" not in info
    assert "geometry" in [c["name"] for c in info["schema"]]
    human = runner.invoke(cli, ["info", str(out)]).stdout
    assert "15 (13 embedded, 2 failed; 13 with a footprint)" in human
    # Parts of an interrupted run, with no table yet.
    parts = tmp_path / "x.parquet.parts"
    parts.mkdir()
    shutil.copy(out, parts / "part-000000.parquet")
    r = runner.invoke(cli, ["info", str(tmp_path / "x.parquet"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["unfinished_run"]["rows"] == 15


def test_info__bad_files(runner, tmp_path, real_dir):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    cases = {
        tmp_path / "missing.onnx": "no such file",
        tmp_path / "x.tif": "reads .onnx encoders, .pth weights (with their .json)",
        tmp_path / "m.ckpt.pth": "continue it with cmae train --resume",
        bad: "not a readable Parquet table",
    }
    (tmp_path / "x.tif").write_bytes(b"")
    (tmp_path / "m.ckpt.pth").write_bytes(b"")
    for path, reason in cases.items():
        r = runner.invoke(cli, ["info", str(path)])
        assert r.exit_code == 1 and reason in r.stderr, r.stderr
        assert "Traceback" not in r.output and r.stderr.count("\n") == 1
