"""embed-zones: polygons of a zones file read from a mosaic of tiles, embedded
as embed-dir embeds the same catchments clipped to their own GeoTIFFs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

shapely = pytest.importorskip("shapely")
pyogrio = pytest.importorskip("pyogrio")

from catchment_mae.batch.runner import embed_dir  # noqa: E402
from catchment_mae.batch.zone_runner import embed_zones  # noqa: E402
from catchment_mae.cli.main import cli  # noqa: E402
from catchment_mae.terrain import write_like  # noqa: E402
from catchment_mae.zone_reader import read_zone  # noqa: E402
from catchment_mae.zones import read_zones  # noqa: E402
from tests.conftest import (  # noqa: E402
    MOSAIC_ORIGIN,
    MOSAIC_PIXEL,
    MOSAIC_SHAPE,
    mosaic_polygon,
    write_zones,
    zone_polygons,
)

PIXEL = MOSAIC_PIXEL
X0, Y0 = MOSAIC_ORIGIN
H, W = MOSAIC_SHAPE
ZONES = zone_polygons()
poly = mosaic_polygon


@pytest.fixture
def dem(mosaic_dem):
    return mosaic_dem


@pytest.fixture
def tiles(mosaic_tiles):
    return mosaic_tiles


def clip(dem: np.ndarray, geom) -> tuple[np.ndarray, tuple[float, ...]]:
    """The catchment as its own raster, computed here from the whole DEM: the
    smallest window holding the pixels whose centres lie in ``geom`` (or on its
    edge), NaN outside it."""
    g = shapely.make_valid(geom)
    cols, rows = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    x, y = X0 + cols * PIXEL, Y0 - rows * PIXEL
    inside = shapely.intersects_xy(g, x, y)
    r = np.flatnonzero(inside.any(axis=1))
    c = np.flatnonzero(inside.any(axis=0))
    window = (slice(r[0], r[-1] + 1), slice(c[0], c[-1] + 1))
    data = np.where(inside[window], dem[window], np.nan)
    clip.inside = inside[window]  # type: ignore[attr-defined]
    return data, (X0 + c[0] * PIXEL, PIXEL, 0.0, Y0 - r[0] * PIXEL, 0.0, -PIXEL)


def table_by_path(path: Path) -> dict[str, dict]:
    return {row["path"]: row for row in pq.read_table(path).to_pylist()}


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def zoned(tmp_path_factory, mosaic_tiles, onnx_model):
    """embed-zones over the mosaic: the zones file and the table."""
    d = tmp_path_factory.mktemp("zoned")
    zones = write_zones(d / "zones.gpkg", ZONES)
    out = d / "z.parquet"
    summary = embed_zones(
        mosaic_tiles, zones, onnx_model, out, id_column="gauge", num_workers=0
    )
    return zones, out, summary


def test_a_zone_embeds_as_its_catchment_clipped_to_a_geotiff(
    tmp_path, dem, tiles, zoned, onnx_model
):
    """Across tile edges, with a hole, in two parts, repaired: each zone's
    embedding is embed-dir's of the same catchment written as its own file."""
    _, out, summary = zoned
    assert (summary.embedded, summary.failed) == (4, 2)
    clips = tmp_path / "clips"
    clips.mkdir()
    for key in ("inside", "corner", "two_parts", "bowtie"):
        data, transform = clip(dem, ZONES[key])
        write_like(tiles / "tile_00.tif", clips / f"{key}.tif", data, transform)
    embed_dir(clips, onnx_model, tmp_path / "d.parquet", num_workers=0)
    zones, files = table_by_path(out), table_by_path(tmp_path / "d.parquet")
    for key in ("inside", "corner", "two_parts", "bowtie"):
        z, f = zones[key], files[f"{key}.tif"]
        assert z["error"] is None
        assert (z["height"], z["width"]) == (f["height"], f["width"]), key
        assert cosine(z["embedding"], f["embedding"]) >= 0.9999, key


