"""Read a TIFF into a ``(C, H, W)`` float32 array, a validity mask and metadata.

numpy and tifffile (+ imagecodecs) only: the batch runner imports this without torch.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import itertools
import logging
import math
import os
import re
import stat
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import tifffile

from catchment_mae import codestreams
from catchment_mae.codestreams import declared_size
from catchment_mae.errors import BadRasterError, NoInputError, band_mismatch
from catchment_mae.ifds import listing_bytes
from catchment_mae.io import opened_inside

ALL_NODATA = "has no valid pixels (all nodata)"  # a raster or chip with no value
# Samples per pixel a raster may declare (hyperspectral cubes have a few hundred).
MAX_SAMPLES = 4096

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
DEFAULT_MAX_PIXELS = 100_000_000
# A file declaring more than this many pixels is refused before anything is read:
# even a decimated read would have to visit every one of its tiles.
ABSURD_PIXELS = 1 << 36
# Fewer valid pixels than this cannot describe a shape (1x1, 1x3 rasters).
MIN_PIXELS = 4
# The memory one raster may take while it is read and preprocessed. It is
# enforced from the sizes the file declares, before anything is decoded: a
# decoded strip or tile may take a quarter of it, the array read (an overview, or
# every k-th row and column) is sized to fit it, and reading may decode at most
# four times it in all (a bound on the time a file can take).
DEFAULT_MAX_MEMORY_MB = 1024
# IFDs looked at: a COG's image, overviews and masks take a few dozen at most;
# a chain of 200,000 IFDs, or one that loops back, must not be walked.
MAX_PAGES = 64
# Strips or tiles one read may decode: 4 million one-byte strips took 39 s in
# Python's loop alone. A 100,000 px square scene of 256 px tiles has 152,600.
MAX_SEGMENTS = 1 << 18

# GeoTIFF keys and units (GeoTIFF 1.1 spec, section 7).
_USER_DEFINED = 32767
_LINEAR_UNITS_M = {9001: 1.0, 9002: 0.3048, 9003: 1200 / 3937, 9036: 1000.0}
_WEB_MERCATOR = {3857, 3785, 900913, 102100, 102113}
_FILETYPE_REDUCED = 1
_FILETYPE_MASK = 4
_EXTRASAMPLE_ALPHA = (1, 2)  # associated, unassociated alpha


@dataclass
class GeoInfo:
    """Georeferencing read from GeoTIFF tags; all fields may be None."""

    crs: str | None = None  # "EPSG:32612", or the citation of a user-defined CRS
    epsg: int | None = None
    crs_kind: str | None = None  # "projected" | "geographic" | None
    linear_unit_m: float | None = None  # metres per CRS unit (projected CRS)
    pixel_size: tuple[float, float] | None = None  # (x, y) in CRS units, positive
    bounds: tuple[float, float, float, float] | None = None  # minx, miny, maxx, maxy
    transform: tuple[float, ...] | None = None  # GDAL order: c, a, b, f, d, e


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


# --------------------------------------------------------------------- discovery
def is_tiff_name(name: str) -> bool:
    return name.lower().endswith(TIFF_SUFFIXES)


def find_tiffs(
    root: str | os.PathLike[str],
    recursive: bool = True,
    within: str | os.PathLike[str] | None = None,
) -> Iterator[Path]:
    """Yields the TIFFs under ``root`` lazily, in sorted path order.

    Symbolic links are followed, to files and to directories (a dataset is often
    a folder of links), but a walk never enters a directory twice (by device and
    inode) nor a directory that holds ``root`` (a link to ``/`` or to a parent
    would walk the whole machine, or loop). With ``within`` (the web UI passes its
    ``--data-root``), a file or directory that resolves outside it is skipped
    with a warning, symlinks included.

    Raises NoInputError when ``root`` is not a directory.
    """
    root = Path(root)
    if not root.exists():
        raise NoInputError(f"{root}: input directory does not exist")
    if not root.is_dir():
        raise NoInputError(f"{root}: not a directory")
    seen: set[tuple[int, int]] = set()
    fence = Path(within).resolve() if within is not None else None
    yield from _walk(root, recursive, seen, root.resolve(), fence)


def _walk(
    directory: Path,
    recursive: bool,
    seen: set[tuple[int, int]],
    top: Path,
    fence: Path | None,
) -> Iterator[Path]:
    try:
        st = directory.stat()
    except OSError as e:
        log.warning("%s: cannot list directory: %s", directory, e.strerror or e)
        return
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return
    seen.add(key)
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        log.warning("%s: cannot list directory: %s", directory, e.strerror or e)
        return
    for entry in entries:
        path = Path(entry.path)
        try:
            is_dir = entry.is_dir()  # follows symlinks
            target = path.resolve() if entry.is_symlink() else None
        except (OSError, RuntimeError):  # a link loop, or unreadable
            if is_tiff_name(entry.name):
                yield path  # reading it fails, and says why (it was left out)
            continue
        if is_dir and not recursive:
            continue
        if not is_dir and not is_tiff_name(entry.name):
            continue
        if target is not None:
            if fence is not None and not target.is_relative_to(fence):
                log.warning("skipped %s: a symlink that leads outside %s", path, fence)
                continue
            if is_dir and top.is_relative_to(target):
                log.warning(
                    "skipped %s: a symlink to a folder that holds %s (a loop)",
                    path, top,
                )  # fmt: skip
                continue
        if is_dir:
            yield from _walk(path, recursive, seen, top, fence)
        else:
            yield path


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

    Raises:
        BadRasterError: naming the file and the reason.
    """
    path = Path(path)
    budget = Budget(max_memory_mb)
    with open_checked(path, budget, within) as f:
        return _read_open(f, path, bands, nodata, min_size, max_pixels, budget,
                          in_chans, window)  # fmt: skip


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
) -> Raster:
    """read_raster on the file it opened (and checked)."""
    codec = None
    try:
        with tifffile.TiffFile(f) as tif:
            codec = _codec(tif)
            return _read(
                tif, path, bands, nodata, min_size, max_pixels, budget, in_chans,
                window,
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
                f"its directories list about {_mb(need)} of tag values, above the "
                f"{_mb(budget.segment)} they may take (a quarter of the memory "
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


@dataclass(frozen=True)
class Budget:
    """Memory bounds of one read, from ``max_memory_mb`` (DEFAULT_MAX_MEMORY_MB)."""

    max_memory_mb: int

    @property
    def total(self) -> int:
        return self.max_memory_mb << 20

    @property
    def segment(self) -> int:
        """Bytes one decoded strip or tile may take."""
        return self.total // 4

    @property
    def decoded(self) -> int:
        """Bytes reading one raster may decode in all."""
        return self.total * 4

    def pixels(self, spp: int, itemsize: int, bands: int) -> int:
        """Pixels of the array read that fit: its own bytes, the float32 copy of
        the chosen bands, and what preprocessing makes of them (measured peak
        about itemsize + 20 bytes a band, plus the mask)."""
        per_pixel = spp * itemsize + bands * (itemsize + 20) + 8
        return max(1, self.total // per_pixel)


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
) -> Raster:
    pages = _list_pages(tif)
    if not pages:
        raise BadRasterError(path, "TIFF holds no image")
    images = [p for p in pages if not p.subfiletype & _FILETYPE_MASK]
    masks = [p for p in pages if p.subfiletype & _FILETYPE_MASK]
    if not images:
        raise BadRasterError(path, "holds only a transparency mask, no image")
    full = next((p for p in images if not p.subfiletype & _FILETYPE_REDUCED), images[0])
    height, width = _page_hw(full, path)
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
    spp = _single_int(full.samplesperpixel, "SamplesPerPixel", path)
    if not 1 <= spp <= MAX_SAMPLES:  # a damaged count once listed 4e8 bands
        raise BadRasterError(
            path, f"declares {spp} samples per pixel (at most {MAX_SAMPLES} are read)"
        )
    if height < 1 or width < 1:
        raise BadRasterError(path, f"declares an empty image ({width}x{height} pixels)")
    if getattr(full, "imagedepth", 1) not in (0, 1):
        raise BadRasterError(path, "is a 3-D volume (ImageDepth > 1), not a raster")
    alpha_index = _alpha_index(full)
    n_bands = spp - (1 if alpha_index is not None else 0)
    band_idx = _select_bands(path, bands, n_bands)
    if in_chans is not None and len(band_idx) != in_chans:
        raise BadRasterError(
            path,
            band_mismatch(len(band_idx), in_chans),
        )
    overviews = [
        p
        for p in images
        if p is not full
        and p.subfiletype & _FILETYPE_REDUCED
        and int(p.samplesperpixel) == spp
        and p.dtype == full.dtype
    ]
    limit = min(max_pixels, budget.pixels(spp, dtype.itemsize, len(band_idx)))
    read_window = None
    if window is not None:
        window = _clip_window(window, height, width, path)
        page, level, read_window = _window_level(
            full, overviews, window, min_size, path
        )
        rw_, rh_ = read_window[2], read_window[3]
        ky, kx = (1, 1) if rw_ * rh_ <= limit else _steps(rh_, rw_, limit)
    else:
        page, level, (ky, kx) = _choose_level(full, overviews, min_size, limit, path)
    arr, present = _read_page(page, ky, kx, budget, path, read_window)
    if not present.any():
        if window is not None:  # a chip over empty tiles of a sparse file
            raise BadRasterError(path, ALL_NODATA)
        raise BadRasterError(path, "holds no pixel data (every strip or tile is empty)")
    rh, rw = arr.shape[1:]

    nodata = _gdal_nodata(full)
    valid = present
    has_mask = False
    mask_page = next(
        (m for m in masks if _page_hw(m, path) == _page_hw(page, path)), None
    )
    if mask_page is not None:
        m, m_present = _read_page(mask_page, ky, kx, budget, path, read_window)
        valid &= (m[0] != 0) & m_present
        has_mask = True
    if alpha_index is not None:
        valid &= arr[alpha_index] != 0
    selected = arr[band_idx]
    del arr
    for value in (nodata, user_nodata):
        if value is not None:
            hit = _equals_nodata(selected, value)
            if hit is not None:
                valid &= ~hit.any(axis=0)
    with np.errstate(over="ignore"):  # float64 beyond float32 -> inf -> invalid
        data = selected.astype(np.float32, copy=False)
    del selected
    if data.dtype.kind == "f":
        valid &= np.isfinite(data).all(axis=0)

    photometric = full.photometric
    geo = _geo_info(full, height, width)
    raster_size = None
    if window is not None:
        geo = _chip_geo(geo, window)
        raster_size = (height, width)
        width, height = window[2], window[3]
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
        has_alpha=alpha_index is not None,
        has_mask=has_mask,
        photometric=getattr(photometric, "name", str(photometric or "")),
        geo=geo,
        window=window,
        raster_size=raster_size,
    )
    return Raster(data=data, valid=valid, info=info)


