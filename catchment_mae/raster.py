"""Read a TIFF into a ``(C, H, W)`` float32 array, a validity mask and metadata.

numpy and tifffile (+ imagecodecs) only: the batch runner imports this without
torch. Finding the TIFFs of a folder, opening one once (and checking what was
opened), and reading it within its :mod:`~catchment_mae.budget`: the level to
read and its strips or tiles (:mod:`~catchment_mae.pages`), nodata
(:mod:`~catchment_mae.nodata`) and georeferencing (:mod:`~catchment_mae.geotiff`).
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import tifffile

from catchment_mae.budget import (
    ABSURD_PIXELS,
    DEFAULT_MAX_MEMORY_MB,
    MAX_PAGES,
    MAX_SEGMENTS,
    Budget,
    mb,
)
from catchment_mae.discovery import find_tiffs, is_tiff_name
from catchment_mae.errors import BadRasterError, band_mismatch
from catchment_mae.geotiff import GeoInfo, chip_geo, geo_info, ground_extent_m
from catchment_mae.ifds import listing_bytes
from catchment_mae.io import opened_inside
from catchment_mae.nodata import equals_nodata, gdal_nodata
from catchment_mae.pages import (
    FILETYPE_MASK,
    FILETYPE_REDUCED,
    alpha_index,
    choose_level,
    list_pages,
    page_hw,
    read_page,
    single_int,
    steps,
    window_level,
)

__all__ = [
    "ABSURD_PIXELS", "ALL_NODATA", "DEFAULT_MAX_MEMORY_MB", "DEFAULT_MAX_PIXELS",
    "MAX_PAGES", "MAX_SAMPLES", "MAX_SEGMENTS", "MIN_PIXELS", "Budget", "GeoInfo",
    "Raster", "RasterInfo", "check_file", "find_tiffs", "ground_extent_m",
    "header", "image_size", "is_tiff_name", "open_checked", "pixel_metres",
    "read_raster",
]  # fmt: skip

ALL_NODATA = "has no valid pixels (all nodata)"  # a raster or chip with no value
# Samples per pixel a raster may declare (hyperspectral cubes have a few hundred).
MAX_SAMPLES = 4096

log = logging.getLogger(__name__)

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
DEFAULT_MAX_PIXELS = 100_000_000
# Fewer valid pixels than this cannot describe a shape (1x1, 1x3 rasters).
MIN_PIXELS = 4


@dataclass
class RasterInfo:
    """What was read, and from where. ``height``/``width`` are the full image's."""

    path: str
    height: int
    width: int
    bands: int  # bands in the file, alpha excluded
    dtype: str
    nodata: float | None
    read_height: int  # of the array actually read (an overview or a decimation)
    read_width: int
    level: int = 0  # 0: full resolution, n: n-th overview, -k: decimated by k
    has_alpha: bool = False
    has_mask: bool = False
    photometric: str = ""
    geo: GeoInfo = field(default_factory=GeoInfo)
    # A chip: (x0, y0, width, height) of the file's full-resolution pixels; then
    # height, width and geo are the chip's own.
    window: tuple[int, int, int, int] | None = None
    raster_size: tuple[int, int] | None = None  # a chip's raster: height, width

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Raster:
    """A raster ready for preprocessing.

    Attributes:
        data: float32 array with shape (bands, read_height, read_width); invalid
            pixels hold arbitrary values.
        valid: bool array with shape (read_height, read_width); False where any
            selected band is nodata/NaN/inf, alpha is 0 or the internal mask is 0.
        info: metadata of the file.
    """

    data: np.ndarray
    valid: np.ndarray
    info: RasterInfo