def test_zone_rows_carry_the_zones_columns_polygon_and_reasons(zoned):
    zones, out, _ = zoned
    t = pq.read_table(out)
    assert t.column("path").to_pylist() == list(ZONES)  # the file's order
    rows = table_by_path(out)
    assert rows["outside"]["error"] == "lies outside the rasters"
    assert rows["speck"]["error"] == "covers no pixel centre of the rasters"
    assert rows["outside"]["embedding"] is None
    for key, g in ZONES.items():
        assert rows[key]["gauge"] == key
        assert rows[key]["area"] == pytest.approx(g.area)
    # The polygon in OGC:CRS84, oriented counter-clockwise, with its bbox.
    g84 = shapely.from_wkb(rows["corner"]["geometry"])
    assert g84.geom_type == "Polygon" and len(g84.interiors) == 1
    assert g84.exterior.is_ccw
    assert 14 < g84.centroid.x < 16 and 45 < g84.centroid.y < 46
    assert rows["corner"]["bbox"]["xmin"] == pytest.approx(g84.bounds[0])
    assert shapely.from_wkb(rows["two_parts"]["geometry"]).geom_type == "MultiPolygon"
    assert rows["corner"]["crs"] == "EPSG:32633"
    assert rows["corner"]["pixel_size_x"] == PIXEL
    # Every pixel inside the polygon has data: nothing missing.
    assert rows["corner"]["nodata_fraction"] == 0.0
    assert rows["corner"]["valid_fraction"] == 1.0
    assert rows["outside"]["valid_fraction"] is None
    meta = t.schema.metadata
    geo = json.loads(meta[b"geo"])
    assert "MultiPolygon" in geo["columns"]["geometry"]["geometry_types"]
    recorded = json.loads(meta[b"zones"])
    assert recorded["id"] == "gauge" and recorded["crs"] == "EPSG:32633"


def test_a_second_run_keeps_unchanged_zones_and_embeds_edited_ones(
    tmp_path, tiles, onnx_model
):
    zones = write_zones(tmp_path / "zones.gpkg", ZONES)
    out = tmp_path / "z.parquet"
    embed_zones(tiles, zones, onnx_model, out, id_column="gauge", num_workers=0)
    before = table_by_path(out)
    again = embed_zones(tiles, zones, onnx_model, out, id_column="gauge", num_workers=0)
    assert (again.embedded, again.already_done, again.failed) == (0, 4, 2)
    edited = dict(ZONES, inside=poly((10, 10), (70, 12), (55, 70), (8, 50)))
    write_zones(zones, edited)
    third = embed_zones(tiles, zones, onnx_model, out, id_column="gauge", num_workers=0)
    assert (third.embedded, third.already_done) == (1, 3)
    after = table_by_path(out)
    assert after["corner"]["embedding"] == before["corner"]["embedding"]
    assert after["inside"]["width"] > before["inside"]["width"]
    assert after["inside"]["gauge"] == "inside"  # the zones' columns again


def test_zones_in_another_crs_are_reprojected_to_the_tiles(
    tmp_path, tiles, zoned, onnx_model
):
    zones = write_zones(tmp_path / "zones.geojson", ZONES, to="EPSG:4326")
    out = tmp_path / "z.parquet"
    embed_zones(tiles, zones, onnx_model, out, id_column="gauge", num_workers=0)
    same_crs, rows = table_by_path(zoned[1]), table_by_path(out)
    for key in ("inside", "corner", "two_parts"):
        assert abs(rows[key]["width"] - same_crs[key]["width"]) <= 1
        assert cosine(rows[key]["embedding"], same_crs[key]["embedding"]) > 0.99


def test_a_large_zone_is_decimated_on_the_mosaic_grid_as_its_clip_would_be(
    tmp_path, dem, tiles
):
    """Above max_pixels every k-th pixel is read, across tile edges on the
    zone's own steps: the same pixels as read_raster takes from the clip."""
    from catchment_mae.raster import read_raster
    from catchment_mae.zones import mosaic, plan_zone

    g = poly((13, 21), (187, 21), (187, 153), (13, 153))
    grids, _ = mosaic(tiles)
    zone = plan_zone("big", shapely.to_wkb(g), "EPSG:32633", grids)
    raster, inside = read_zone(tiles, zone, max_pixels=5000, max_memory_mb=64)
    data, transform = clip(dem, g)
    write_like(tiles / "tile_00.tif", tmp_path / "big.tif", data, transform)
    expected = read_raster(tmp_path / "big.tif", max_pixels=5000)
    assert raster.info.level == expected.info.level < -1
    assert raster.data.shape == expected.data.shape
    np.testing.assert_array_equal(raster.valid, expected.valid)
    np.testing.assert_array_equal(
        raster.data[:, raster.valid], expected.data[:, expected.valid]
    )
    k = -raster.info.level
    assert inside == clip.inside[::k, ::k].sum() > raster.valid.sum()  # nodata too