def _window_level(
    full: Any,
    overviews: list[Any],
    window: tuple[int, int, int, int],
    min_size: int | None,
    path: Path,
) -> tuple[Any, int, tuple[int, int, int, int]]:
    """Returns (page, overview level, the window in that page's pixels).

    With ``min_size``, the smallest overview on which the window still spans at
    least that many pixels a side (a 2,048 px chip for a 224 px model reads the
    overview a quarter as large, never a level that would be upsampled); else,
    or when none is, the full image. On an overview the window grows to whole
    overview pixels (at most one more on each side).
    """
    h, w = _page_hw(full, path)
    x0, y0, ww, wh = window
    best: tuple[Any, int, tuple[int, int, int, int]] = (full, 0, window)
    if min_size is None:
        return best
    levels = sorted([full, *overviews], key=lambda p: -_pixels(p, path))
    for level, page in enumerate(levels):
        oh, ow = _page_hw(page, path)
        ox0, oy0 = x0 * ow // w, y0 * oh // h  # whole numbers: no rounding slips
        ox1 = min(ow, max(ox0 + 1, -(-(x0 + ww) * ow // w)))
        oy1 = min(oh, max(oy0 + 1, -(-(y0 + wh) * oh // h)))
        if min(ox1 - ox0, oy1 - oy0) >= min(min_size, ww, wh):
            best = (page, level, (ox0, oy0, ox1 - ox0, oy1 - oy0))
    return best


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


def _chip_geo(geo: GeoInfo, window: tuple[int, int, int, int]) -> GeoInfo:
    """The georeferencing of a chip: the transform moved to its corner."""
    if geo.transform is None:
        return geo
    x0, y0, w, h = window
    c, a, b, f, d, e = geo.transform
    c, f = c + a * x0 + b * y0, f + d * x0 + e * y0
    xs = [c + a * i + b * j for i, j in ((0, 0), (w, 0), (0, h), (w, h))]
    ys = [f + d * i + e * j for i, j in ((0, 0), (w, 0), (0, h), (w, h))]
    return dataclasses.replace(
        geo,
        transform=(c, a, b, f, d, e),
        bounds=(min(xs), min(ys), max(xs), max(ys)),
    )


def _list_pages(tif: tifffile.TiffFile) -> list[Any]:
    """The first MAX_PAGES IFDs, stopping where the chain loops back."""
    pages, seen = [], set()
    for i in range(MAX_PAGES):
        try:
            page = tif.pages[i]
        except IndexError:
            break
        if page.offset in seen:  # an IFD chain that points back: stop there
            break
        seen.add(page.offset)
        pages.append(page)
    return pages


def _single_int(value: Any, tag: str, path: Path) -> int:
    """A tag that must hold one whole number (ImageLength, SamplesPerPixel, ...)."""
    if isinstance(value, tuple | list | np.ndarray):
        if len(value) != 1:
            raise BadRasterError(path, f"{tag} holds {len(value)} values, not one")
        value = value[0]
    try:
        return int(value)
    except (TypeError, ValueError) as e:
        raise BadRasterError(path, f"{tag} is not a number ({value!r})") from e


def _page_hw(page: Any, path: Path | None = None) -> tuple[int, int]:
    where = Path(path) if path is not None else Path(str(page.parent.filename))
    return (
        _single_int(page.imagelength, "ImageLength", where),
        _single_int(page.imagewidth, "ImageWidth", where),
    )


def _alpha_index(page: Any) -> int | None:
    extras = tuple(int(e) for e in (page.extrasamples or ()))
    spp = int(page.samplesperpixel)
    for i, e in enumerate(extras):
        if e in _EXTRASAMPLE_ALPHA:
            return spp - len(extras) + i
    return None


def _select_bands(path: Path, bands: Sequence[int] | None, n_bands: int) -> list[int]:
    if bands is None:
        return list(range(n_bands))
    for b in bands:
        if not 1 <= b <= n_bands:
            raise BadRasterError(
                path, f"has {n_bands} band(s); band {b} was asked for (--bands)"
            )
    return [b - 1 for b in bands]


def _choose_level(
    full: Any,
    overviews: list[Any],
    min_size: int | None,
    limit: int,
    path: Path,
) -> tuple[Any, int, tuple[int, int]]:
    """Returns (page, overview level, (row step, column step)).

    With ``min_size``, the smallest level whose sides are at least that and whose
    pixels fit ``limit``; else the largest level that fits; else the smallest
    level read at every k-th row and column so that it fits.
    """
    levels = sorted([full, *overviews], key=lambda p: -_pixels(p, path))
    fits = [p for p in levels if _pixels(p, path) <= limit]
    if min_size is not None:
        big_enough = [p for p in fits if min(_page_hw(p, path)) >= min_size]
        if big_enough:
            page = big_enough[-1]
            return page, levels.index(page), (1, 1)
    if fits:
        return fits[0], levels.index(fits[0]), (1, 1)
    page = levels[-1]
    return page, levels.index(page), _steps(*_page_hw(page, path), limit)


def _steps(h: int, w: int, limit: int) -> tuple[int, int]:
    """Row and column steps so that ceil(h/ky) * ceil(w/kx) <= limit, about
    equal unless one side is too short to share the reduction (1 x 1e9)."""
    k = max(1, math.ceil(math.sqrt(h * w / limit)))
    ky = kx = k
    ow = -(-w // kx)
    ky = max(ky, -(-h // max(1, limit // ow)))
    oh = -(-h // ky)
    kx = max(kx, -(-w // max(1, limit // oh)))
    return ky, kx


def _pixels(page: Any, path: Path) -> int:
    h, w = _page_hw(page, path)
    return h * w


def _read_page(
    page: Any,
    ky: int,
    kx: int,
    budget: Budget,
    path: Path,
    window: tuple[int, int, int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every ky-th row and kx-th column of a page (of ``window``: x0, y0, width,
    height, clipped to the page, when given), as (samples, rows, cols), and where
    the file holds pixel data (False under an empty strip or tile).

    Only the strips or tiles that hold a sampled pixel are read, one at a time;
    their declared decoded sizes are checked against ``budget`` first.
    """
    h, w = _page_hw(page, path)
    wx0, wy0, ww, wh = window or (0, 0, w, h)
    wx1, wy1 = min(w, wx0 + ww), min(h, wy0 + wh)
    spp = _single_int(page.samplesperpixel, "SamplesPerPixel", path)
    itemsize = np.dtype(page.dtype).itemsize
    separate = page.planarconfig == 2 and spp > 1
    planes, contig = (spp, 1) if separate else (1, spp)
    if page.is_tiled:
        th, tw = int(page.tilelength), int(page.tilewidth)
        if th < 1 or tw < 1:
            raise BadRasterError(path, "declares tiles of size 0")
    else:
        th = min(max(1, int(page.rowsperstrip or h)), h)
        tw = w
    rows_of, cols_of = -(-h // th), -(-w // tw)
    per_plane = rows_of * cols_of
    offsets, counts = page.dataoffsets, page.databytecounts
    if len(offsets) < planes * per_plane or len(counts) < planes * per_plane:
        raise BadRasterError(
            path,
            f"declares {min(len(offsets), len(counts))} strip(s)/tile(s) (with "
            f"their byte counts) where its size needs "
            f"{planes * per_plane}",
        )
    seg_bytes = th * tw * contig * itemsize  # decoded, tiles at full size
    if seg_bytes > budget.segment:
        raise BadRasterError(
            path,
            f"one {'tile' if page.is_tiled else 'strip'} decodes to "
            f"{_mb(seg_bytes)}, above the {_mb(budget.segment)} one may take "
            f"(a quarter of the memory budget, {budget.max_memory_mb} MB: "
            "cmae train --max-memory)",
        )
    # The segments a read decodes, counted before they are listed: a sample in
    # every segment spanned, or one per segment at most where the step is the
    # larger (4 million one-byte strips must not be listed to be refused).
    spans = [
        min(len(range(lo, hi, k)), (hi - 1) // size - lo // size + 1)
        for lo, hi, k, size in ((wy0, wy1, ky, th), (wx0, wx1, kx, tw))
    ]
    if planes * spans[0] * spans[1] > MAX_SEGMENTS:
        raise BadRasterError(
            path,
            f"reading it would decode {planes * spans[0] * spans[1]:,} strips or "
            f"tiles, more than the {MAX_SEGMENTS:,} a raster may",
        )
    # Only the segment rows and columns the window spans are looked at: a chip
    # of a 20,000 px scene touches 4 of its 6,400 tiles, and testing every one
    # took a third of the chip's read.
    rows = [
        r
        for r in range(wy0 // th, (wy1 - 1) // th + 1)
        if _hits(r * th, th, wy0, wy1, ky)
    ]
    if not rows:  # nothing to read (and a 0-row page must not walk its columns)
        return np.zeros((spp, 0, 0), page.dtype), np.zeros((0, 0), bool)
    cols = [
        c
        for c in range(wx0 // tw, (wx1 - 1) // tw + 1)
        if _hits(c * tw, tw, wx0, wx1, kx)
    ]
    needed = [
        p * per_plane + r * cols_of + c
        for p in range(planes)
        for r in rows
        for c in cols
    ]
    compression = int(page.keyframe.compression)
    cost = _DECODE_COST.get(compression, 1)
    if len(needed) * seg_bytes * cost > budget.decoded:
        name = _CODESTREAMS[compression] if cost > 1 else ""
        slow = (
            f", {name} data counted {cost} times (slow to decode)" if cost > 1 else ""
        )
        raise BadRasterError(
            path,
            f"reading it would decode {_mb(len(needed) * seg_bytes)}, above the "
            f"{_mb(budget.decoded)} a raster may (four times the memory budget: "
            f"cmae train --max-memory){slow}",
        )
    oh, ow = -(-(wy1 - wy0) // ky), -(-(wx1 - wx0) // kx)
    out = np.zeros((spp, oh, ow), dtype=page.dtype)
    present = np.zeros((oh, ow), dtype=bool)
    data = [i for i in needed if offsets[i] and counts[i]]
    if not data:
        return out, present
    if max(counts[i] for i in data) > budget.segment:
        raise BadRasterError(
            path, f"a strip or tile holds over {_mb(budget.segment)} of data"
        )
    blocks: dict[int, np.ndarray] = {}
    ident = None
    if window is not None:  # chips: neighbours share strips and tiles
        st = os.fstat(page.parent.filehandle.fileno())  # what is read
        ident = (str(path), st.st_size, st.st_mtime_ns, page.offset)
        for i in data:
            block = _SEGMENTS.get((*ident, i))
            if block is not None:
                blocks[i] = block
        data = [i for i in data if i not in blocks]
    keyframe = page.keyframe
    check = _codestream_check(
        page, path, (h, w) if keyframe.compression == 6 else (th, tw)
    )
    decodeargs: dict[str, Any] = {"_fullsize": page.is_tiled}
    if keyframe.compression in {6, 7, 34892, 33007}:  # JPEG, as tifffile does
        decodeargs["jpegtables"] = page.jpegtables
        decodeargs["jpegheader"] = keyframe.jpegheader
    fh = page.parent.filehandle
    decoded_bytes = 0
    segments = fh.read_segments(
        [offsets[i] for i in data], [counts[i] for i in data], indices=data,
        sort=True, flat=True, buffersize=min(budget.segment, 8 << 20),
    ) if data else ()  # fmt: skip
    for raw, i in itertools.chain(((None, i) for i in blocks), segments):
        block = blocks.get(i)
        if block is None:
            if raw is None:
                continue
            check(raw)
            decoded, _, shape = keyframe.decode(raw, i, **decodeargs)
            if decoded is None:
                continue
            decoded_bytes += np.asarray(decoded).nbytes
            if decoded_bytes > budget.decoded:  # what is decoded, not declared
                raise BadRasterError(
                    path,
                    f"decoding it took over {_mb(budget.decoded)} (four times "
                    "the memory budget: cmae train --max-memory)",
                )
            block = np.asarray(decoded).reshape(shape)[0]  # (rows, cols, contig)
            if ident is not None:
                _SEGMENTS.put((*ident, i), block)
        plane, r = divmod(i, per_plane)
        y0, x0 = (r // cols_of) * th, (r % cols_of) * tw
        ys = _picked(y0, th, wy0, wy1, ky)  # rows of the block sampled
        xs = _picked(x0, tw, wx0, wx1, kx)
        if not len(ys) or not len(xs):
            continue
        if block.shape[0] <= ys[-1] or block.shape[1] <= xs[-1]:
            raise BadRasterError(
                path, "a strip or tile holds fewer pixels than the file declares"
            )
        oy, ox = (y0 + ys[0] - wy0) // ky, (x0 + xs[0] - wx0) // kx
        part = block[ys.start : ys.stop : ky, xs.start : xs.stop : kx]  # a view
        s0 = plane if separate else 0
        target = out[s0 : s0 + part.shape[2], oy : oy + len(ys), ox : ox + len(xs)]
        target[...] = part.transpose(2, 0, 1)
        present[oy : oy + len(ys), ox : ox + len(xs)] = True
    return out, present


def _codestream_check(
    page: Any, path: Path, segment: tuple[int, int]
) -> Callable[[bytes], None]:
    """What refuses a strip's or tile's compressed data whose own header
    declares an image larger than the ``segment`` (height, width) it stands for
    (the whole page for old-style JPEG): image codecs decode to the size they
    declare, so a 216-byte JPEG declaring 60000 x 60000 would take 3.6 GB."""
    compression = int(page.keyframe.compression)
    if compression not in _CODESTREAMS:
        return lambda raw: None
    lerc = tuple(page.tags.valueof(50674) or ())  # LercParameters
    kind = "tile" if page.is_tiled else "strip"
    name = _CODESTREAMS[compression]

    def check(raw: bytes) -> None:
        size = declared_size(compression, raw, lerc)
        if size is not None and (size[0] > segment[0] or size[1] > segment[1]):
            raise BadRasterError(
                path,
                f"a {kind}'s {name} data declares {size[1]}x{size[0]} pixels, "
                f"more than the {segment[1]}x{segment[0]} {kind} it stands for",
            )

    return check


# Decoding work per decoded byte, against the deflate-like codecs': a raster may
# decode budget.decoded / cost. JPEG 2000 decoded 16 tiles within the plain
# decode cap in 73 s on an idle machine; JPEG XL is of its kind.
_DECODE_COST = {
    **dict.fromkeys(codestreams.JPEG2000, 16),
    **dict.fromkeys(codestreams.JPEGXL, 16),
    **dict.fromkeys(codestreams.WEBP, 4),
}
_CODESTREAMS = {
    **dict.fromkeys(codestreams.JPEG, "JPEG"),
    **dict.fromkeys(codestreams.JPEG2000, "JPEG 2000"),
    codestreams.PNG: "PNG",
    **dict.fromkeys(codestreams.WEBP, "WebP"),
    codestreams.LERC: "LERC",
    **dict.fromkeys(codestreams.JPEGXL, "JPEG XL"),
}


class _SegmentCache:
    """Decoded strips and tiles of windowed reads, least recently used dropped
    first, within ``max_bytes`` per process. Keyed by the file's path, size and
    mtime, the page and the segment, so a changed file is decoded again.
    Chips of 224 px on a scene of 256 px tiles touch 3 to 4 tiles each, most
    shared with a neighbour: decoding them again took a fifth of each chip's
    read."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.nbytes = max_bytes, 0
        self.blocks: collections.OrderedDict[tuple, np.ndarray] = (
            collections.OrderedDict()
        )

    def get(self, key: tuple) -> np.ndarray | None:
        block = self.blocks.get(key)
        if block is not None:
            self.blocks.move_to_end(key)
        return block

    def put(self, key: tuple, block: np.ndarray) -> None:
        if block.nbytes > self.max_bytes // 8:
            return
        block.flags.writeable = False  # shared by later reads: never changed
        self.blocks[key] = block
        self.nbytes += block.nbytes
        while self.nbytes > self.max_bytes:
            _, old = self.blocks.popitem(last=False)
            self.nbytes -= old.nbytes


# 32 MB a process: one row of 256 px int16 tiles across a 65,000 px scene
# (two rows up to 32,000 px, where a chip row reuses the row above).
_SEGMENTS = _SegmentCache(32 << 20)


def _picked(start: int, length: int, lo: int, hi: int, step: int) -> range:
    """Offsets within the segment [start, start + length) of the pixels of the
    window [lo, hi) that are read: lo, lo + step, ..."""
    first = max(start, lo)
    first += (lo - first) % step  # the next pixel on the window's grid
    return range(first - start, min(start + length, hi) - start, step)


def _hits(start: int, length: int, lo: int, hi: int, step: int) -> bool:
    """Whether the segment [start, start + length) holds a pixel that is read."""
    return len(_picked(start, length, lo, hi, step)) > 0


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{n / 2**10:,.0f} kB"


def _gdal_nodata(page: Any) -> float | None:
    tag = page.tags.get(42113)  # GDAL_NODATA, ASCII
    if tag is None:
        return None
    text = str(tag.value).strip().strip("\x00").strip()
    try:
        return float(text)
    except ValueError:
        log.warning(
            "%s: ignoring unparsable GDAL_NODATA %r", page.parent.filename, text
        )
        return None


def _equals_nodata(arr: np.ndarray, value: float) -> np.ndarray | None:
    """Where ``arr`` holds ``value`` as GDAL compares it: cast to the data type,
    and for floats within GDAL's ``ARE_REAL_EQUAL`` (a few float32 steps, as
    ``|a - b| < 2 eps32 |a + b|``), so a float64 raster's overview that stores
    its nodata rounded through float32 (-1.2676506002282294e30 under a tag of
    -1.26765060000000006e30, rio-tiler's full-earth COG) is still nodata.

    Returns None when the value cannot occur in that type (e.g. -9999 in uint8),
    and for NaN, which the finite check covers.
    """
    if math.isnan(value):
        return None
    dt = arr.dtype
    if dt.kind in "iu":
        info = np.iinfo(dt)
        if value != int(value) if math.isfinite(value) else True:
            return None
        if not info.min <= value <= info.max:
            return None
        return arr == dt.type(int(value))
    if dt.kind == "f":
        with np.errstate(over="ignore"):
            cast = dt.type(value)
        if not np.isfinite(cast):
            return None
        tolerance = 4 * float(np.finfo(np.float32).eps) * abs(float(cast))
        if tolerance == 0:
            return arr == cast
        with np.errstate(over="ignore", invalid="ignore"):
            return np.abs(arr - cast) <= dt.type(tolerance)
    if dt.kind == "b":
        return arr == bool(value)
    return None


# ----------------------------------------------------------------- georeferencing
def _geo_info(page: Any, height: int, width: int) -> GeoInfo:
    """Georeferencing from the GeoTIFF tags; malformed tags give none (the
    pixels are still read), never an error."""
    try:
        return _parse_geo(page, height, width)
    except Exception as e:  # GeoKeys of any shape: no georeferencing, no failure
        log.debug("%s: unreadable georeferencing: %s", page.parent.filename, e)
        return GeoInfo()


def _parse_geo(page: Any, height: int, width: int) -> GeoInfo:
    tags = page.tags
    keys: dict[str, Any] = {}
    if 34735 in tags:
        try:
            keys = dict(page.geotiff_tags or {})
        except Exception as e:  # malformed GeoKeys must not lose the pixels
            log.debug("%s: unreadable GeoKeys: %s", page.parent.filename, e)
    transform = _transform(tags, keys)
    geo = GeoInfo()
    if transform is not None:
        c, a, b, f, d, e = transform
        if int(keys.get("GTRasterTypeGeoKey", 1)) == 2:  # PixelIsPoint: GDAL's shift
            c, f = c - 0.5 * a - 0.5 * b, f - 0.5 * d - 0.5 * e
        geo.transform = (c, a, b, f, d, e)
        geo.pixel_size = (math.hypot(a, d), math.hypot(b, e))
        xs = [
            c + a * i + b * j
            for i, j in ((0, 0), (width, 0), (0, height), (width, height))
        ]
        ys = [
            f + d * i + e * j
            for i, j in ((0, 0), (width, 0), (0, height), (width, height))
        ]
        geo.bounds = (min(xs), min(ys), max(xs), max(ys))
    model = int(keys.get("GTModelTypeGeoKey", 0) or 0)
    projected = int(keys.get("ProjectedCSTypeGeoKey", 0) or 0)
    geographic = int(keys.get("GeographicTypeGeoKey", 0) or 0)
    if model == 1:
        geo.crs_kind = "projected"
        unit = int(keys.get("ProjLinearUnitsGeoKey", 9001) or 9001)
        geo.linear_unit_m = _LINEAR_UNITS_M.get(unit)
        if projected and projected != _USER_DEFINED:
            geo.epsg = projected
    elif model == 2:
        geo.crs_kind = "geographic"
        if geographic and geographic != _USER_DEFINED:
            geo.epsg = geographic
    if geo.epsg is not None:
        geo.crs = f"EPSG:{geo.epsg}"
    elif geo.crs_kind is not None:
        citation = keys.get("PCSCitationGeoKey") or keys.get("GTCitationGeoKey")
        geo.crs = str(citation) if citation else "user-defined"
    return geo


def _transform(tags: Any, keys: dict[str, Any]) -> tuple[float, ...] | None:
    """The affine geotransform in GDAL order, from the GeoTIFF model tags; None
    when they are missing, too short, or not finite numbers."""
    m = _numbers(tags.get(34264))  # ModelTransformationTag
    if len(m) >= 8:
        t = (m[3], m[0], m[1], m[7], m[4], m[5])
        return t if all(math.isfinite(v) for v in t) else None
    scale = _numbers(tags.get(33550))  # ModelPixelScaleTag
    tie = _numbers(tags.get(33922))  # ModelTiepointTag
    if len(tie) < 6 or len(scale) < 2:
        return None
    sx, sy = scale[0], scale[1]
    i, j, _, x, y, _ = tie[:6]
    if not (sx > 0 and sy > 0) or not all(math.isfinite(v) for v in (i, j, x, y)):
        return None
    return (x - i * sx, sx, 0.0, y + j * sy, 0.0, -sy)


def _numbers(tag: Any) -> list[float]:
    """A numeric tag's values as floats (one value or many); [] when absent or
    not numbers."""
    if tag is None:
        return []
    try:
        return [float(v) for v in np.atleast_1d(np.asarray(tag.value, dtype=float))]
    except (TypeError, ValueError):
        return []


def ground_extent_m(info: RasterInfo) -> tuple[float, float]:
    """The raster's (height, width) on the ground in metres.

    Projected CRS: pixel size times the CRS unit; Web Mercator is corrected by
    cos(latitude) at the raster's centre. Geographic CRS: degrees converted at the
    raster's centre latitude on the WGS84 ellipsoid.

    Raises:
        BadRasterError: without usable georeferencing.
    """
    geo = info.geo
    if geo.pixel_size is None or geo.bounds is None or geo.crs_kind is None:
        raise BadRasterError(
            info.path, "has no usable georeferencing (needed for --scale ground)"
        )
    px, py = geo.pixel_size
    h_units, w_units = info.height * py, info.width * px
    minx, miny, maxx, maxy = geo.bounds
    if geo.crs_kind == "geographic":
        lat = math.radians(min(max((miny + maxy) / 2, -90.0), 90.0))
        # Metres per degree on WGS84 (series expansion, accurate to ~1 cm).
        m_lat = 111132.92 - 559.82 * math.cos(2 * lat) + 1.175 * math.cos(4 * lat)
        m_lon = 111412.84 * math.cos(lat) - 93.5 * math.cos(3 * lat)
        return h_units * m_lat, w_units * abs(m_lon)
    if geo.linear_unit_m is None:
        raise BadRasterError(
            info.path,
            "has a projected CRS in an unknown unit (needed for --scale ground)",
        )
    h_m, w_m = h_units * geo.linear_unit_m, w_units * geo.linear_unit_m
    if geo.epsg in _WEB_MERCATOR:
        y = (miny + maxy) / 2 * geo.linear_unit_m
        y = min(max(y / 6378137.0, -700.0), 700.0)  # math.exp overflows past ~709
        lat = 2 * math.atan(math.exp(y)) - math.pi / 2
        h_m, w_m = h_m * math.cos(lat), w_m * math.cos(lat)
    if not (math.isfinite(h_m) and math.isfinite(w_m) and h_m > 0 and w_m > 0):
        raise BadRasterError(
            info.path, "has a ground size that is not a positive number (damaged "
            "georeferencing; needed for --scale ground)"
        )  # fmt: skip
    return h_m, w_m


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


def header(path: str | os.PathLike[str]) -> tuple[int, int, int, GeoInfo]:
    """(height, width, bands, georeferencing) of a TIFF's full-resolution image,
    from its header only (bands without an alpha band).

    Raises:
        BadRasterError: the file is missing, not a TIFF, or holds no image.
    """
    h, w, geo, bands = _header(Path(path), with_geo=True)
    return h, w, bands, geo  # type: ignore[return-value]


def _header(path: Path, with_geo: bool) -> tuple[int, int, GeoInfo | None, int]:
    with open_checked(path, Budget(DEFAULT_MAX_MEMORY_MB)) as f:
        return _header_open(f, path, with_geo)


def _header_open(
    f: BinaryIO, path: Path, with_geo: bool
) -> tuple[int, int, GeoInfo | None, int]:
    try:
        with tifffile.TiffFile(f) as tif:
            images = [p for p in _list_pages(tif) if not p.subfiletype & _FILETYPE_MASK]
            full = next(
                (p for p in images if not p.subfiletype & _FILETYPE_REDUCED), None
            )
            if full is None:
                raise BadRasterError(path, "TIFF holds no image")
            h, w = _page_hw(full, path)
            bands = int(full.samplesperpixel) - int(_alpha_index(full) is not None)
            return h, w, _geo_info(full, h, w) if with_geo else None, bands
    except BadRasterError:
        raise
    except Exception as e:  # tifffile raises many types; keep the reason
        raise BadRasterError(path, f"cannot decode TIFF: {_reason(e)}") from e
