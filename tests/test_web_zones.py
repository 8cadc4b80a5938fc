"""The Catchments page's API: embed-zones as a job, the map's polygons, the
most similar catchments, and what it refuses."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("shapely")
pytest.importorskip("pyogrio")

from catchment_mae.web.app import create_app  # noqa: E402
from tests.conftest import write_zones, zone_polygons  # noqa: E402

SAME_ORIGIN = {"Origin": "http://localhost"}


@pytest.fixture(scope="module")
def served(tmp_path_factory, mosaic_tiles, onnx_model):
    """Roots with the mosaic and its zones, the model, and a table of zones
    embedded by a job."""
    base = tmp_path_factory.mktemp("zones-serve")
    data, models = base / "data", base / "models"
    shutil.copytree(mosaic_tiles, data / "tiles")
    write_zones(data / "basins.gpkg", zone_polygons())
    (base / "outside.gpkg").write_bytes((data / "basins.gpkg").read_bytes())
    models.mkdir()
    shutil.copy(onnx_model, models / "m.onnx")
    app = create_app(data, models)
    with app.test_client() as client:
        job = {"zones": "basins.gpkg", "rasters": "tiles", "model_path": "m.onnx",
               "id": "gauge", "name": "basins"}  # fmt: skip
        r = client.post("/api/embed-zones", json=job, headers=SAME_ORIGIN)
        assert r.status_code == 202, r.json
        yield client, data, models, _wait(client, r.json["job"])


def _wait(client, job_id, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        j = client.get(f"/api/jobs/{job_id}").json
        if j["status"] in ("done", "failed", "cancelled"):
            return j
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {j['status']}")


def test_embed_zones_job_writes_the_table(served):
    client, _, models, job = served
    assert job["status"] == "done", job
    assert (job["result"]["embedded"], job["result"]["failed"]) == (4, 2)
    assert job["result"]["out"] == "embeddings/basins.parquet"
    table = pq.read_table(models / "embeddings" / "basins.parquet")
    assert table.column("path").to_pylist() == list(zone_polygons())
    assert client.get("/api/zones/tables").json["tables"] == [
        "embeddings/basins.parquet"
    ]
    assert "basins.gpkg" in client.get("/api/data").json["zones"]


def test_map_and_similar(served):
    client, _, models, _ = served
    fc = client.get("/api/zones/map?table=embeddings/basins.parquet").json
    assert fc["type"] == "FeatureCollection"
    by_id = {f["id"]: f for f in fc["features"]}
    assert set(by_id) == set(zone_polygons())
    assert by_id["corner"]["geometry"]["type"] == "Polygon"
    assert by_id["two_parts"]["geometry"]["type"] == "MultiPolygon"
    assert by_id["outside"]["properties"]["error"] == "lies outside the rasters"
    assert by_id["corner"]["properties"]["gauge"] == "corner"
    lon, lat = by_id["corner"]["geometry"]["coordinates"][0][0]
    assert 14 < lon < 16 and 45 < lat < 46

    r = client.get("/api/zones/similar?table=embeddings/basins.parquet&id=corner&k=2")
    assert r.status_code == 200, r.json
    rows = pq.read_table(models / "embeddings" / "basins.parquet").to_pylist()
    vectors = {
        row["path"]: np.asarray(row["embedding"], float)
        for row in rows
        if row["embedding"] is not None
    }
    q = vectors["corner"]
    cosine = {
        k: float(v @ q / np.linalg.norm(v) / np.linalg.norm(q))
        for k, v in vectors.items()
    }
    assert r.json["similarity"] == pytest.approx(cosine, abs=1e-5)
    expected = sorted((k for k in cosine if k != "corner"), key=lambda k: -cosine[k])
    assert [h["path"] for h in r.json["nearest"]] == expected[:2]
    assert r.json["columns"] == ["area"]  # the id column is the path
    csv_text = client.get(
        "/api/zones/similar?table=embeddings/basins.parquet&id=corner&k=2&format=csv"
    )
    assert csv_text.headers["Content-Disposition"].startswith("attachment")
    lines = csv_text.get_data(as_text=True).strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("row,similarity,path")
    assert lines[1].split(",")[2] == expected[0]


@pytest.mark.parametrize(
    ("query", "field", "words"),
    [
        ("table=embeddings/basins.parquet&id=outside", "id", "no embedding"),
        ("table=embeddings/basins.parquet&id=nope", "id", "no row"),
        ("table=embeddings/basins.parquet&id=corner&k=0", "k", "between"),
        ("table=../data/basins.gpkg&id=corner", "table", "outside"),
        ("table=m.onnx&id=corner", "table", ".parquet"),
    ],
)
def test_similar_refusals(served, query, field, words):
    client = served[0]
    r = client.get(f"/api/zones/similar?{query}")
    assert r.status_code in (400, 404) and r.json["field"] == field, r.json
    assert words in r.json["message"]


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"zones": "../outside.gpkg"}, "zones", "outside"),
        ({"zones": "tiles/tile_00.tif"}, "zones", "expected a"),
        ({"rasters": "../"}, "rasters", "outside"),
        ({"model_path": "nope.onnx"}, "model_path", ""),
        ({"name": "a/b"}, "name", "no folders"),
    ],
)
def test_embed_zones_refusals(served, fields, field, words):
    client = served[0]
    job = {"zones": "basins.gpkg", "rasters": "tiles", "model_path": "m.onnx",
           "name": "x", **fields}  # fmt: skip
    r = client.post("/api/embed-zones", json=job, headers=SAME_ORIGIN)
    assert r.status_code in (400, 404) and r.json["field"] == field, r.json
    assert words in r.json["message"]


def test_a_bad_id_column_fails_the_job_in_words(served):
    client = served[0]
    job = {"zones": "basins.gpkg", "rasters": "tiles", "model_path": "m.onnx",
           "id": "basin", "name": "bad"}  # fmt: skip
    r = client.post("/api/embed-zones", json=job, headers=SAME_ORIGIN)
    j = _wait(client, r.json["job"])
    assert j["status"] == "failed"
    assert j["error"].startswith("basins.gpkg: no column 'basin'"), j["error"]
    assert "/proc/" not in j["error"]


def test_catchments_page_renders(served):
    client = served[0]
    html = client.get("/catchments").get_data(as_text=True)
    for needed in ('id="zones-form"', 'id="map"', "leaflet/leaflet.js"):
        assert needed in html
    assert client.get("/static/leaflet/leaflet.js").status_code == 200


def test_a_zones_file_over_the_limit_is_refused(served, monkeypatch):
    from catchment_mae.web import api_zones

    client = served[0]
    monkeypatch.setattr(api_zones, "MAX_ZONES_MB", 0)
    job = {"zones": "basins.gpkg", "rasters": "tiles", "model_path": "m.onnx",
           "name": "big"}  # fmt: skip
    r = client.post("/api/embed-zones", json=job, headers=SAME_ORIGIN)
    assert r.status_code == 400 and r.json["field"] == "zones"
    assert "larger than 0 MB" in r.json["message"]