def test_read_zones_refuses_a_missing_or_repeated_id(tmp_path):
    zones = write_zones(tmp_path / "z.gpkg", ZONES)
    with pytest.raises(Exception, match="no column 'basin'"):
        read_zones(zones, "basin")
    table = pa.table(
        {"b": ["a", "a"], "geometry": shapely.to_wkb([ZONES["inside"]] * 2)}
    )
    pyogrio.write_arrow(
        table,
        tmp_path / "twice.gpkg",
        geometry_name="geometry",
        geometry_type="Polygon",
        crs="EPSG:32633",
    )
    with pytest.raises(Exception, match="not unique"):
        read_zones(tmp_path / "twice.gpkg", "b")
    assert read_zones(zones).keys == [str(i) for i in range(1, len(ZONES) + 1)]


def test_geoparquet_zones(tmp_path, tiles, onnx_model):
    """A GeoParquet zones file (its CRS from the geo metadata)."""
    geo = {
        "version": "1.1.0",
        "primary_column": "geometry",
        "columns": {"geometry": {"encoding": "WKB", "geometry_types": [], "crs": None}},
    }
    from pyproj import CRS

    geo["columns"]["geometry"]["crs"] = CRS("EPSG:32633").to_json_dict()
    t = pa.table({"gauge": ["inside"], "geometry": shapely.to_wkb([ZONES["inside"]])})
    t = t.replace_schema_metadata({b"geo": json.dumps(geo).encode()})
    pq.write_table(t, tmp_path / "z.parquet")
    zones = read_zones(tmp_path / "z.parquet", "gauge")
    assert zones.keys == ["inside"]
    out = tmp_path / "e.parquet"
    s = embed_zones(
        tiles, tmp_path / "z.parquet", onnx_model, out, id_column="gauge", num_workers=0
    )
    assert s.embedded == 1