# ----------------------------------------------------------------------- reading
def read_raster(
    path: str | os.PathLike[str],
    *,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    min_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_memory_mb: int = DEFAULT_MAX_MEMORY_MB,
    in_chans: int | None = None,
    maxworkers: int | None = 1,
    window: tuple[int, int, int, int] | None = None,
    within: str | os.PathLike[str] | None = None,
    step: tuple[int, int] | None = None,
) -> Raster:
    """Reads a TIFF into a float32 ``(C, H, W)`` array and a validity mask.

    Args:
        path: the TIFF file.
        bands: 1-based band numbers to keep, in order (alpha is never a band).
        nodata: a user nodata value, on top of the file's GDAL_NODATA, NaN and inf.
        min_size: when the file has overviews, read the smallest one whose sides
            are both at least this (the model input size); None reads full size.
        max_pixels: above this many pixels, read an overview or a decimated image.
        max_memory_mb: the memory the raster may take (see DEFAULT_MAX_MEMORY_MB);
            a file that cannot be read within it is refused before decoding.
        in_chans: the band count the caller needs; another count is refused
            before anything is decoded.
        maxworkers: unused; strips and tiles are decoded one at a time.
        window: (x0, y0, width, height) in full-resolution pixels: read only this
            chip (the strips or tiles it touches), clipped to the raster; the
            result describes the chip (its size, its georeferencing).
        within: the file opened must lie inside this folder (the web UI's
            --data-root): checked on the open file itself, so a name swapped
            for a link that leads out after the folder was walked is refused.
        step: with ``window``: read every ``step[0]``-th row and ``step[1]``-th
            column of the full-resolution window, from its first pixel (a
            mosaic's tiles decimated on one grid), instead of choosing.

    Raises:
        BadRasterError: naming the file and the reason.
    """
    path = Path(path)
    budget = Budget(max_memory_mb)
    with open_checked(path, budget, within) as f:
        return _read_open(f, path, bands, nodata, min_size, max_pixels, budget,
                          in_chans, window, step)  # fmt: skip


def _read_open(
    f: BinaryIO,
    path: Path,
    bands: Sequence[int] | None,
    nodata: float | None,
    min_size: int | None,
    max_pixels: int,
    budget: Budget,
    in_chans: int | None,
    window: tuple[int, int, int, int] | None,
    step: tuple[int, int] | None = None,
) -> Raster:
    """read_raster on the file it opened (and checked)."""
    codec = None
    try:
        with tifffile.TiffFile(f) as tif:
            codec = _codec(tif)
            return _read(
                tif, path, bands, nodata, min_size, max_pixels, budget, in_chans,
                window, step,
            )  # fmt: skip
    except BadRasterError:
        raise
    except MemoryError as e:
        raise BadRasterError(path, "too large to read into memory") from e
    except Exception as e:  # tifffile/imagecodecs raise many types; keep the reason
        raise BadRasterError(path, f"cannot decode TIFF: {_reason(e, codec)}") from e


def _codec(tif: Any) -> str | None:
    """The first page's compression in lower case ("jpegxl"), if it can be read."""
    try:
        compression = tif.pages.first.compression
    except Exception:  # a damaged first page: its reading names the reason
        return None
    name = getattr(compression, "name", None)
    return None if not name or name == "NONE" else str(name).lower()


