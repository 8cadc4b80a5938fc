"""Footprints: reprojection to OGC:CRS84, WKB, and when there is none."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from pyproj import Transformer

from catchment_mae.geo import Footprint, footprint, geoparquet_metadata, polygon_wkb
from catchment_mae.raster import GeoInfo, read_raster


def _utm_geo(epsg: int, x0: float, y0: float, px: float) -> GeoInfo:
    return GeoInfo(
        crs=f"EPSG:{epsg}",
        epsg=epsg,
        crs_kind="projected",
        pixel_size=(px, px),
        transform=(x0, px, 0.0, y0, 0.0, -px),
    )


@pytest.mark.parametrize("epsg", [32633, 32719, 32601, 32660])
def test_footprint__utm_corners_reprojected_to_lon_lat(epsg):
    x0, y0, px, h, w = 400_000.0, 6_000_000.0, 30.0, 500, 800
    fp = footprint(_utm_geo(epsg, x0, y0, px), h, w)
    poly = shapely.from_wkb(fp.wkb)
    assert poly.geom_type == "Polygon" and poly.is_valid
    assert poly.exterior.is_ccw  # GeoParquet orientation, as declared
    to_lonlat = Transformer.from_crs(f"EPSG:{epsg}", "OGC:CRS84", always_xy=True)
    corners = [
        (x0, y0),
        (x0 + w * px, y0),
        (x0 + w * px, y0 - h * px),
        (x0, y0 - h * px),
    ]
    ring = np.array(poly.exterior.coords)
    for x, y in corners:
        lon, lat = to_lonlat.transform(x, y)
        assert np.min(np.hypot(ring[:, 0] - lon, ring[:, 1] - lat)) < 1e-9
    assert fp.bbox == pytest.approx(poly.bounds)
    assert (fp.crs, fp.pixel_size_x, fp.pixel_size_y) == (f"EPSG:{epsg}", px, px)
    # Densified: the edges follow the projection's curve, not just the corners.
    assert len(ring) == 4 * 8 + 1


def test_footprint__real_files(real_dir):
    """A projected real DEM lands where its own corners say; pixel coordinates
    tagged as EPSG:4326 (an RPC file) and unresolvable CRSs give no footprint."""
    r = read_raster(real_dir / "rioxarray_small_dem_3m_merged.tif")
    fp = footprint(r.info.geo, r.info.height, r.info.width)
    lon0, lat0, lon1, lat1 = fp.bbox
    assert -94.0 < lon0 < lon1 < -93.8 and 41.6 < lat0 < lat1 < 41.7  # Iowa
    assert fp.crs == "EPSG:26915" and fp.pixel_size_x == pytest.approx(3.0)

    rpc = read_raster(real_dir / "rioxarray_test_rpcs.tif")
    fp = footprint(rpc.info.geo, rpc.info.height, rpc.info.width)
    assert fp.crs == "EPSG:4326" and fp.wkb is None and fp.bbox is None

    user = read_raster(real_dir / "rasterstats_slope.tif")  # user-defined, unnamed
    fp = footprint(user.info.geo, user.info.height, user.info.width)
    assert fp.crs is not None and fp.wkb is None and fp.pixel_size_x > 0


def test_footprint__none_without_georeferencing():
    assert footprint(GeoInfo(), 10, 10) == Footprint()
    only_transform = GeoInfo(pixel_size=(2.0, 2.0), transform=(0, 2, 0, 0, 0, -2))
    fp = footprint(only_transform, 10, 10)
    assert fp.wkb is None and fp.pixel_size_x == 2.0
    nonsense = GeoInfo(crs="no such crs", transform=(0, 1, 0, 0, 0, -1))
    assert footprint(nonsense, 10, 10).wkb is None


def test_polygon_wkb__round_trips_through_shapely():
    ring = np.array([[0, 0], [1, 0], [1, 2], [0, 2], [0, 0]], float)
    assert shapely.from_wkb(polygon_wkb(ring)).equals(shapely.box(0, 0, 1, 2))


def test_geoparquet_metadata__shape():
    meta = geoparquet_metadata((1.0, 2.0, 3.0, 4.0))
    col = meta["columns"]["geometry"]
    assert meta["version"] == "1.1.0" and meta["primary_column"] == "geometry"
    assert col["encoding"] == "WKB" and col["geometry_types"] == ["Polygon"]
    assert col["bbox"] == [1.0, 2.0, 3.0, 4.0]
    assert col["crs"]["id"] == {"authority": "OGC", "code": "CRS84"}
    assert col["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
    empty = geoparquet_metadata(None)["columns"]["geometry"]
    assert empty["geometry_types"] == [] and "bbox" not in empty


@pytest.mark.parametrize(
    "crs", ['LOCAL_CS["x"]', "IAU_2015:49900", 'ENGCRS["local",EDATUM["x"]]']
)
def test_footprint__crs_proj_cannot_transform_is_null_not_a_failure(crs):
    """A user-defined or planetary CRS: PROJ builds the CRS but no way to
    lon/lat on Earth; the footprint is null and nothing raises."""
    geo = GeoInfo(crs=crs, transform=(0.0, 1.0, 0.0, 2.0, 0.0, -1.0))
    fp = footprint(geo, 2, 2)
    assert fp.crs == crs and fp.wkb is None and fp.bbox is None
