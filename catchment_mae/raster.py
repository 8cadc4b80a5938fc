"""Read a TIFF into a ``(C, H, W)`` float32 array, a validity mask and metadata.

numpy and tifffile (+ imagecodecs) only: the batch runner imports this without torch.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from catchment_mae.errors import BadRasterError, NoInputError

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
DEFAULT_MAX_PIXELS = 100_000_000
# A file declaring more than this many pixels is refused before anything is read:
# even a decimated read would have to visit every one of its tiles.
ABSURD_PIXELS = 1 << 36
# Fewer valid pixels than this cannot describe a shape (1x1, 1x3 rasters).
MIN_PIXELS = 4

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


def find_tiffs(root: str | os.PathLike[str], recursive: bool = True) -> Iterator[Path]:
    """Yields the TIFFs under ``root`` lazily, in sorted path order.

    Follows symlinked directories once each (by device and inode), so a symlink
    loop cannot hang the walk. Raises NoInputError when ``root`` is not a directory.
    """
    root = Path(root)
    if not root.exists():
        raise NoInputError(f"{root}: input directory does not exist")
    if not root.is_dir():
        raise NoInputError(f"{root}: not a directory")
    seen: set[tuple[int, int]] = set()
    yield from _walk(root, recursive, seen)


def _walk(
    directory: Path, recursive: bool, seen: set[tuple[int, int]]
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
        try:
            is_dir = entry.is_dir()  # follows symlinks
        except OSError:
            continue
        if is_dir:
            if recursive:
                yield from _walk(Path(entry.path), recursive, seen)
        elif is_tiff_name(entry.name):
            yield Path(entry.path)


# ----------------------------------------------------------------------- reading
def read_raster(
    path: str | os.PathLike[str],
    *,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    min_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    maxworkers: int | None = 1,
) -> Raster:
    """Reads a TIFF into a float32 ``(C, H, W)`` array and a validity mask.

    Args:
        path: the TIFF file.
        bands: 1-based band numbers to keep, in order (alpha is never a band).
        nodata: a user nodata value, on top of the file's GDAL_NODATA, NaN and inf.
        min_size: when the file has overviews, read the smallest one whose sides
            are both at least this (the model input size); None reads full size.
        max_pixels: above this many pixels, read an overview or a decimated image.
        maxworkers: decoding threads per file (1 inside data-loader workers).

    Raises:
        BadRasterError: naming the file and the reason.
    """
    path = Path(path)
    check_file(path)
    try:
        with tifffile.TiffFile(path) as tif:
            return _read(tif, path, bands, nodata, min_size, max_pixels, maxworkers)
    except BadRasterError:
        raise
    except MemoryError as e:
        raise BadRasterError(path, "too large to read into memory") from e
    except Exception as e:  # tifffile/imagecodecs raise many types; keep the reason
        raise BadRasterError(path, f"cannot decode TIFF: {_reason(e)}") from e


def check_file(path: Path) -> None:
    """Refuses (BadRasterError) a missing, unreadable, non-regular, empty or
    non-TIFF file, from its first bytes, before any decoding."""
    try:
        st = path.stat()
    except FileNotFoundError as e:
        raise BadRasterError(path, "file does not exist") from e
    except OSError as e:
        raise BadRasterError(path, f"cannot open: {e.strerror or e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise BadRasterError(path, "not a regular file")
    if st.st_size == 0:
        raise BadRasterError(path, "empty file (0 bytes)")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise BadRasterError(path, f"cannot open: {e.strerror or e}") from e
    if head not in TIFF_MAGIC:
        raise BadRasterError(path, f"not a TIFF file (starts with {head!r})")


def _reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _read(
    tif: tifffile.TiffFile,
    path: Path,
    bands: Sequence[int] | None,
    user_nodata: float | None,
    min_size: int | None,
    max_pixels: int,
    maxworkers: int | None,
) -> Raster:
    pages = [p for p in tif.pages]
    if not pages:
        raise BadRasterError(path, "TIFF holds no image")
    images = [p for p in pages if not p.subfiletype & _FILETYPE_MASK]
    masks = [p for p in pages if p.subfiletype & _FILETYPE_MASK]
    full = next((p for p in images if not p.subfiletype & _FILETYPE_REDUCED), images[0])
    height, width = _page_hw(full)
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
    spp = int(full.samplesperpixel)
    alpha_index = _alpha_index(full)
    n_bands = spp - (1 if alpha_index is not None else 0)
    band_idx = _select_bands(path, bands, n_bands)

    overviews = [
        p
        for p in images
        if p is not full
        and p.subfiletype & _FILETYPE_REDUCED
        and int(p.samplesperpixel) == spp
        and p.dtype == full.dtype
    ]
    page, level, decimate = _choose_level(full, overviews, min_size, max_pixels)

    if decimate > 1:
        arr = _read_decimated(page, decimate, maxworkers)
    else:
        arr = _to_chw(page.asarray(maxworkers=maxworkers), page)
    rh, rw = arr.shape[1:]

    nodata = _gdal_nodata(full)
    valid = np.ones((rh, rw), dtype=bool)
    has_mask = False
    mask_page = next((m for m in masks if _page_hw(m) == _page_hw(page)), None)
    if mask_page is not None:
        if decimate > 1:
            m = _read_decimated(mask_page, decimate, maxworkers)[0]
        else:
            m = np.asarray(mask_page.asarray(maxworkers=maxworkers)).reshape(rh, rw)
        valid &= m != 0
        has_mask = True
    if alpha_index is not None:
        valid &= arr[alpha_index] != 0
    selected = arr[band_idx]
    for value in (nodata, user_nodata):
        if value is not None:
            hit = _equals_nodata(selected, value)
            if hit is not None:
                valid &= ~hit.any(axis=0)
    with np.errstate(over="ignore"):  # float64 beyond float32 -> inf -> invalid
        data = selected.astype(np.float32, copy=False)
    if data.dtype.kind == "f":
        valid &= np.isfinite(data).all(axis=0)

    info = RasterInfo(
        path=str(path),
        height=height,
        width=width,
        bands=n_bands,
        dtype=str(dtype),
        nodata=nodata if user_nodata is None else user_nodata,
        read_height=rh,
        read_width=rw,
        level=-decimate if decimate > 1 else level,
        has_alpha=alpha_index is not None,
        has_mask=has_mask,
        photometric=full.photometric.name if full.photometric is not None else "",
        geo=_geo_info(full, height, width),
    )
    return Raster(data=data, valid=valid, info=info)


def _page_hw(page: Any) -> tuple[int, int]:
    return int(page.imagelength), int(page.imagewidth)


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
    full: Any, overviews: list[Any], min_size: int | None, max_pixels: int
) -> tuple[Any, int, int]:
    """Returns (page, overview level, decimation factor)."""
    levels = sorted([full, *overviews], key=lambda p: -_pixels(p))
    fits = [p for p in levels if _pixels(p) <= max_pixels]
    if min_size is not None:
        big_enough = [p for p in fits if min(_page_hw(p)) >= min_size]
        if big_enough:
            page = big_enough[-1]
            return page, levels.index(page), 1
    if fits:
        return fits[0], levels.index(fits[0]), 1
    factor = math.ceil(math.sqrt(_pixels(full) / max_pixels))
    return full, 0, factor


def _pixels(page: Any) -> int:
    h, w = _page_hw(page)
    return h * w


def _read_decimated(page: Any, k: int, maxworkers: int | None) -> np.ndarray:
    """Reads every k-th row and column, one tile or strip at a time.

    Memory stays at one segment plus the output, whatever the file's size.
    """
    h, w = _page_hw(page)
    spp = int(page.samplesperpixel)
    out = np.zeros((spp, -(-h // k), -(-w // k)), dtype=page.dtype)
    for segment, (sample, _, y0, x0, _), shape in page.segments(maxworkers=maxworkers):
        if segment is None:
            continue
        seg = np.asarray(segment).reshape(shape)[0]  # (length, width, samples)
        ys = np.arange((-y0) % k, min(shape[1], h - y0), k)
        xs = np.arange((-x0) % k, min(shape[2], w - x0), k)
        if not len(ys) or not len(xs):
            continue
        block = seg[ys][:, xs].transpose(2, 0, 1)  # (samples, ny, nx)
        oy, ox = (y0 + ys[0]) // k, (x0 + xs[0]) // k
        # Planar files give one sample per segment, starting at ``sample``.
        out[sample : sample + block.shape[0], oy : oy + len(ys), ox : ox + len(xs)] = (
            block
        )
    return out


def _to_chw(arr: np.ndarray, page: Any) -> np.ndarray:
    """Orders a page's array as (samples, height, width)."""
    h, w = _page_hw(page)
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[1:] == (h, w):
        return arr
    if arr.ndim == 2:
        return arr[None]
    axes = page.axes
    if arr.ndim == 3 and axes.endswith("S"):
        return np.moveaxis(arr, -1, 0)
    arr = np.squeeze(arr)
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3 and arr.shape[:2] == (h, w):
        return np.moveaxis(arr, -1, 0)
    if arr.ndim == 3 and arr.shape[1:] == (h, w):
        return arr
    raise BadRasterError(page.parent.filehandle.path, f"unsupported layout {axes}")


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
    """Where ``arr`` holds ``value`` as GDAL compares it (cast to the data type).

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
        return arr == cast
    if dt.kind == "b":
        return arr == bool(value)
    return None


# ----------------------------------------------------------------- georeferencing
def _geo_info(page: Any, height: int, width: int) -> GeoInfo:
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
    """The affine geotransform in GDAL order, from the GeoTIFF model tags."""
    matrix = tags.get(34264)  # ModelTransformationTag
    if matrix is not None and len(matrix.value) >= 8:
        m = [float(v) for v in matrix.value]
        return (m[3], m[0], m[1], m[7], m[4], m[5])
    scale = tags.get(33550)  # ModelPixelScaleTag
    tie = tags.get(33922)  # ModelTiepointTag
    if scale is None or tie is None or len(tie.value) < 6 or len(scale.value) < 2:
        return None
    sx, sy = float(scale.value[0]), float(scale.value[1])
    i, j, _, x, y, _ = (float(v) for v in tie.value[:6])
    if sx <= 0 or sy <= 0:
        return None
    return (x - i * sx, sx, 0.0, y + j * sy, 0.0, -sy)


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
        lat = 2 * math.atan(math.exp(y / 6378137.0)) - math.pi / 2
        h_m, w_m = h_m * math.cos(lat), w_m * math.cos(lat)
    return h_m, w_m