def open_checked(
    path: Path,
    budget: Budget | None = None,
    within: str | os.PathLike[str] | None = None,
) -> BinaryIO:
    """``path`` opened once, and refused (BadRasterError) when it is missing,
    unreadable, not a regular file, empty or not a TIFF (its first bytes), or,
    with a ``budget``, when its directories (IFDs) would take more than a
    quarter of it to list (:func:`catchment_mae.ifds.listing_bytes`); before
    any decoding. Everything after reads this handle: what was checked is what
    is read, whatever the name leads to by then (a path of /proc/self/fd too).
    With ``within``, the file opened must lie inside that folder."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as e:
        if path.is_symlink():
            raise BadRasterError(path, "a symlink to nothing (dangling)") from e
        raise BadRasterError(path, "file does not exist") from e
    except OSError as e:
        raise BadRasterError(path, f"cannot open: {e.strerror or e}") from e
    if within is not None and not opened_inside(fd, within):
        os.close(fd)
        raise BadRasterError(path, "leads outside the folder being read (a symlink)")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
        os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadRasterError(path, "not a regular file")
        raise BadRasterError(path, "empty file (0 bytes)")
    raw = io.FileIO(fd, "rb", closefd=True)
    try:
        os.set_blocking(fd, True)
        raw.name = str(path)  # type: ignore[misc]  (tifffile names the file by it)
        f = io.BufferedReader(raw)
        head = f.read(4)
        if head not in TIFF_MAGIC:
            raise BadRasterError(path, f"not a TIFF file (starts with {head!r})")
        need = listing_bytes(f, MAX_PAGES) if budget is not None else 0
        if need > budget.segment if budget is not None else False:
            raise BadRasterError(
                path,
                f"its directories list about {mb(need)} of tag values, above the "
                f"{mb(budget.segment)} they may take (a quarter of the memory "
                f"budget, {budget.max_memory_mb} MB: cmae train --max-memory)",
            )
        f.seek(0)
        return f
    except OSError as e:
        raw.close()
        raise BadRasterError(path, f"cannot open: {e.strerror or e}") from e
    except BaseException:
        raw.close()
        raise


def check_file(path: Path) -> None:
    """Refuses (BadRasterError) a missing, unreadable, non-regular, empty or
    non-TIFF file, from its first bytes, before any decoding."""
    open_checked(path).close()


# Errors that mean a malformed file tripped a parser, not a reason a user can act
# on: their text names Python internals ("'int' object has no attribute 'name'").
_PARSER_ERRORS = (AttributeError, TypeError, IndexError, KeyError, AssertionError)


def _reason(e: BaseException, codec: str | None = None) -> str:
    """A decoding failure in words, without the library's class names (a fuzz
    run met DeflateError, ZstdError, JpegNError, TiffFileError, ZeroDivisionError
    ... from damaged files); ``codec``: the file's compression, where known."""
    name = type(e).__name__
    log.debug("tifffile/imagecodecs: %s: %s", name, e)
    if isinstance(e, _PARSER_ERRORS + (ArithmeticError, struct.error)):
        return "malformed TIFF structure"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if type(e).__module__.startswith("imagecodecs"):
        inner = re.search(r"imcd_(\w+?)_decode", msg)
        named = inner.group(1) if inner else name.removesuffix("Error").lower()
        if named in ("imcd", ""):  # imagecodecs' own error class, no codec named
            named = codec or "codec"
        return f"damaged compressed data ({named.rstrip('n') or 'codec'})"
    if type(e) is RuntimeError and codec is not None:
        # JPEG XL's decoder: "could not determine frame count"
        return f"damaged compressed data ({codec})"
    # tifffile names its enums' members as Python shows them:
    # "<COMPRESSION.SGILOG: 34676> not supported".
    msg = re.sub(r"<(\w+)\.(\w+): (\d+)>", r"\1 \2 (\3)", msg).replace(
        "COMPRESSION ", "compression "
    )
    if msg.startswith(("corrupted tile", "corrupted strip")):
        return f"damaged {msg.split()[1]} data"  # not its reshape's shapes
    if name == "TiffFileError":
        return msg or "malformed TIFF structure"
    if isinstance(e, ValueError):  # tifffile's enums and sample checks
        known = re.match(r"(.+) is not a (?:known|valid) (\w+)", msg)
        if known:
            return f"unknown {known.group(2)} value {known.group(1)[:40]}"
        if msg.endswith("not supported") and not re.search(
            r"\b(is|are) not supported$", msg
        ):
            return msg.removesuffix("not supported") + "is not supported"
        if msg.endswith("not supported") or "do not match" in msg:
            return msg
        return "malformed TIFF structure"
    if isinstance(e, NotImplementedError):
        return msg or "a layout this reader does not support"
    if isinstance(e, OSError):
        return f"cannot read the file ({e.strerror or 'I/O error'})"
    return f"{name}: {msg}" if msg else name