def test_cli_embed_zones(runner, tmp_path, tiles, onnx_model):
    zones = write_zones(tmp_path / "zones.gpkg", ZONES)
    out = tmp_path / "z.parquet"
    args = [
        "embed-zones",
        str(tiles),
        "--zones",
        str(zones),
        "--model",
        str(onnx_model),
    ]
    result = runner.invoke(
        cli, [*args, "--out", str(out), "--id", "gauge", "--json", "--num-workers", "0"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["embedded"], summary["failed"]) == (4, 2)
    bad = runner.invoke(
        cli, [*args, "--out", str(tmp_path / "b.parquet"), "--id", "basin"]
    )
    assert bad.exit_code != 0
    assert "no column 'basin'" in bad.stderr and "Traceback" not in bad.output
    assert bad.stderr.count("\n") == 1


def test_scanline_agrees_with_shapely_on_every_pixel_centre():
    """The mask's scanline fill against shapely's point test: random polygons
    with holes and parts, vertices on pixel centres and corners included."""
    from catchment_mae.zone_reader import scanline

    rng = np.random.default_rng(0)
    for trial in range(60):
        rows, cols = rng.integers(5, 60, 2)
        parts = []
        for _ in range(rng.integers(1, 3)):
            n = rng.integers(3, 12)
            angles = np.sort(rng.uniform(0, 2 * np.pi, n))
            r = rng.uniform(2, 25, n)
            cx, cy = rng.uniform(-5, cols + 5), rng.uniform(-5, rows + 5)
            pts = np.column_stack([cx + r * np.cos(angles), cy + r * np.sin(angles)])
            if trial % 3 == 0:
                pts = (
                    np.round(pts * 2) / 2
                )  # on centres and corners: edges through points
            hole = (pts - [cx, cy]) * 0.4 + [cx, cy]
            parts.append(shapely.Polygon(pts, [hole[::-1]] if trial % 2 else None))
        drawn = shapely.MultiPolygon(parts)
        geom = shapely.make_valid(drawn)
        rings = shapely.get_rings(shapely.get_parts(geom))
        if not len(rings):
            continue
        coords = [shapely.get_coordinates(ring) for ring in rings]
        jj, ii = np.meshgrid(np.arange(cols), np.arange(rows))
        expected = shapely.intersects_xy(geom, jj.astype(float), ii.astype(float))
        got = scanline(coords, int(rows), int(cols))
        if not shapely.is_valid(drawn):  # parts merged: vertices where edges cross,
            # on which a point on the edge is a rounding apart from off it
            points = shapely.points(jj.ravel(), ii.ravel()).reshape(jj.shape)
            tie = shapely.distance(shapely.boundary(geom), points) < 1e-7
            got, expected = got[~tie], expected[~tie]
        np.testing.assert_array_equal(got, expected, err_msg=f"trial {trial}")


def test_chips_give_the_area_weighted_mean_of_the_chips_as_files(
    tmp_path, dem, tiles, onnx_model
):
    """--chips: a zone cut into chips of 40 px; its embedding is the mean of
    embed-dir's embeddings of those chips clipped to files, weighted by the
    polygon's area in each."""
    from catchment_mae.chips import grid
    from catchment_mae.zones import mosaic, plan_zone, zone_chips

    zones = write_zones(tmp_path / "z.gpkg", ZONES)
    out = tmp_path / "z.parquet"
    s = embed_zones(tiles, zones, onnx_model, out, id_column="gauge", chips=40,
                    num_workers=0)  # fmt: skip
    assert (s.embedded, s.failed) == (4, 2)
    rows = table_by_path(out)
    meta = json.loads(pq.read_schema(out).metadata[b"zones"])
    assert meta["chips"]["size"] == 40 and "weighted" in meta["chips"]["embedding"]
    geom = shapely.make_valid(ZONES["corner"])
    grids = mosaic(tiles)[0]
    zone = plan_zone("c", shapely.to_wkb(ZONES["corner"]), "EPSG:32633", grids)
    col, row, w, h = zone.window
    assert w > 40 and h > 40
    files, weights = tmp_path / "chips", {}
    files.mkdir()
    for y in grid(h, 40, 40):
        for x in grid(w, 40, 40):
            x0, y0 = col + x, row + y
            box = poly((x0, y0), (x0 + 40, y0), (x0 + 40, y0 + 40), (x0, y0 + 40))
            part = geom.intersection(box)
            if part.area > 0:
                data, transform = clip(dem, part)
                name = f"{x:03d}_{y:03d}.tif"
                write_like(tiles / "tile_00.tif", files / name, data, transform)
                weights[name] = part.area
    assert len(weights) > 2
    embed_dir(files, onnx_model, tmp_path / "d.parquet", num_workers=0)
    chips = table_by_path(tmp_path / "d.parquet")
    total = sum(weights.values())
    mean = sum(
        np.asarray(chips[n]["embedding"]) * a / total for n, a in weights.items()
    )
    assert cosine(rows["corner"]["embedding"], mean) >= 0.9999
    assert (rows["corner"]["height"], rows["corner"]["width"]) == (h, w)
    assert rows["outside"]["error"] == "lies outside the rasters"
    # A zone within one chip is read whole, as without --chips.
    inside = plan_zone("i", shapely.to_wkb(ZONES["inside"]), "EPSG:32633", grids)
    assert zone_chips(inside, 80) == [inside] and len(zone_chips(inside, 40)) > 1


def test_readme_zones_block_runs(tmp_path, zoned):
    """The README's geopandas block over a table of zones, as it stands there."""
    import re
    import shutil
    import subprocess
    import sys

    from tests.conftest import REPO

    shutil.copy(zoned[1], tmp_path / "basins.parquet")
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- test:read-zones -->\n```python\n(.*?)```", readme, re.S)
    assert block is not None
    r = subprocess.run([sys.executable, "-c", block.group(1)], cwd=tmp_path,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "4 embedded; ['outside', 'speck'] not"
    areas = eval(lines[1])  # noqa: S307 - the block's own printout
    expected = [ZONES[k].area / 1e6 for k in ("inside", "corner", "two_parts")]
    assert areas[:3] == pytest.approx(expected, abs=2e-3)


def test_shards_split_the_zones_and_stac_describes_the_table(
    runner, tmp_path, tiles, onnx_model
):
    zones = write_zones(tmp_path / "zones.gpkg", ZONES)
    base = ["embed-zones", str(tiles), "--zones", str(zones), "--id", "gauge",
            "--model", str(onnx_model), "--num-workers", "0", "--json"]  # fmt: skip
    keys = []
    for k in (1, 2):
        out = tmp_path / f"s{k}.parquet"
        r = runner.invoke(cli, [*base, "--out", str(out), "--shard", f"{k}/2"])
        assert r.exit_code in (0, 1), r.output  # a shard of failures only exits 1
        keys += pq.read_table(out, columns=["path"]).column("path").to_pylist()
    assert sorted(keys) == sorted(ZONES)
    out = tmp_path / "all.parquet"
    r = runner.invoke(cli, [*base, "--out", str(out), "--stac"])
    assert r.exit_code == 0, r.output
    item = json.loads((tmp_path / "all.stac.json").read_text())
    params = item["properties"]["emb:runtime_parameters"]
    assert params["zones"]["id"] == "gauge" and params["rows"] == len(ZONES)
    sources = [link for link in item["links"] if link["rel"] == "emb:source-data"]
    assert {Path(link["href"]).name for link in sources} == {tiles.name, "zones.gpkg"}


def test_tiles_in_two_crss_each_zone_read_from_the_grid_covering_it(
    tmp_path, mosaic_tiles, onnx_model
):
    """A tile in another UTM zone beside the mosaic: a polygon over it is read
    from it (its crs recorded), the others from the mosaic."""
    import shutil

    from pyproj import Transformer

    from catchment_mae.synth import write_dem
    from tests.conftest import dem_spec

    folder = tmp_path / "tiles"
    shutil.copytree(mosaic_tiles, folder)
    spec = dem_spec(height=60, width=60, epsg=32634, origin=(300_000.0, 5_000_000.0))
    write_dem(folder / "east.tif", spec)
    to33 = Transformer.from_crs("EPSG:32634", "EPSG:32633", always_xy=True)
    east = shapely.transform(
        shapely.box(300_300.0, 4_998_500.0, 301_500.0, 4_999_700.0),
        to33.transform,
        interleaved=False,
    )  # the square in UTM 34, given in UTM 33 like the others
    zones = write_zones(tmp_path / "z.gpkg", {"inside": ZONES["inside"], "east": east})
    out = tmp_path / "z.parquet"
    embed_zones(folder, zones, onnx_model, out, id_column="gauge", num_workers=0)
    rows = table_by_path(out)
    assert rows["inside"]["crs"] == "EPSG:32633" and rows["east"]["crs"] == "EPSG:32634"
    assert rows["east"]["error"] is None
    assert 38 <= rows["east"]["width"] <= 42  # 1,200 m of 30 m pixels


def test_odd_geometries_are_rows_with_reasons_and_one_raster_is_a_mosaic(
    tmp_path, tiles, onnx_model
):
    """Lines, points, empty and 3-D geometries in a zones file; RASTERS given as
    one tile of the mosaic."""
    inside = ZONES["inside"]
    odd = {
        "z3": shapely.force_3d(inside, 100.0),
        "line": shapely.LineString(inside.exterior.coords[:2]),
        "point": inside.centroid,
        "empty": shapely.Polygon(),
    }
    zones = write_zones(tmp_path / "odd.gpkg", odd)
    out = tmp_path / "z.parquet"
    s = embed_zones(tiles / "tile_00.tif", zones, onnx_model, out, id_column="gauge",
                    num_workers=0)  # fmt: skip
    rows = table_by_path(out)
    assert (s.embedded, s.failed) == (1, 3)
    assert rows["line"]["error"] == "is a LineString, not a polygon"
    assert rows["point"]["error"] == "is a Point, not a polygon"
    assert rows["empty"]["error"] == "has an empty geometry"
    whole = table_by_path(embed_zones(
        tiles, write_zones(tmp_path / "one.gpkg", {"inside": inside}), onnx_model,
        tmp_path / "w.parquet", id_column="gauge", num_workers=0).out)  # fmt: skip
    assert cosine(rows["z3"]["embedding"], whole["inside"]["embedding"]) > 0.99999


def test_a_file_that_is_no_zones_file_is_one_line(runner, tmp_path, tiles, onnx_model):
    bad = tmp_path / "basins.gpkg"
    bad.write_bytes(b"not a geopackage " * 20)
    out = tmp_path / "z.parquet"
    args = ["embed-zones", str(tiles), "--zones", str(bad), "--model", str(onnx_model)]
    r = runner.invoke(cli, [*args, "--out", str(out)])
    assert r.exit_code != 0 and r.stderr.count("\n") == 1, r.output
    assert "basins.gpkg: not a zones file (GeoPackage" in r.stderr
    assert "driver" not in r.stderr and not out.exists()


def test_interrupted_without_torch_resumes_with_one_row_per_zone(
    tmp_path, dem, tiles, onnx_model
):
    """SIGTERM mid-run, in an environment without torch: the zones embedded so
    far are kept, and the same command finishes with exactly one row a zone."""
    import signal
    import subprocess
    import sys

    from tests.conftest import NO_TORCH, start_cmae, wait_for

    corners = [(r, c) for r in range(0, 150, 6) for c in range(0, 190, 6)]
    nodata = [(dem[r : r + 12, c : c + 12] == -9999).all() for r, c in corners]
    data = [(dem[r : r + 12, c : c + 12] != -9999).all() for r, c in corners]
    first = corners[nodata.index(True)]  # a square of nodata: it fails
    chosen = [first] + [rc for rc, ok in zip(corners, data, strict=True) if ok]
    squares = {
        f"s{i:03d}": poly((c, r), (c + 12, r), (c + 12, r + 12), (c, r + 12))
        for i, (r, c) in enumerate(chosen)
    }
    assert len(squares) > 40
    zones = write_zones(tmp_path / "squares.gpkg", squares)
    out = tmp_path / "z.parquet"
    args = ["embed-zones", tiles, "--zones", zones, "--id", "gauge", "--model",
            onnx_model, "--out", out, "--json", "--num-workers", "0"]  # fmt: skip
    proc = start_cmae(*args, "--batch-size", "1", "--rows-per-part", "1",
                      entry=NO_TORCH)  # fmt: skip
    parts = out.with_name(out.name + ".parts")
    wait_for(proc, lambda: len(list(parts.glob("part-*.parquet"))) >= 5, 60,
             "five parts")  # fmt: skip
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.splitlines()[-1].endswith("run the same command to continue")
    saved = [pq.read_table(p) for p in parts.glob("*.parquet")]
    assert len(saved) >= 5
    # A failed zone (the square over the DEM's nodata) is tried again; the
    # embedded ones are kept.
    kept = sum(t.column("error").null_count for t in saved)
    assert kept == len(saved) - 1 >= 4
    again = subprocess.run([sys.executable, "-c", NO_TORCH, *map(str, args)],
                           capture_output=True, text=True)  # fmt: skip
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["already_done"] == kept
    assert summary["failed"] == 1 and summary["embedded"] == len(squares) - 1 - kept
    assert pq.read_table(out).column("path").to_pylist() == list(squares)


def test_overlapping_tiles_with_nodata_edges_fill_each_other(
    tmp_path, dem, mosaic_tiles, zoned, onnx_model
):
    """Tiles that overlap by 10 pixels, each with nodata along the shared
    strip: a zone across them reads the data of whichever has it."""
    from catchment_mae.synth import write_dem
    from tests.conftest import dem_spec, mosaic_xy

    folder = tmp_path / "overlap"
    folder.mkdir()
    left = np.array(dem[:, :110])
    left[:, 100:] = -9999.0  # its last 10 columns: nodata
    right = np.array(dem[:, 90:])
    right[:, :10] = -9999.0  # its first 10 columns: nodata
    for name, block, col in (("l.tif", left, 0), ("r.tif", right, 90)):
        spec = dem_spec(height=H, width=block.shape[1], origin=mosaic_xy(col, 0),
                        nodata=-9999.0)  # fmt: skip
        write_dem(folder / name, spec, block)
    zones = write_zones(tmp_path / "z.gpkg", {"corner": ZONES["corner"]})
    out = tmp_path / "z.parquet"
    embed_zones(folder, zones, onnx_model, out, id_column="gauge", num_workers=0)
    got = table_by_path(out)["corner"]
    want = table_by_path(zoned[1])["corner"]
    assert got["nodata_fraction"] == want["nodata_fraction"] == 0.0
    assert cosine(got["embedding"], want["embedding"]) > 0.99999


def test_a_tile_that_cannot_be_read_is_left_out_with_a_warning(
    tmp_path, tiles, onnx_model, caplog
):
    """A damaged file among the tiles: said once, and the zones over the
    others embed."""
    import shutil

    folder = tmp_path / "tiles"
    shutil.copytree(tiles, folder)
    (folder / "broken.tif").write_bytes(b"II*\x00" + b"\xff" * 60)
    zones = write_zones(tmp_path / "z.gpkg", {"inside": ZONES["inside"]})
    s = embed_zones(folder, zones, onnx_model, tmp_path / "z.parquet",
                    id_column="gauge", num_workers=0)  # fmt: skip
    assert (s.embedded, s.failed) == (1, 0)
    said = [r.getMessage() for r in caplog.records if "broken.tif" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("not read as a tile: broken.tif: ")
