"""Hostile TIFFs, crafted here byte by byte: none may hang, flood or exhaust memory.

Each file below once ended or stalled a whole run (found by fuzzing the reader
with over 1,000 damaged and hand-made files). Every one must now either read
within the memory budget or be refused with a reason that names the file and
says what is wrong with it, quickly.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile

from catchment_mae.errors import BadRasterError
from catchment_mae.preprocess import load_sample
from catchment_mae.raster import read_raster
from catchment_mae.spec import PreprocessSpec

SHORT, LONG, DOUBLE, ASCII = 3, 4, 12, 2
_FORMATS = {SHORT: "H", LONG: "I", DOUBLE: "d", ASCII: "s"}
_SIZES = {SHORT: 2, LONG: 4, DOUBLE: 8, ASCII: 1}


def craft(
    path: Path,
    tags: dict[int, tuple[int, list | bytes]],
    data: bytes = b"",
    next_ifd: int = 0,
) -> Path:
    """A little-endian classic TIFF with one IFD of ``tags`` (code: (type,
    values)); ``data`` lies right after the 8-byte header, at offset 8, so tags
    may point at it. Values longer than 4 bytes go after the IFD."""
    ifd_at = 8 + len(data) + (len(data) & 1)
    extra_at = ifd_at + 2 + 12 * len(tags) + 4
    entries, extra = [], b""
    for code in sorted(tags):
        typ, values = tags[code]
        if typ == ASCII:
            raw = values if isinstance(values, bytes) else str(values).encode()
            raw += b"\0"
            count = len(raw)
        else:
            count = len(values)
            raw = struct.pack(f"<{count}{_FORMATS[typ]}", *values)
        if len(raw) <= 4:
            field = raw.ljust(4, b"\0")
        else:
            field = struct.pack("<I", extra_at + len(extra))
            extra += raw + (b"\0" if len(raw) & 1 else b"")
        entries.append(struct.pack("<HHI", code, typ, count) + field)
    body = struct.pack("<H", len(tags)) + b"".join(entries)
    body += struct.pack("<I", next_ifd)
    head = b"II*\0" + struct.pack("<I", ifd_at)
    pad = b"\0" * (ifd_at - 8 - len(data))
    path.write_bytes(head + data + pad + body + extra)
    return path


def gray(width: int, height: int, offsets, counts, rps=None, bits=8, fmt=1, **more):
    """Tags of a one-band image stored in strips."""
    tags = {
        256: (LONG, [width]),
        257: (LONG, [height]),
        258: (SHORT, [bits]),
        259: (SHORT, [more.pop("compression", 1)]),
        262: (SHORT, [more.pop("photometric", 1)]),
        273: (LONG, list(offsets)),
        277: (SHORT, [1]),
        278: (LONG, [rps if rps is not None else height]),
        279: (LONG, list(counts)),
        339: (SHORT, [fmt]),
    }
    tags.update(more)
    return tags


BUDGET = 64  # MB: the budget the crafted files meet (--max-memory 64)


def _refused(path: Path, *fragments: str, **kw) -> str:
    t0 = time.monotonic()
    with pytest.raises(BadRasterError) as err:
        read_raster(path, max_memory_mb=BUDGET, **kw)
    assert time.monotonic() - t0 < 10
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message
    for f in fragments:
        assert f in message, message
    for internal in ("AttributeError", "TypeError", "IndexError", "KeyError"):
        assert internal not in message, message
    return message


@pytest.fixture
def bombs(tmp_path) -> dict[str, Path]:
    """Every crafted file, by what it does."""
    d = tmp_path
    files: dict[str, Path] = {}
    # A 348-byte file declaring 100,000 x 100,000 pixels in one strip.
    files["declares 1e10 pixels"] = craft(
        d / "big.tif", gray(100_000, 100_000, [8], [8]), b"\0" * 8
    )
    # Just under, and just over, the 2^36 pixels any raster may have.
    files["just under 2^36 pixels"] = craft(
        d / "huge.tif", gray(262_144, 262_143, [8], [8]), b"\0" * 8
    )
    files["over 2^36 pixels"] = craft(
        d / "huger.tif", gray(262_144, 262_145, [8], [8]), b"\0" * 8
    )
    # One deflate strip of 50,000 x 30,000 that inflates to 1.5 GB.
    blob = zlib.compress(b"\0" * (1 << 20), 9)
    files["one strip inflates to 1.5 GB"] = craft(
        d / "deflate.tif",
        gray(50_000, 30_000, [8], [len(blob)], compression=8),
        blob,
    )
    # 65,536 one-row float64 strips of 2^20 pixels sharing one small blob:
    # 512 GiB once decoded.
    row = zlib.compress(b"\0" * (8 << 20), 9)
    n = 65_536
    files["65,536 strips share one blob"] = craft(
        d / "shared.tif",
        gray(
            1 << 20, n, [8] * n, [len(row)] * n, rps=1, bits=64, fmt=3, compression=8
        ),  # fmt: skip
        row,
    )
    # Width 1 and 1.26e9 rows in one strip.
    files["1 x 1.26e9"] = craft(
        d / "tall.tif", gray(1, 1_260_000_000, [8], [8]), b"\0" * 8
    )
    # A header and one empty strip (byte count 0): no pixel data at all.
    files["empty strip"] = craft(d / "empty.tif", gray(64, 64, [0], [0]))
    # 4000 x 4000 x 64 samples in one zstd strip (2 GB decoded).
    tags = gray(4000, 4000, [8], [8], compression=50000)
    tags[277] = (SHORT, [64])
    tags[258] = (SHORT, [16] * 64)
    tags[339] = (SHORT, [1] * 64)
    files["64 bands in one strip"] = craft(d / "bands.tif", tags, b"\0" * 8)
    # One 16384 x 16384 float64 tile (2 GiB decoded).
    tags = gray(16384, 16384, [], [], bits=64, fmt=3, compression=8)
    for code in (273, 278, 279):
        del tags[code]
    tags.update(
        {322: (LONG, [16384]), 323: (LONG, [16384]), 324: (LONG, [8]),
         325: (LONG, [len(blob)])}
    )  # fmt: skip
    files["one tile of 2 GiB"] = craft(d / "tile.tif", tags, blob)
    files["16 JPEG 2000 tiles"] = jpeg2000_tiles(d / "j2k.tif")
    files["64 IFDs share their arrays"] = shared_ifds(d / "ifds.tif")
    # 64 x 64 TIFFs whose one strip's codestream declares a huge image.
    for name, (compression, stream) in codec_bombs().items():
        files[name] = craft(
            d / f"{name.split()[0]}.tif",
            gray(64, 64, [8], [len(stream)], compression=compression),
            stream,
        )
    return files


def codec_bombs() -> dict[str, tuple[int, bytes]]:
    """Codestreams of an 8 x 8 image whose headers were edited to declare a huge
    one (checksums made right), by what they declare; TIFF compression codes."""
    import imagecodecs

    small = np.zeros((8, 8), np.uint8)
    out: dict[str, tuple[int, bytes]] = {}
    jpeg = bytearray(imagecodecs.jpeg8_encode(small))
    at = jpeg.find(b"\xff\xc0")  # SOF0: length, precision, height, width
    struct.pack_into(">HH", jpeg, at + 5, 60000, 60000)
    out["jpeg 60000x60000"] = (7, bytes(jpeg))
    ljpeg = bytearray(
        imagecodecs.ljpeg_encode(small.astype(np.uint16), bitspersample=12)
    )
    at = ljpeg.find(b"\xff\xc3")  # SOF3: lossless
    struct.pack_into(">HH", ljpeg, at + 5, 40000, 40000)
    out["ljpeg12 40000x40000"] = (7, bytes(ljpeg))
    j2k = bytearray(imagecodecs.jpeg2k_encode(small, codecformat="J2K"))
    at = j2k.find(b"\xff\x4f\xff\x51")  # SOC, SIZ: Lsiz, Rsiz, Xsiz, Ysiz
    struct.pack_into(">II", j2k, at + 8, 20000, 20000)
    out["jpeg2000 20000x20000"] = (34712, bytes(j2k))
    png = bytearray(imagecodecs.png_encode(small))
    struct.pack_into(">II", png, 16, 20000, 20000)  # IHDR, then its CRC
    struct.pack_into(">I", png, 29, zlib.crc32(bytes(png[12:29])))
    out["png 20000x20000"] = (34933, bytes(png))
    lerc = bytearray(imagecodecs.lerc_encode(small.astype(np.float32), version=2))
    struct.pack_into("<ii", lerc, 10, 20000, 20000)  # version 2: no checksum
    out["lerc 20000x20000"] = (34887, bytes(lerc))
    webp = bytearray(imagecodecs.webp_encode(np.dstack([small] * 3), lossless=True))
    struct.pack_into("<I", webp, 21, (16383 << 14) | 16383)  # VP8L: 16384 x 16384
    out["webp 16384x16384"] = (50001, bytes(webp))
    return out


@pytest.mark.parametrize(
    "name,fragments",
    [
        ("declares 1e10 pixels", ["one strip decodes to", "--max-memory"]),
        ("just under 2^36 pixels", ["one strip decodes to"]),
        ("over 2^36 pixels", ["declares 262144x262145 pixels, above the 6.9e+10"]),
        ("one strip inflates to 1.5 GB", ["one strip decodes to 1,431 MB"]),
        ("65,536 strips share one blob", ["reading it would decode"]),
        ("1 x 1.26e9", ["one strip decodes to"]),
        ("empty strip", ["holds no pixel data"]),
        ("64 bands in one strip", ["one strip decodes to"]),
        ("one tile of 2 GiB", ["one tile decodes to 2,048 MB"]),
        (
            "16 JPEG 2000 tiles",
            ["would decode 64 MB", "JPEG 2000 data counted 16 times"],
        ),
        ("64 IFDs share their arrays", ["its directories list about", "of tag values"]),
        *(
            (
                name,
                [
                    f"a strip's {label} data declares {name.split()[1]} pixels, "
                    "more than the 64x64 strip"
                ],
            )
            for name, label in (
                ("jpeg 60000x60000", "JPEG"),
                ("ljpeg12 40000x40000", "JPEG"),
                ("jpeg2000 20000x20000", "JPEG 2000"),
                ("png 20000x20000", "PNG"),
                ("lerc 20000x20000", "LERC"),
                ("webp 16384x16384", "WebP"),
            )
        ),  # fmt: skip
    ],
)
def test_bombs__refused_before_decoding(bombs, name, fragments):
    _refused(bombs[name], *fragments)


def test_bombs__band_count_checked_before_reading(bombs):
    _refused(bombs["64 bands in one strip"], "has 64 band(s) but the model takes 1",
             in_chans=1)  # fmt: skip


@pytest.mark.parametrize("inputs", ["plain", "terrain"])
def test_bombs__peak_memory_stays_under_the_budget(bombs, tmp_path, inputs):
    """Each crafted file, and legitimate big ones, read and preprocessed in one
    child process after the other: the rise of the child's high-water mark
    (Linux VmHWM, reset per file through clear_refs) stays under the budget;
    also with the terrain inputs (trimming, the slope channel, the raster's
    facts) on a georeferenced DEM read by decimation."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("measuring peak memory per file needs Linux's clear_refs")
    legit = tmp_path / "legit_big.tif"  # read by decimation
    big = np.random.default_rng(0).random((6000, 6000), np.float32)
    if inputs == "terrain":
        from catchment_mae.synth import write_dem
        from tests.conftest import dem_spec

        big[:, :1500] = -9999.0  # nodata to trim
        write_dem(legit, dem_spec(height=6000, width=6000, pixel=10.0, seed=1), big)
    else:
        tifffile.imwrite(legit, big, rowsperstrip=64, compression="zlib")
    del big
    terrain = (
        ', trim=True, scale="ground", slope_channel=True, scale_stats=True'
        if inputs == "terrain"
        else ""
    )
    rgb = tmp_path / "legit_rgb.tif"  # three bands, read whole
    tifffile.imwrite(
        rgb, np.random.default_rng(1).integers(0, 255, (900, 900, 3), np.uint8),
        tile=(256, 256), compression="zlib",
    )  # fmt: skip
    paths = [str(p) for p in bombs.values()] + [str(legit), str(rgb)]
    code = textwrap.dedent(f"""
        import json, sys
        from catchment_mae.errors import BadRasterError
        from catchment_mae.preprocess import load_sample
        from catchment_mae.spec import PreprocessSpec
        from catchment_mae.raster import read_raster
        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        read_raster({str(legit)!r}, max_pixels=100)  # warm up the imports
        spec = PreprocessSpec(
            image_size=224, in_chans=None, norm="per-raster", max_memory_mb={BUDGET}
            {terrain}
        )
        out = {{}}
        for path in json.loads(sys.argv[1]):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            base = status("VmRSS:")
            try:
                s = load_sample(path, spec)
                what = "read %dx%d" % (s.info.read_height, s.info.read_width)
            except BadRasterError as e:
                what = e.reason
            out[path] = [status("VmHWM:") - base, what]
        print(json.dumps(out))
    """)
    r = subprocess.run(
        [sys.executable, "-c", code, json.dumps(paths)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    for path, (rise, what) in got.items():
        assert rise < BUDGET << 20, (path, rise >> 20, what)
    assert got[str(legit)][1].startswith("read ")  # decimated within the budget
    if inputs == "plain":  # three bands without georeferencing: no ground slope
        assert got[str(rgb)][1] == "read 900x900"


def _two_page_tiff(path: Path) -> tuple[int, int]:
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.ones((8, 8), np.uint8))
        tif.write(np.ones((8, 8), np.uint8))
    with tifffile.TiffFile(path) as tif:
        return tif.pages[0].offset, tif.pages[1].offset


def _next_ifd_field(path: Path, ifd: int) -> int:
    raw = path.read_bytes()
    (count,) = struct.unpack_from("<H", raw, ifd)
    return ifd + 2 + 12 * count


@pytest.mark.parametrize("loop", ["to itself", "back to the first"])
def test_ifd_loops__end_the_walk(tmp_path, loop):
    path = tmp_path / "loop.tif"
    first, second = _two_page_tiff(path)
    raw = bytearray(path.read_bytes())
    if loop == "to itself":
        struct.pack_into("<I", raw, _next_ifd_field(path, first), first)
    else:
        struct.pack_into("<I", raw, _next_ifd_field(path, second), first)
    path.write_bytes(bytes(raw))
    t0 = time.monotonic()
    r = read_raster(path)
    assert r.data.shape == (1, 8, 8) and time.monotonic() - t0 < 5


def test_ifd_chain__only_the_first_pages_are_read(tmp_path):
    """100,000 chained IFDs: a bounded walk, not 20 s before any check."""
    n = 100_000
    entries = gray(2, 2, [8], [4])
    body = bytearray(b"II*\0" + struct.pack("<I", 12) + b"\1\2\3\4")
    size = 2 + 12 * len(entries) + 4
    for k in range(n):
        at = 12 + k * size
        nxt = at + size if k + 1 < n else 0
        body += struct.pack("<H", len(entries))
        for code in sorted(entries):
            typ, values = entries[code]
            body += struct.pack("<HHI", code, typ, 1)
            body += struct.pack(f"<{_FORMATS[typ]}", values[0]).ljust(4, b"\0")
        body += struct.pack("<I", nxt)
    path = tmp_path / "chain.tif"
    path.write_bytes(bytes(body))
    t0 = time.monotonic()
    r = read_raster(path)
    assert r.data.shape == (1, 2, 2) and time.monotonic() - t0 < 5


def test_malformed_tags__say_what_is_wrong(tmp_path):
    ok = gray(4, 4, [8], [16])
    data = bytes(range(16))
    # Two values where ImageLength holds one.
    tags = dict(ok)
    tags[257] = (LONG, [4, 4])
    _refused(craft(tmp_path / "length.tif", tags, data), "malformed TIFF structure")
    # A one-value ModelPixelScale: no georeferencing, but the pixels are read.
    tags = dict(ok)
    tags[33550] = (DOUBLE, [30.0])
    tags[33922] = (DOUBLE, [0, 0, 0, 500_000.0, 5e6, 0])
    r = read_raster(craft(tmp_path / "scale.tif", tags, data))
    assert r.info.geo.transform is None and r.data.shape == (1, 4, 4)
    # An unknown Photometric value.
    tags = dict(ok)
    tags[262] = (SHORT, [77])
    path = craft(tmp_path / "photometric.tif", tags, data)
    try:
        r = read_raster(path)
    except BadRasterError as e:
        assert "AttributeError" not in str(e) and "'int' object" not in str(e)
    else:
        assert r.info.photometric == "77"
    # Only a transparency mask (NewSubfileType 4), no image.
    tags = dict(ok)
    tags[254] = (LONG, [4])
    _refused(craft(tmp_path / "mask.tif", tags, data), "holds only a transparency mask")


def test_geokeys__ten_thousand_keys_one_line_at_most(tmp_path):
    """A GeoKeyDirectory claiming 10,000 keys printed 10,000 tifffile lines in a
    reader process: embed-dir's stderr now holds what cmae says, nothing else."""
    ok = gray(4, 4, [8], [16])
    ok[34735] = (SHORT, [1, 1, 0, 10_000, 1024, 0, 1, 1])
    archive = tmp_path / "a"
    archive.mkdir()
    craft(archive / "keys.tif", ok, bytes(range(16)))
    spec = PreprocessSpec(image_size=8, in_chans=1, norm="per-raster")
    load_sample(archive / "keys.tif", spec)  # reads, georeferencing or not
    code = (
        "from catchment_mae.cli.main import main; import sys; "
        "sys.argv = ['cmae', 'stats', sys.argv[1]]; main()"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(archive)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert len(r.stderr.splitlines()) <= 1, r.stderr[:2000]


def test_a_chip_over_empty_strips_is_nodata_not_broken(tmp_path):
    """A sparse file: a chip that lies in its empty strip has no valid pixel (a
    chip to skip), the chip over its data reads it."""
    data = bytes(range(64)) * 32  # strip 2: 32 rows of 64 px
    path = craft(tmp_path / "sparse.tif", gray(64, 64, [0, 8], [0, len(data)], rps=32),
                 data)  # fmt: skip
    with pytest.raises(BadRasterError, match=r"has no valid pixels \(all nodata\)"):
        read_raster(path, window=(0, 0, 32, 32))
    r = read_raster(path, window=(0, 32, 32, 32))
    assert r.valid.all() and r.data[0, 0, :4].tolist() == [0, 1, 2, 3]


def test_found_by_fuzzing__empty_images_and_absurd_band_counts(tmp_path):
    """A 0-row image once walked 2.6e8 tile columns (seconds, then minutes); a
    SamplesPerPixel of 2^31 once listed every band (3 GB). Both are one line."""
    data = bytes(64 * 64)
    empty = craft(tmp_path / "empty.tif", gray(64, 0, [8], [len(data)]), data)
    with pytest.raises(BadRasterError, match=r"declares an empty image \(64x0"):
        read_raster(empty)
    tags = gray(64, 64, [8], [len(data)])
    tags[277] = (LONG, [2**31 + 3])
    bands = craft(tmp_path / "bands.tif", tags, data)
    with pytest.raises(BadRasterError, match="declares 2147483651 samples per pixel"):
        read_raster(bands)


def test_found_by_fuzzing__web_mercator_far_off_the_globe(tmp_path):
    """A Web Mercator tie point at 1e300 m overflowed math.exp in the ground
    size (--scale ground): now a size from the clamped latitude, or a reason."""

    path = tmp_path / "merc.tif"
    keys = [1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 3857]
    tifffile.imwrite(path, np.ones((16, 16), np.float32), extratags=[
        (33550, "d", 3, (10.0, 10.0, 0.0), True),
        (33922, "d", 6, (0.0, 0.0, 0.0, 0.0, 1e300, 0.0), True),
        (34735, "H", len(keys), tuple(keys), True),
    ])  # fmt: skip
    spec = PreprocessSpec(
        image_size=16, in_chans=None, scale="ground", norm="per-raster"
    )
    try:
        assert np.isfinite(load_sample(path, spec).scale).all()
    except BadRasterError as e:
        assert "ground size" in e.reason


def test_found_by_fuzzing__decoder_failures_in_words(tmp_path):
    """Damaged compressed data and unknown tag values are named in words, never
    by the library's class names (DeflateError, ValueError, struct.error ...)."""
    path = tmp_path / "deflate.tif"
    tifffile.imwrite(path, np.arange(64 * 64, dtype=np.uint16).reshape(64, 64),
                     compression="deflate")  # fmt: skip
    with tifffile.TiffFile(path) as tif:
        at = tif.pages[0].dataoffsets[0]
    raw = bytearray(path.read_bytes())
    raw[at : at + 16] = b"\xff" * 16
    path.write_bytes(bytes(raw))
    with pytest.raises(BadRasterError) as e:
        read_raster(path)
    assert "damaged compressed data (deflate)" in e.value.reason
    (tmp_path / "head.tif").write_bytes(b"II*\x00")  # a header and nothing more
    for name in ("head.tif",):
        with pytest.raises(BadRasterError) as e:
            read_raster(tmp_path / name)
        assert not re.search(r"\w*(Error|error):", e.value.reason), e.value.reason


def test_decoder_reasons__tifffile_s_own_words_made_plain():
    """tifffile names its enums as Python shows them, and a damaged tile by the
    shapes of a reshape: a user reads neither."""
    from catchment_mae.raster import _reason

    assert _reason(ValueError("<COMPRESSION.SGILOG: 34676> not supported")) == (
        "compression SGILOG (34676) is not supported"
    )
    assert _reason(ValueError("JPEG tables are not supported")) == (
        "JPEG tables are not supported"  # not "are is"
    )
    torn = "corrupted tile @ (0, 0, 0, 0, 0) cannot be reshaped from (4097,) to (1,)"
    assert _reason(ValueError(torn)) == "damaged tile data"
    assert _reason(ValueError("corrupted strip @ 3 cannot be reshaped")) == (
        "damaged strip data"
    )


def _user_crs_tiff(path: Path, citation: str, scale: float = 10.0) -> Path:
    keys = [1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1,
            1026, 34737, len(citation) + 1, 0]  # fmt: skip
    tifffile.imwrite(path, np.arange(32 * 32, dtype=np.float32).reshape(32, 32),
                     extratags=[
        (33550, "d", 3, (scale, scale, 0.0), True),
        (33922, "d", 6, (0.0, 0.0, 0.0, 500_000.0, 4_000_000.0, 0.0), True),
        (34735, "H", len(keys), tuple(keys), True),
        (34737, "s", 0, citation + "|", True),
    ])  # fmt: skip
    return path


def test_geokeys__a_crs_citation_nested_deep_is_no_crs(tmp_path):
    """A user-defined CRS whose citation is JSON nested 1,200 deep once made
    pyproj recurse out, outside the reader's error handling."""
    from catchment_mae.batch.reader import read_one

    deep = '{"a":' * 1200 + "1" + "}" * 1200
    for i, citation in enumerate((deep, "[" * 5000 + "]" * 5000)):
        _user_crs_tiff(tmp_path / f"deep{i}.tif", citation)
        spec = PreprocessSpec(image_size=16, in_chans=1, norm="per-raster")
        row, sample, _ = read_one(str(tmp_path), f"deep{i}.tif", spec)
        assert row.error is None and sample is not None, row.error
        assert row.geometry is None  # no footprint: the CRS cannot be used


def test_geokeys__an_infinite_pixel_scale_warns_nothing(tmp_path, recwarn):
    import warnings

    from catchment_mae.batch.reader import read_one

    warnings.simplefilter("always")
    for i, scale in enumerate((float("inf"), 1e308)):
        _user_crs_tiff(tmp_path / f"inf{i}.tif", "WGS 84 / UTM zone 33N", scale)
        spec = PreprocessSpec(image_size=16, in_chans=1, norm="per-raster")
        row, _, _ = read_one(str(tmp_path), f"inf{i}.tif", spec)
        assert row.geometry is None
    assert [str(w.message) for w in recwarn] == []


def test_jpegxl__damaged_strips_in_words(tmp_path):
    """JPEG XL's decoder raises a bare RuntimeError ("could not determine frame
    count") for a damaged header: named as the codec's damage, not the class."""
    pytest.importorskip("imagecodecs")
    path = tmp_path / "jxl.tif"
    image = (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)
    try:
        tifffile.imwrite(path, image, compression="jpegxl")
    except Exception:  # noqa: BLE001 (an imagecodecs build without JPEG XL)
        pytest.skip("this imagecodecs cannot write JPEG XL")
    with tifffile.TiffFile(path) as tif:
        at = tif.pages[0].dataoffsets[0]
    raw = bytearray(path.read_bytes())
    raw[at + 4] = 0  # inside the codestream's size header
    path.write_bytes(bytes(raw))
    with pytest.raises(BadRasterError) as e:
        read_raster(path)
    assert e.value.reason == "cannot decode TIFF: damaged compressed data (jpegxl)"


def jpeg2000_tiles(path: Path) -> Path:
    """16 JPEG 2000 tiles of 1024 x 1024 float32 (64 MB decoded, within the
    plain decode cap at 64 MB): 16 such tiles took 73 s to decode."""
    tags = gray(4096, 4096, [], [], bits=32, compression=34712)
    for code in (273, 278, 279):
        del tags[code]
    tags.update({322: (LONG, [1024]), 323: (LONG, [1024]),
                 324: (LONG, [8] * 16), 325: (LONG, [8] * 16)})  # fmt: skip
    return craft(path, tags, b"\0" * 8)


def test_segments__a_million_one_byte_strips_are_refused_at_once(tmp_path):
    n = 300_000
    path = craft(tmp_path / "strips.tif", gray(1, n, [8] * n, [1] * n, rps=1), b"\0")
    t0 = time.monotonic()
    with pytest.raises(BadRasterError, match="300,000 strips or tiles, more than"):
        read_raster(path)
    assert time.monotonic() - t0 < 30


def shared_ifds(path: Path) -> Path:
    """64 IFDs whose offset and byte-count arrays (a million each) point at one
    shared array took 5.1 GB as tuples before any pixel was read."""
    n, ifds = 1_000_000, 64
    arrays = struct.pack(f"<{n}I", *([8] * n))  # offsets and counts alike
    ifd_at = 8 + len(arrays)
    tags = sorted(
        {
            256: (LONG, 1, 1),
            257: (LONG, 1, n),
            258: (SHORT, 1, 8),
            259: (SHORT, 1, 1),
            262: (SHORT, 1, 1),
            273: (LONG, n, 8),
            277: (SHORT, 1, 1),
            278: (LONG, 1, 1),
            279: (LONG, n, 8),
        }.items()
    )
    size = 2 + 12 * len(tags) + 4
    body = b""
    for k in range(ifds):
        body += struct.pack("<H", len(tags))
        for code, (typ, count, value) in tags:
            body += struct.pack("<HHII", code, typ, count, value)
        body += struct.pack("<I", ifd_at + (k + 1) * size if k + 1 < ifds else 0)
    path.write_bytes(b"II*\0" + struct.pack("<I", ifd_at) + arrays + body)
    return path


def test_directories__listed_by_header_too(tmp_path):
    from catchment_mae.raster import image_size

    path = shared_ifds(tmp_path / "ifds.tif")
    with pytest.raises(BadRasterError, match="its directories list about"):
        image_size(path)


def test_codestreams__declared_sizes_of_real_encodings():
    """The header readers against the encoders' own output, sizes of every
    kind (JPEG XL's small and ratio forms among them)."""
    import imagecodecs

    from catchment_mae.codestreams import declared_size

    for h, w in ((37, 53), (64, 64), (1000, 17), (300, 400), (123, 1)):
        a = (np.arange(h * w) % 251).astype(np.uint8).reshape(h, w)
        streams = {
            7: [imagecodecs.jpeg8_encode(a),
                imagecodecs.ljpeg_encode(a.astype(np.uint16), bitspersample=12)],
            34712: [imagecodecs.jpeg2k_encode(a),
                    imagecodecs.jpeg2k_encode(a, codecformat="J2K")],
            34933: [imagecodecs.png_encode(a)],
            50001: [imagecodecs.webp_encode(np.dstack([a] * 3), level=50)],
            34887: [imagecodecs.lerc_encode(a.astype(np.float32), version=v)
                    for v in (2, 3, 4)],
            50002: [imagecodecs.jpegxl_encode(a),
                    imagecodecs.jpegxl_encode(a, lossless=True)],
        }  # fmt: skip
        for compression, encoded in streams.items():
            for stream in encoded:
                assert declared_size(compression, stream) == (h, w), compression
    assert declared_size(8, b"anything") is None  # deflate: no header of sizes
    assert declared_size(7, b"\xff\xd8\xff") is None  # cut short


def test_codec_lines__libpng_s_warning_never_reaches_stderr(tmp_path):
    """A damaged PNG strip made libpng print "PNG warning: IDAT: incorrect data
    check" through imagecodecs, beside cmae's own line for the file."""
    path = tmp_path / "png.tif"
    image = (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)
    tifffile.imwrite(path, image, compression="png")
    with tifffile.TiffFile(path) as tif:
        at, n = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    raw = bytearray(path.read_bytes())
    raw[at + n // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    code = textwrap.dedent(f"""
        from catchment_mae.errors import BadRasterError
        from catchment_mae.logs import configure
        from catchment_mae.raster import read_raster
        configure(0)
        try:
            read_raster({str(path)!r})
        except BadRasterError as e:
            print(e.reason)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "damaged compressed data (png)" in r.stdout, r
    assert r.stderr == "", r.stderr