def _read(
    tif: tifffile.TiffFile,
    path: Path,
    bands: Sequence[int] | None,
    user_nodata: float | None,
    min_size: int | None,
    max_pixels: int,
    budget: Budget,
    in_chans: int | None,
    window: tuple[int, int, int, int] | None = None,
    step: tuple[int, int] | None = None,
) -> Raster:
    images, masks = _images(tif, path)
    full, overviews, dtype, spp = _full_image(images, path)
    height, width = page_hw(full, path)
    alpha = alpha_index(full)
    n_bands = spp - (1 if alpha is not None else 0)
    band_idx = _select_bands(path, bands, n_bands)
    if in_chans is not None and len(band_idx) != in_chans:
        raise BadRasterError(path, band_mismatch(len(band_idx), in_chans))
    limit = min(max_pixels, budget.pixels(spp, dtype.itemsize, len(band_idx)))
    read_window = None
    if window is not None:
        window = _clip_window(window, height, width, path)
        if step is not None:
            page, level, read_window = full, 0, window
        else:
            page, level, read_window = window_level(
                full, overviews, window, min_size, path
            )
        rw_, rh_ = read_window[2], read_window[3]
        if step is not None:
            ky, kx = step
            if -(-rw_ // kx) * -(-rh_ // ky) > limit:
                raise BadRasterError(path, f"window {window} is too large to read")
        else:
            ky, kx = (1, 1) if rw_ * rh_ <= limit else steps(rh_, rw_, limit)
    else:
        page, level, (ky, kx) = choose_level(full, overviews, min_size, limit, path)
    arr, valid = read_page(page, ky, kx, budget, path, read_window)
    if not valid.any():
        if window is not None:  # a chip over empty tiles of a sparse file
            raise BadRasterError(path, ALL_NODATA)
        raise BadRasterError(path, "holds no pixel data (every strip or tile is empty)")
    rh, rw = arr.shape[1:]
    same = page_hw(page, path)
    mask_page = next((m for m in masks if page_hw(m, path) == same), None)
    if mask_page is not None:
        m, m_present = read_page(mask_page, ky, kx, budget, path, read_window)
        valid &= (m[0] != 0) & m_present
    if alpha is not None:
        valid &= arr[alpha] != 0
    nodata = gdal_nodata(full)
    data = _valid_values(arr[band_idx], valid, (nodata, user_nodata))
    del arr
    geo = geo_info(full, height, width)
    raster_size = None
    if window is not None:
        geo = chip_geo(geo, window)
        raster_size = (height, width)
        width, height = window[2], window[3]
    photometric = full.photometric
    info = RasterInfo(
        path=str(path),
        height=height,
        width=width,
        bands=n_bands,
        dtype=str(dtype),
        nodata=nodata if user_nodata is None else user_nodata,
        read_height=rh,
        read_width=rw,
        level=-max(ky, kx) if max(ky, kx) > 1 else level,
        has_alpha=alpha is not None,
        has_mask=mask_page is not None,
        photometric=getattr(photometric, "name", str(photometric or "")),
        geo=geo,
        window=window,
        raster_size=raster_size,
    )
    return Raster(data=data, valid=valid, info=info)


def _images(tif: tifffile.TiffFile, path: Path) -> tuple[list[Any], list[Any]]:
    """The file's image pages (full resolution and overviews) and its
    transparency masks."""
    pages = list_pages(tif)
    if not pages:
        raise BadRasterError(path, "TIFF holds no image")
    images = [p for p in pages if not p.subfiletype & FILETYPE_MASK]
    masks = [p for p in pages if p.subfiletype & FILETYPE_MASK]
    if not images:
        raise BadRasterError(path, "holds only a transparency mask, no image")
    return images, masks


def _full_image(images: list[Any], path: Path) -> tuple[Any, list[Any], np.dtype, int]:
    """(the full-resolution page, its overviews, its data type, its samples per
    pixel), refused where its header declares what is not a raster or more
    than a raster may be."""
    full = next((p for p in images if not p.subfiletype & FILETYPE_REDUCED), images[0])
    height, width = page_hw(full, path)
    if height * width > ABSURD_PIXELS:
        raise BadRasterError(
            path,
            f"declares {width}x{height} pixels, above the {ABSURD_PIXELS:.2g} a "
            "raster may have",
        )
    dtype = np.dtype(full.dtype) if full.dtype is not None else None
    if dtype is None:
        raise BadRasterError(path, "unsupported sample format")
    if dtype.kind == "c":
        raise BadRasterError(
            path, f"complex data ({dtype}) is not a real-valued raster"
        )
    spp = single_int(full.samplesperpixel, "SamplesPerPixel", path)
    if not 1 <= spp <= MAX_SAMPLES:  # a damaged count once listed 4e8 bands
        raise BadRasterError(
            path, f"declares {spp} samples per pixel (at most {MAX_SAMPLES} are read)"
        )
    if height < 1 or width < 1:
        raise BadRasterError(path, f"declares an empty image ({width}x{height} pixels)")
    if getattr(full, "imagedepth", 1) not in (0, 1):
        raise BadRasterError(path, "is a 3-D volume (ImageDepth > 1), not a raster")
    overviews = [
        p
        for p in images
        if p is not full
        and p.subfiletype & FILETYPE_REDUCED
        and int(p.samplesperpixel) == spp
        and p.dtype == full.dtype
    ]
    return full, overviews, dtype, spp


def _valid_values(
    selected: np.ndarray, valid: np.ndarray, nodata: Sequence[float | None]
) -> np.ndarray:
    """The chosen bands as float32; ``valid`` cleared (in place) where any of
    them holds a ``nodata`` value or, in float data, is not finite."""
    for value in nodata:
        if value is not None:
            hit = equals_nodata(selected, value)
            if hit is not None:
                valid &= ~hit.any(axis=0)
    with np.errstate(over="ignore"):  # float64 beyond float32 -> inf -> invalid
        data = selected.astype(np.float32, copy=False)
    del selected
    if data.dtype.kind == "f":
        valid &= np.isfinite(data).all(axis=0)
    return data


def _clip_window(
    window: tuple[int, int, int, int], height: int, width: int, path: Path
) -> tuple[int, int, int, int]:
    """The window within the raster; BadRasterError when nothing of it is."""
    x0, y0, w, h = (int(v) for v in window)
    if w < 1 or h < 1 or x0 < 0 or y0 < 0 or x0 >= width or y0 >= height:
        raise BadRasterError(
            path, f"window {window} lies outside its {width}x{height} pixels"
        )
    return x0, y0, min(w, width - x0), min(h, height - y0)


def _select_bands(path: Path, bands: Sequence[int] | None, n_bands: int) -> list[int]:
    if bands is None:
        return list(range(n_bands))
    for b in bands:
        if not 1 <= b <= n_bands:
            raise BadRasterError(
                path, f"has {n_bands} band(s); band {b} was asked for (--bands)"
            )
    return [b - 1 for b in bands]


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(height, width) of a TIFF's full-resolution image, from its header only.

    Raises:
        BadRasterError: the file is missing, not a TIFF, or holds no image.
    """
    return _header(Path(path), with_geo=False)[:2]


def pixel_metres(path: str | os.PathLike[str]) -> tuple[int, int, float, float]:
    """(height, width, metres per pixel down, metres per pixel across) of a TIFF,
    from its header: the ground size rule of ``--scale ground``
    (:func:`ground_extent_m`) divided by the pixel counts.

    Raises:
        BadRasterError: as image_size, or without usable georeferencing.
    """
    path = Path(path)
    h, w, geo, _ = _header(path, with_geo=True)
    info = RasterInfo(str(path), h, w, 0, "", None, h, w, geo=geo)  # type: ignore[arg-type]
    try:
        h_m, w_m = ground_extent_m(info)
    except BadRasterError as e:
        reason = e.reason.replace("--scale ground", "sizes in metres")
        raise BadRasterError(path, reason) from e
    return h, w, h_m / h, w_m / w


def header(
    path: str | os.PathLike[str], within: str | os.PathLike[str] | None = None
) -> tuple[int, int, int, GeoInfo]:
    """(height, width, bands, georeferencing) of a TIFF's full-resolution image,
    from its header only (bands without an alpha band). ``within``: the file
    opened must lie in this folder (as read_raster's).

    Raises:
        BadRasterError: the file is missing, not a TIFF, or holds no image.
    """
    h, w, geo, bands = _header(Path(path), with_geo=True, within=within)
    return h, w, bands, geo  # type: ignore[return-value]


def _header(
    path: Path, with_geo: bool, within: str | os.PathLike[str] | None = None
) -> tuple[int, int, GeoInfo | None, int]:
    with open_checked(path, Budget(DEFAULT_MAX_MEMORY_MB), within) as f:
        return _header_open(f, path, with_geo)


def _header_open(
    f: BinaryIO, path: Path, with_geo: bool
) -> tuple[int, int, GeoInfo | None, int]:
    try:
        with tifffile.TiffFile(f) as tif:
            images = [p for p in list_pages(tif) if not p.subfiletype & FILETYPE_MASK]
            full = next(
                (p for p in images if not p.subfiletype & FILETYPE_REDUCED), None
            )
            if full is None:
                raise BadRasterError(path, "TIFF holds no image")
            h, w = page_hw(full, path)
            bands = int(full.samplesperpixel) - int(alpha_index(full) is not None)
            return h, w, geo_info(full, h, w) if with_geo else None, bands
    except BadRasterError:
        raise
    except Exception as e:  # tifffile raises many types; keep the reason
        raise BadRasterError(path, f"cannot decode TIFF: {_reason(e)}") from e
