"""Reading TIFFs: dtypes, compressions, layouts, nodata, masks, overviews, geo."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import tifffile

from catchment_mae.errors import BadRasterError, NoInputError
from catchment_mae.raster import find_tiffs, ground_extent_m, read_raster
from tests.conftest import REAL_DIR, real_manifest

DTYPES = [
    "uint8",
    "int8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "float16",
    "float32",
    "float64",
]
LOSSLESS = [None, "lzw", "deflate", "zstd", "packbits", "lerc"]
ALPHA_FILES = {
    "rasterio_RGBA.uint16.tif",
    "rasterio_alpha.tif",
    "torchgeo_naip.tif",
    "torchgeo_potsdam_RGBIR_2x2.tif",
}


def _ramp(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    n = int(np.prod(shape))
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    vals = np.arange(n) % (min(info.max, 1000) if info else 1000)
    return vals.reshape(shape).astype(dtype)


# imagecodecs' LERC encoder takes no float16.
LERC_DTYPES = set(DTYPES) - {"float16"}


@pytest.mark.parametrize(
    "dtype,compression",
    [(d, c) for d in DTYPES for c in LOSSLESS if c != "lerc" or d in LERC_DTYPES],
)
def test_read_raster__dtypes_and_compressions(make_tiff, dtype, compression):
    data = _ramp((3, 20, 24), dtype)
    path = make_tiff(
        "x.tif",
        data,
        photometric="minisblack",
        planarconfig="separate",
        compression=compression,
    )
    r = read_raster(path)
    assert r.data.dtype == np.float32
    assert r.data.shape == (3, 20, 24)
    np.testing.assert_array_equal(r.data, data.astype(np.float32))
    assert r.info.dtype == dtype and r.info.bands == 3
    assert r.valid.all()


@pytest.mark.parametrize(
    "layout",
    [
        dict(planarconfig="contig"),
        dict(planarconfig="separate"),
        dict(planarconfig="contig", tile=(16, 16)),
        dict(planarconfig="separate", tile=(16, 16)),
        dict(planarconfig="contig", rowsperstrip=3),
        dict(planarconfig="contig", bigtiff=True),
        dict(planarconfig="separate", bigtiff=True, tile=(16, 32), compression="zstd"),
    ],
)
@pytest.mark.parametrize("bands", [1, 2, 5])
def test_read_raster__layouts(make_tiff, layout, bands):
    chw = _ramp((bands, 40, 35), "uint16")
    data = chw if layout["planarconfig"] == "separate" else np.moveaxis(chw, 0, -1)
    if bands == 1:
        data = chw[0]
    path = make_tiff("x.tif", data, photometric="minisblack", **layout)
    r = read_raster(path)
    np.testing.assert_array_equal(r.data, chw.astype(np.float32))
    assert (r.info.height, r.info.width, r.info.bands) == (40, 35, bands)


def test_read_raster__jpeg_rgb(make_tiff):
    yy, xx = np.mgrid[0:64, 0:64]
    rgb = np.stack([yy * 4, xx * 4, (yy + xx) * 2], axis=-1).astype(np.uint8)
    path = make_tiff("j.tif", rgb, photometric="rgb", compression="jpeg", tile=(32, 32))
    r = read_raster(path)
    assert r.data.shape == (3, 64, 64)
    assert np.abs(r.data - np.moveaxis(rgb, -1, 0)).mean() < 3  # lossy


def test_read_raster__palette_gives_indices(make_tiff):
    idx = (np.arange(30 * 20) % 7).reshape(30, 20).astype(np.uint8)
    colormap = np.zeros((3, 256), dtype=np.uint16)
    colormap[:, :7] = np.arange(7) * 9000
    path = make_tiff("p.tif", idx, photometric="palette", colormap=colormap)
    r = read_raster(path)
    assert r.data.shape == (1, 30, 20)
    np.testing.assert_array_equal(r.data[0], idx)


def test_read_raster__complex_is_refused(make_tiff):
    path = make_tiff("c.tif", np.ones((8, 8), np.complex64))
    with pytest.raises(BadRasterError, match=r"c\.tif: complex data"):
        read_raster(path)


# ------------------------------------------------------------------------ nodata
def _nodata_tag(value: str):
    return [(42113, "s", 0, value, True)]


@pytest.mark.parametrize(
    "dtype,tag,fill,expected_invalid",
    [
        ("int16", "-32768", -32768, 3),
        ("uint16", "0", 0, 3),
        ("float32", "-9999", -9999, 3),
        ("float32", "-3.4e+38", np.float32(-3.4e38), 3),  # GDAL's; inexact in float32
        ("uint8", "-9999", 0, 0),  # cannot occur in uint8: masks nothing
        ("uint16", "1.5", 1, 0),  # not an integer: masks nothing
        ("float32", "nan", np.nan, 3),  # NaN pixels are always invalid
    ],
)
def test_read_raster__gdal_nodata(make_tiff, dtype, tag, fill, expected_invalid):
    data = np.full((10, 10), 5, dtype=dtype)
    data.flat[:3] = fill
    path = make_tiff("n.tif", data, extratags=_nodata_tag(tag))
    r = read_raster(path)
    assert int((~r.valid).sum()) == expected_invalid
    assert r.valid.flat[3:].all()


def test_read_raster__nan_inf_and_user_nodata(make_tiff):
    data = np.arange(20, dtype=np.float64).reshape(4, 5)
    data[0, 0], data[0, 1], data[0, 2] = np.nan, np.inf, -np.inf
    data[3, 4] = 1e300  # overflows float32: becomes inf, so invalid
    path = make_tiff("f.tif", data)
    r = read_raster(path, nodata=7.0)
    invalid = {(int(y), int(x)) for y, x in np.argwhere(~r.valid)}
    assert invalid == {(0, 0), (0, 1), (0, 2), (1, 2), (3, 4)}


def test_read_raster__any_band_invalid_masks_pixel(make_tiff):
    data = np.ones((3, 6, 6), dtype=np.int16)
    data[1, 2, 3] = -32768
    path = make_tiff(
        "b.tif",
        data,
        planarconfig="separate",
        photometric="minisblack",
        extratags=_nodata_tag("-32768"),
    )
    r = read_raster(path)
    assert (~r.valid).sum() == 1 and not r.valid[2, 3]
    # Selecting only the other bands keeps the pixel valid.
    assert read_raster(path, bands=[1, 3]).valid.all()


def test_read_raster__alpha_is_a_mask_not_a_band(make_tiff):
    rgba = np.full((16, 16, 4), 100, dtype=np.uint8)
    rgba[:4, :, 3] = 0
    path = make_tiff("a.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    r = read_raster(path)
    assert r.data.shape == (3, 16, 16) and r.info.bands == 3 and r.info.has_alpha
    assert r.valid[:4].sum() == 0 and r.valid[4:].all()


def test_read_raster__internal_mask(tmp_path):
    path = tmp_path / "m.tif"
    data = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32)
    mask = np.ones((32, 32), bool)
    mask[:, :8] = False
    with tifffile.TiffWriter(path) as tw:
        tw.write(data, photometric="minisblack")
        tw.write(mask, photometric="mask", subfiletype=4, compression="deflate")
    r = read_raster(path)
    assert r.info.has_mask and r.data.shape == (1, 32, 32)
    assert not r.valid[:, :8].any() and r.valid[:, 8:].all()


def test_read_raster__band_selection_and_order(make_tiff):
    data = np.stack([np.full((5, 5), v, np.uint8) for v in (10, 20, 30, 40)])
    path = make_tiff("s.tif", data, planarconfig="separate", photometric="minisblack")
    r = read_raster(path, bands=[3, 1])
    assert r.data[:, 0, 0].tolist() == [30, 10]
    with pytest.raises(BadRasterError, match=r"s\.tif: has 4 band\(s\); band 5"):
        read_raster(path, bands=[5])


# --------------------------------------------------------- overviews, huge files
@pytest.fixture
def pyramid(tmp_path):
    path = tmp_path / "cog.tif"
    with tifffile.TiffWriter(path) as tw:
        for level, size in enumerate((256, 128, 64)):
            tw.write(
                np.full((size, size), level, np.float32),
                photometric="minisblack",
                tile=(32, 32),
                subfiletype=1 if level else 0,
            )
    return path


@pytest.mark.parametrize(
    "min_size,level", [(None, 0), (64, 2), (100, 1), (128, 1), (200, 0), (999, 0)]
)
def test_read_raster__overview_choice(pyramid, min_size, level):
    r = read_raster(pyramid, min_size=min_size)
    assert r.info.level == level
    assert r.data[0, 0, 0] == level  # the pixels really come from that level
    assert (r.info.height, r.info.width) == (256, 256)  # always the full image's


def test_read_raster__max_pixels_takes_an_overview(pyramid):
    r = read_raster(pyramid, max_pixels=128 * 128)
    assert r.info.level == 1 and r.data.shape == (1, 128, 128)


@pytest.mark.parametrize(
    "window,min_size,level,read",
    [
        ((64, 32, 128, 128), None, 0, (128, 128)),
        ((64, 32, 128, 128), 64, 1, (64, 64)),  # a 128 px chip, a 64 px model
        ((64, 32, 128, 128), 32, 2, (32, 32)),
        ((64, 32, 100, 100), 64, 0, (100, 100)),  # level 1 would give 50 px
        ((64, 32, 40, 40), 224, 0, (40, 40)),  # a small chip: never upsampled
    ],
)
def test_read_raster__a_window_reads_the_overview_its_detail_needs(
    tmp_path, window, min_size, level, read
):
    path = tmp_path / "ramp.tif"
    with tifffile.TiffWriter(path) as tw:
        for k, size in enumerate((256, 128, 64)):
            f = 256 // size  # each overview pixel: the mean of f x f full pixels
            ramp = np.arange(size, dtype=np.float32) * f + (f - 1) / 2
            tw.write(
                np.tile(ramp, (size, 1)), photometric="minisblack", tile=(32, 32),
                subfiletype=1 if k else 0,
            )  # fmt: skip
    r = read_raster(path, window=window, min_size=min_size)
    assert r.info.level == level and r.data.shape[1:] == read
    assert (r.info.height, r.info.width) == window[3:1:-1]  # the chip's full size
    x0, w = window[0], window[2]
    # The chip's left and right columns hold the full image's x there.
    assert abs(r.data[0, 0, 0] - x0) <= 2**level
    assert abs(r.data[0, 0, -1] - (x0 + w - 1)) <= 2**level


# Strips and tiles, pixel- and band-interleaved: how a file may lay out pixels.
LAYOUTS = [
    dict(planarconfig="contig", tile=(32, 32)),
    dict(planarconfig="contig", rowsperstrip=7),
    dict(planarconfig="separate", tile=(32, 48)),
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_read_raster__decimated_read_above_max_pixels(make_tiff, layout):
    hwc = np.arange(300 * 200 * 3, dtype=np.int32).reshape(300, 200, 3)
    data = np.moveaxis(hwc, -1, 0) if layout.get("planarconfig") == "separate" else hwc
    path = make_tiff("big.tif", data, photometric="minisblack", **layout)
    r = read_raster(path, max_pixels=10_000)
    k = -r.info.level
    assert k == math.ceil(math.sqrt(300 * 200 / 10_000))
    np.testing.assert_array_equal(
        r.data, np.moveaxis(hwc, -1, 0)[:, ::k, ::k].astype(np.float32)
    )
    assert (r.info.height, r.info.width) == (300, 200)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_read_raster__a_window_reads_its_chip_only(make_tiff, layout):
    hwc = np.arange(300 * 200 * 3, dtype=np.int32).reshape(300, 200, 3)
    data = np.moveaxis(hwc, -1, 0) if layout.get("planarconfig") == "separate" else hwc
    path = make_tiff("big.tif", data, photometric="minisblack", **layout)
    full = np.moveaxis(hwc, -1, 0).astype(np.float32)
    for x0, y0, w, h in ((0, 0, 64, 64), (37, 101, 50, 70), (150, 250, 64, 64)):
        r = read_raster(path, window=(x0, y0, w, h))
        w, h = min(w, 200 - x0), min(h, 300 - y0)  # clipped at the edge
        np.testing.assert_array_equal(r.data, full[:, y0 : y0 + h, x0 : x0 + w])
        assert r.valid.all() and r.info.window == (x0, y0, w, h)
        assert (r.info.height, r.info.width) == (h, w)
    # Above max_pixels, the chip is decimated like a whole raster.
    r = read_raster(path, window=(10, 20, 100, 100), max_pixels=2_500)
    np.testing.assert_array_equal(r.data, full[:, 20:120:2, 10:110:2])
    with pytest.raises(BadRasterError, match=r"big\.tif: window .* lies outside"):
        read_raster(path, window=(200, 0, 10, 10))


def test_read_raster__a_rewritten_file_is_never_read_from_decoded_tiles(tmp_path):
    """Chips keep decoded tiles for their neighbours; a file written again (same
    path, same size) gives its new pixels."""
    path = tmp_path / "scene.tif"
    for value in (1, 2):
        tifffile.imwrite(path, np.full((128, 128), value, np.int16), tile=(64, 64))
        os.utime(path, ns=(value * 10**18, value * 10**18))
        for x0 in (0, 40):  # overlapping chips: the second reuses tiles
            r = read_raster(path, window=(x0, 0, 64, 64))
            assert (r.data == value).all()


def test_read_raster__a_chip_of_a_huge_tiled_raster_fits_the_budget(tmp_path):
    """8192 x 8192 int16 (128 MB decoded) with a 4 MB budget: the whole raster
    is refused before decoding, a 256 px chip reads the 4 tiles it touches."""
    path = tmp_path / "huge.tif"
    tiles = (np.full((256, 256), i, np.int16) for i in range(32 * 32))
    tifffile.imwrite(path, tiles, shape=(8192, 8192), dtype=np.int16,
                     tile=(256, 256), compression="deflate")  # fmt: skip
    with pytest.raises(BadRasterError, match="above the"):
        read_raster(path, max_memory_mb=4)
    r = read_raster(path, max_memory_mb=4, window=(4000, 4000, 256, 256))
    assert r.data.shape == (1, 256, 256)
    # Tile (row 15, col 15) is number 495; the chip's last pixel lies in (16, 16).
    assert r.data[0, 0, 0] == 15 * 32 + 15 and r.data[0, -1, -1] == 16 * 32 + 16


def test_read_raster__chips_have_their_own_georeferencing(make_dem):
    path = make_dem("utm.tif", height=120, width=160, pixel=30.0)
    whole = read_raster(path)
    c, a, _, f, _, e = whole.info.geo.transform
    left = read_raster(path, window=(0, 0, 80, 64))
    right = read_raster(path, window=(80, 0, 80, 64))
    below = read_raster(path, window=(0, 64, 80, 64))  # clipped to 56 rows
    assert left.info.geo.transform[0] == c and right.info.geo.transform[0] == c + 80 * a
    assert left.info.geo.bounds[2] == right.info.geo.bounds[0]  # shared edges
    assert left.info.geo.bounds[1] == below.info.geo.bounds[3]
    assert below.info.geo.bounds[1] == whole.info.geo.bounds[1]
    assert ground_extent_m(below.info) == pytest.approx((56 * 30.0, 80 * 30.0))
    np.testing.assert_array_equal(right.data, whole.data[:, :64, 80:])
    np.testing.assert_array_equal(right.valid, whole.valid[:64, 80:])
    # The scale input follows the chip: its own size, in pixels or on the ground.
    from catchment_mae.preprocess import load_sample
    from catchment_mae.spec import PreprocessSpec

    for scale, size in (("pixels", (56, 80)), ("ground", (56 * 30.0, 80 * 30.0))):
        spec = PreprocessSpec(image_size=32, in_chans=1, norm="per-raster", scale=scale)
        chip = load_sample(path, spec, window=(0, 64, 80, 64))
        np.testing.assert_allclose(chip.scale, np.log(size), rtol=1e-6)


def test_read_raster__absurd_dimensions_refused_before_reading(tmp_path):
    path = tmp_path / "absurd.tif"
    tifffile.imwrite(path, np.zeros((16, 16), np.uint8))
    with tifffile.TiffFile(path, mode="r+") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(4_000_000_000)
        tif.pages[0].tags["ImageLength"].overwrite(4_000_000_000)
    with pytest.raises(
        BadRasterError, match=r"absurd\.tif: declares 4000000000x4000000000"
    ):
        read_raster(path)


# ------------------------------------------------------------------- bad files
def test_read_raster__bad_files(tmp_path):
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    text = tmp_path / "text.tif"
    text.write_text("hello, I am not a TIFF")
    good = tmp_path / "good.tif"
    tifffile.imwrite(
        good, np.arange(64 * 64, dtype=np.uint16).reshape(64, 64), compression="deflate"
    )
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    cases = {
        empty: "empty file",
        text: "not a TIFF file",
        truncated: "cannot decode TIFF",
        tmp_path / "missing.tif": "does not exist",
        tmp_path: "not a regular file",
    }
    for path, reason in cases.items():
        with pytest.raises(BadRasterError) as err:
            read_raster(path)
        assert str(err.value).startswith(str(path)) and reason in str(err.value)
        assert "\n" not in str(err.value)


# ----------------------------------------------------------------- real files
@pytest.mark.parametrize("row", real_manifest(), ids=lambda r: r and r["file"])
def test_read_raster__real_files(row):
    path = REAL_DIR / row["file"]
    broken = row["notes"].startswith("UNREADABLE") or row["dtype"].startswith("complex")
    if broken:
        with pytest.raises(BadRasterError) as err:
            read_raster(path)
        assert row["file"] in str(err.value)
        return
    r = read_raster(path)
    # Alpha is a mask, not a channel: these files declare an alpha extra sample.
    has_alpha = row["file"] in ALPHA_FILES
    assert r.info.has_alpha == has_alpha
    bands = int(row["bands"]) - has_alpha
    assert r.data.shape == (bands, int(row["height"]), int(row["width"]))
    assert r.data.dtype == np.float32
    assert r.valid.shape == r.data.shape[1:]
    if row["georef"].startswith("EPSG:"):
        assert r.info.geo.crs == row["georef"]
    if row["nodata"] == "none":
        assert r.info.nodata is None
    elif row["nodata"] == "nan":
        assert math.isnan(r.info.nodata)
    else:
        assert r.info.nodata == pytest.approx(float(row["nodata"]), rel=1e-6)
    if "every pixel equals nodata" in row["notes"]:
        assert not r.valid.any()
    elif row["bands"] != "0":
        assert r.valid.any()


def test_read_raster__real_geo_metadata(real_dir):
    r = read_raster(real_dir / "rasterio_byte.tif")  # GDAL's classic byte.tif
    geo = r.info.geo
    assert (
        geo.epsg == 26711 and geo.crs_kind == "projected" and geo.linear_unit_m == 1.0
    )
    assert geo.pixel_size == pytest.approx((60.0, 60.0))
    assert geo.bounds == pytest.approx((440720.0, 3750120.0, 441920.0, 3751320.0))
    dem = read_raster(real_dir / "torchgeo_mmflood_dem.tif")
    assert dem.info.geo.crs == "EPSG:4326" and dem.info.geo.crs_kind == "geographic"
    dem = read_raster(real_dir / "rioxarray_small_dem_3m_merged.tif")
    assert dem.info.geo.crs == "EPSG:26915" and dem.info.nodata == 0
    assert 0.5 < dem.valid.mean() < 0.8  # nodata 0 around the merged tiles


# --------------------------------------------------------------- ground extent
def test_ground_extent_m__projected(make_dem):
    info = read_raster(make_dem(height=40, width=50, pixel=30.0)).info
    assert ground_extent_m(info) == pytest.approx((1200.0, 1500.0))


def test_ground_extent_m__geographic_and_web_mercator(real_dir, make_dem):
    dem = read_raster(real_dir / "torchgeo_mmflood_dem.tif").info  # ~45.7 N
    h, w = ground_extent_m(dem)
    minx, miny, maxx, maxy = dem.geo.bounds
    lat = math.radians((miny + maxy) / 2)
    assert h == pytest.approx((maxy - miny) * 111_150, rel=3e-3)
    assert w == pytest.approx((maxx - minx) * 111_320 * math.cos(lat), rel=3e-3)
    # Web Mercator at ~47 N: 1 km on the map is cos(47 deg) km on the ground.
    y = 5_900_000.0
    shade = read_raster(
        make_dem("merc.tif", height=50, width=40, pixel=20.0, epsg=3857, origin=(0, y))
    ).info
    h, w = ground_extent_m(shade)
    minx, miny, maxx, maxy = shade.geo.bounds
    lat = 2 * math.atan(math.exp((miny + maxy) / 2 / 6378137.0)) - math.pi / 2
    assert h == pytest.approx(1000.0 * math.cos(lat)) and 0.6 < h / 1000 < 0.75
    assert w == pytest.approx(800.0 * math.cos(lat))


def test_ground_extent_m__needs_georeferencing(make_tiff):
    path = make_tiff("plain.tif", np.ones((8, 8), np.uint8))
    with pytest.raises(BadRasterError, match="no usable georeferencing"):
        ground_extent_m(read_raster(path).info)


# ------------------------------------------------------------------- discovery
def test_find_tiffs__sorted_recursive_any_case(tmp_path):
    for name in [
        "b.tif",
        "a.TIFF",
        "sub/c.Tif",
        "sub/deeper/d.tiff",
        "notes.txt",
        "x.tif.bak",
    ]:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in find_tiffs(tmp_path)]
    assert found == ["a.TIFF", "b.tif", "sub/c.Tif", "sub/deeper/d.tiff"]
    flat = [p.name for p in find_tiffs(tmp_path, recursive=False)]
    assert flat == ["a.TIFF", "b.tif"]


def test_find_tiffs__symlink_loop_does_not_hang(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.tif").write_bytes(b"")
    os.symlink(tmp_path, tmp_path / "d" / "loop")
    found = list(find_tiffs(tmp_path))
    assert [p.name for p in found] == ["x.tif"]


def test_find_tiffs__links_to_nothing_are_listed_to_fail_with_their_reason(tmp_path):
    """A TIFF-named link loop was left out without a word; it is listed now, and
    reading it (like a dangling link) says why it fails."""
    from catchment_mae.raster import check_file

    os.symlink("loop2.tif", tmp_path / "loop1.tif")
    os.symlink("loop1.tif", tmp_path / "loop2.tif")
    os.symlink("nowhere.tif", tmp_path / "dangling.tif")
    found = list(find_tiffs(tmp_path))
    assert [p.name for p in found] == ["dangling.tif", "loop1.tif", "loop2.tif"]
    reasons = []
    for path in found:
        with pytest.raises(BadRasterError) as e:
            check_file(path)
        reasons.append(e.value.reason)
    assert reasons[0] == "a symlink to nothing (dangling)"
    assert reasons[1] == reasons[2] == "cannot open: Too many levels of symbolic links"


def test_find_tiffs__missing_or_not_a_dir(tmp_path):
    with pytest.raises(NoInputError, match="does not exist"):
        list(find_tiffs(tmp_path / "nope"))
    f = tmp_path / "f.tif"
    f.write_bytes(b"")
    with pytest.raises(NoInputError, match="not a directory"):
        list(find_tiffs(f))


def test_read_raster__multi_page_reads_the_first_full_resolution_image(tmp_path):
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(np.full((8, 8), 5, np.uint8), subfiletype=1)  # a thumbnail first
        tw.write(np.full((32, 40), 1, np.uint8))
        tw.write(np.full((32, 40), 2, np.uint8))
    r = read_raster(path)
    assert r.data.shape == (1, 32, 40) and (r.data == 1).all()


def test_nodata__as_gdal_compares_it_in_a_float64_cog_s_overviews(tmp_path):
    """rio-tiler's full-earth COG (float64) keeps its nodata in the overviews
    rounded through float32 (-1.2676506002282294e30 under a tag of
    -1.26765060000000006e30); GDAL takes both as nodata, and so must we."""
    tag = "-1.26765060000000006e30"
    path = tmp_path / "cog.tif"
    with tifffile.TiffWriter(path) as tw:
        for k, size in enumerate((256, 128, 64)):
            nodata = float(tag) if k == 0 else float(np.float32(float(tag)))
            image = np.full((size, size), nodata, np.float64)
            image[size // 4 : -size // 4, size // 4 : -size // 4] = 100.0 + k
            extra = [(42113, "s", 0, tag, True)] if k == 0 else []
            tw.write(image, photometric="minisblack", tile=(32, 32),
                     subfiletype=1 if k else 0, extratags=extra)  # fmt: skip
    for min_size, level in ((None, 0), (128, 1), (64, 2)):
        r = read_raster(path, min_size=min_size)
        assert r.info.level == level
        assert r.valid.mean() == 0.25, (level, r.valid.mean())
        assert r.data[0][r.valid].min() == 100.0 + level
    # Values near the nodata but not within float32 rounding stay data.
    near = tmp_path / "near.tif"
    image = np.full((32, 32), -1000.0, np.float32)
    image[0, 0], image[0, 1] = -1000.001, -1000.5
    tifffile.imwrite(near, image, extratags=[(42113, "s", 0, "-1000", True)])
    r = read_raster(near)
    assert r.valid.sum() == 2


def test_embedding__a_raster_far_outside_the_training_data_is_refused(
    tmp_path, onnx_model
):
    from catchment_mae.batch.runner import embed_dir
    from catchment_mae.preprocess import load_sample
    from catchment_mae.runtime import create_session, read_metadata, spec_from_metadata

    spec = spec_from_metadata(read_metadata(create_session(onnx_model)))
    assert spec.norm_mean is not None
    d = tmp_path / "d"
    d.mkdir()
    from catchment_mae.synth import DemSpec, geotiff_tags

    tags = geotiff_tags(DemSpec(48, 48, 30.0, 32633, (500_000.0, 4e6), "float32",
                                -9999.0, 0))  # fmt: skip
    good = np.random.default_rng(0).normal(spec.norm_mean[0], 5, (48, 48))
    tifffile.imwrite(d / "good.tif", good.astype(np.float32), extratags=tags)
    bad = good.copy()
    bad[:10] = -1.2676506e30  # a nodata no tag names
    tifffile.imwrite(d / "bad.tif", bad.astype(np.float32), extratags=tags)
    with pytest.raises(BadRasterError, match="far outside the data the model"):
        load_sample(d / "bad.tif", spec)
    summary = embed_dir(d, onnx_model, tmp_path / "t.parquet", num_workers=0)
    assert summary.embedded == 1 and summary.failed == 1
    assert "check its nodata value" in summary.failures[0]["error"]
