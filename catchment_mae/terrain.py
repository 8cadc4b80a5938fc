"""Labelled rasters for ``cmae eval``: terrain families at several resolutions, and
down-sampled copies of real DEMs.

:func:`generate_labelled` draws terrains of four families that differ in the
process that makes them, each over a ground extent of 1.5-40 km, and renders each
terrain at two or three of the ground resolutions 5, 10, 30 and 90 m (the same
terrain, so its renderings share a ``group``: a split never puts one on each
side). The surfaces are self-similar: nothing in a raster's pixels says how large
it is on the ground, only its scale input can. ``OUT/labels.csv`` holds ``path``
(relative to OUT, as in the embeddings table), ``family``, ``resolution_m``,
``log_extent`` (natural log of the geometric-mean side in metres) and ``group``.

:func:`write_scale_copies` writes each DEM of a directory with its x2 and x4
down-sampled copies (valid-weighted block means, georeferencing scaled), for the
label-free check: is a raster's nearest neighbour one of its own copies?

numpy and tifffile only.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from catchment_mae.errors import BadRasterError, OutputError
from catchment_mae.io import atomic_output
from catchment_mae.preprocess import resize_weights
from catchment_mae.raster import Raster, find_tiffs, read_raster
from catchment_mae.synth import (
    DemSpec,
    catchment_mask,
    check_request,
    fractal_surface,
    write_dem,
)

log = logging.getLogger(__name__)

FAMILIES = ("alpine", "hills", "plateau", "floodplain")
RESOLUTIONS_M = (5.0, 10.0, 30.0, 90.0)
EXTENT_M = (1_500.0, 40_000.0)  # geometric-mean side, drawn log-uniformly
NODATA = -9999.0
LABEL_COLUMNS = ("path", "family", "resolution_m", "log_extent", "group")


def terrain(
    family: str, height: int, width: int, rng: np.random.Generator
) -> np.ndarray:
    """Elevations in metres of one family's terrain on a ``height x width`` grid.

    alpine: ridged fractal relief of 1-2.5 km; hills: a smooth fractal of 80-300 m;
    plateau: a flat top cut by steep-sided valleys 150-400 m deep; floodplain: a
    few metres of tilt with a meandering channel and its levees.
    """
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    if family == "alpine":
        f = fractal_surface(height, width, rng, beta=2.5)
        ridged = (1.0 - np.abs(2.0 * f - 1.0)) ** 2
        return rng.uniform(1500, 3000) + rng.uniform(1000, 2500) * ridged
    if family == "hills":
        f = fractal_surface(height, width, rng, beta=3.4)
        return rng.uniform(200, 600) + rng.uniform(80, 300) * f
    if family == "plateau":
        f = fractal_surface(height, width, rng, beta=2.6)
        threshold = rng.uniform(0.35, 0.5)
        cut = np.clip((threshold - f) / 0.06, 0.0, 1.0)  # 1 in a valley floor
        cap = 10.0 * fractal_surface(height, width, rng, beta=3.0)
        return rng.uniform(800, 1500) + cap - rng.uniform(150, 400) * cut**0.5
    if family == "floodplain":
        angle = rng.uniform(0, 2 * np.pi)
        along = np.cos(angle) * xx + np.sin(angle) * yy
        across = -np.sin(angle) * xx + np.cos(angle) * yy
        phase, k = rng.uniform(0, 2 * np.pi), rng.uniform(2, 5)
        centre = across.mean() + 0.08 * np.sin(2 * np.pi * k * along + phase)
        centre += 0.03 * np.sin(2 * np.pi * 2.7 * k * along + 2 * phase)
        d = np.abs(across - centre)
        channel = -rng.uniform(3, 6) * np.exp(-((d / 0.012) ** 2))
        levee = 1.0 * np.exp(-(((d - 0.03) / 0.015) ** 2))
        noise = 1.5 * fractal_surface(height, width, rng, beta=3.0)
        tilt = rng.uniform(2, 10) * (along - along.min())
        return rng.uniform(5, 200) + tilt + channel + levee + noise
    raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")


def resample(z: np.ndarray, valid: np.ndarray, height: int, width: int) -> np.ndarray:
    """``z`` at ``height x width``: the valid-weighted mean under each new pixel
    (the preprocessing's anti-aliased triangle filter); NaN where nothing is valid."""
    wy, wx = resize_weights(z.shape[0], height), resize_weights(z.shape[1], width)
    v = valid.astype(np.float32)
    num = wy @ (np.where(valid, z, 0.0).astype(np.float32) * v) @ wx.T
    den = wy @ v @ wx.T
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den >= 0.5, num / den, np.nan)


@dataclass
class Rendering:
    """One raster of the labelled set: a terrain at one resolution."""

    path: str  # relative to the output directory
    family: str
    resolution_m: float
    log_extent: float
    group: str


def generate_labelled(
    out_dir: str | os.PathLike[str],
    count: int = 48,
    *,
    min_size: int = 32,
    max_size: int = 512,
    seed: int = 0,
) -> list[Rendering]:
    """Writes ``count`` terrains (families in turn), each at 2-3 resolutions, and
    ``labels.csv``; returns the rows of ``labels.csv``."""
    out = check_request(out_dir, count, min_size, max_size)
    rng = np.random.default_rng(seed)
    rows: list[Rendering] = []
    for t in range(count):
        family = FAMILIES[t % len(FAMILIES)]
        extent, aspect, resolutions = _draw_extent(rng, min_size, max_size)
        h_m, w_m = extent * math.sqrt(aspect), extent / math.sqrt(aspect)
        finest = min(resolutions)
        h0, w0 = round(h_m / finest), round(w_m / finest)
        trng = np.random.default_rng([seed, t])
        z = terrain(family, h0, w0, trng)
        inside = catchment_mask(h0, w0, trng)
        spec = _spec(trng, seed * 100_003 + t)
        for res in resolutions:
            h, w = round(h_m / res), round(w_m / res)
            data = resample(z, inside, h, w)
            data = np.where(np.isnan(data), NODATA, data).astype(np.float32)
            name = f"{family}_{t:04d}_{res:g}m.tif"
            write_dem(out / name, DemSpec(**{**spec.__dict__, "height": h,
                      "width": w, "pixel_size": res}), data)  # fmt: skip
            rows.append(
                Rendering(
                    path=name,
                    family=family,
                    resolution_m=res,
                    log_extent=round(0.5 * math.log(h * res * w * res), 6),
                    group=f"t{t:04d}",
                )
            )
    write_labels(out / "labels.csv", rows)
    return rows


def _draw_extent(
    rng: np.random.Generator, min_size: int, max_size: int
) -> tuple[float, float, list[float]]:
    """An extent (m), an aspect and 2-3 resolutions at which the terrain's sides
    lie within [min_size, max_size] pixels (one when only one fits)."""
    lo, hi = (math.log(v) for v in EXTENT_M)
    for _ in range(1000):
        extent = math.exp(rng.uniform(lo, hi))
        aspect = math.exp(rng.uniform(-math.log(1.5), math.log(1.5)))
        sides = (extent * math.sqrt(aspect), extent / math.sqrt(aspect))
        fits = [
            r
            for r in RESOLUTIONS_M
            if min(sides) / r >= min_size and max(sides) / r <= max_size
        ]
        if fits:
            n = min(len(fits), int(rng.integers(2, 4)))
            chosen = rng.choice(fits, size=n, replace=False)
            return extent, aspect, sorted(float(r) for r in chosen)
    raise ValueError(
        f"no extent in {EXTENT_M} m fits {min_size}-{max_size} px at {RESOLUTIONS_M} m"
    )


def _spec(rng: np.random.Generator, seed: int) -> DemSpec:
    zone = int(rng.integers(1, 61))
    return DemSpec(
        height=0,
        width=0,
        pixel_size=0.0,
        epsg=32600 + zone,
        origin=(float(rng.uniform(300_000, 700_000)), float(rng.uniform(1e6, 9e6))),
        dtype="float32",
        nodata=NODATA,
        seed=seed,
    )


def write_labels(path: Path, rows: Iterable[Rendering | dict[str, object]]) -> None:
    """Writes a labels CSV (temp file, then rename)."""
    items = [r.__dict__ if isinstance(r, Rendering) else r for r in rows]
    columns = list(items[0]) if items else list(LABEL_COLUMNS)
    try:
        with atomic_output(path, "w") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(items)
    except OSError as e:
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from e


# ------------------------------------------------------------- scale copies
def write_scale_copies(
    src_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    factors: tuple[int, ...] = (1, 2, 4),
    *,
    min_size: int = 16,
) -> tuple[list[dict[str, object]], list[str]]:
    """Writes every georeferenced TIFF of ``src_dir`` (its first band) at each
    down-sampling factor, with ``labels.csv`` (``path``, ``group`` = the source,
    ``factor``, ``resolution_m``). Returns the label rows and one line for each
    file left out (unreadable, not georeferenced, too small)."""
    src, out = Path(src_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    skipped: list[str] = []
    for path in find_tiffs(src):
        rel = path.relative_to(src).as_posix()
        try:
            raster = read_raster(path, bands=[1])
        except BadRasterError as e:
            skipped.append(str(e))
            continue
        geo = raster.info.geo
        if geo.transform is None or raster.info.level != 0:
            skipped.append(f"{rel}: not georeferenced or read from an overview")
            continue
        if min(raster.data.shape[1:]) // max(factors) < min_size:
            skipped.append(f"{rel}: smaller than {min_size * max(factors)} px")
            continue
        stem = rel.replace("/", "__").rsplit(".", 1)[0]
        for k in factors:
            name = f"{stem}_x{k}.tif"
            _write_copy(path, out / name, raster, k)
            size = geo.pixel_size[0] * k if geo.pixel_size else None
            rows.append({"path": name, "group": rel, "factor": k, "resolution_m": size})
    if rows:
        write_labels(out / "labels.csv", rows)
    return rows, skipped


def block_mean(z: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    """Valid-weighted means over ``k x k`` blocks (edge rows/columns that do not
    fill a block are dropped); NaN where a block holds no valid pixel."""
    h, w = (z.shape[0] // k) * k, (z.shape[1] // k) * k
    v = valid[:h, :w].astype(np.float64)
    num = (np.where(valid[:h, :w], z[:h, :w], 0.0) * v).reshape(h // k, k, w // k, k)
    den = v.reshape(h // k, k, w // k, k).sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num.sum(axis=(1, 3)) / den, np.nan)


def _write_copy(src: Path, dst: Path, raster: Raster, k: int) -> None:
    """The first band down-sampled by ``k``, with the source's GeoKeys and its
    transform scaled by ``k`` (the upper-left corner stays)."""
    z, valid = raster.data[0], raster.valid
    data = block_mean(z, valid, k) if k > 1 else np.where(valid, z, np.nan)
    c, a, b, f, d, e = raster.info.geo.transform  # type: ignore[misc]
    write_like(src, dst, data, (c, a * k, b * k, f, d * k, e * k))


def write_like(
    src: Path, dst: Path, data: np.ndarray, transform: tuple[float, ...]
) -> None:
    """Writes ``data`` (H, W; NaN = nodata) as a float32 GeoTIFF with the GeoKeys
    of ``src`` and ``transform`` (GDAL order, pixel corners, as
    ``GeoInfo.transform``); temp file, then rename."""
    data = np.where(np.isnan(data), NODATA, data).astype(np.float32)
    with tifffile.TiffFile(src) as tif:
        tags = tif.pages.first.tags
        keys = dict(tif.pages.first.geotiff_tags or {})
        geo_tags = []
        for code, kind in ((34735, "H"), (34736, "d"), (34737, "s")):
            if code in tags:
                value = tags[code].value
                value = value if kind == "s" else tuple(np.atleast_1d(value).tolist())
                count = 0 if kind == "s" else len(value)
                geo_tags.append((code, kind, count, value, True))
    c, a, b, f, d, e = transform
    if int(keys.get("GTRasterTypeGeoKey", 1)) == 2:  # PixelIsPoint: back to a centre
        c, f = c + 0.5 * a + 0.5 * b, f + 0.5 * d + 0.5 * e
    matrix = (a, b, 0.0, c, d, e, 0.0, f, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    tmp = dst.with_name(dst.name + ".tmp")
    tifffile.imwrite(
        tmp,
        data,
        photometric="minisblack",
        compression="deflate",
        tile=(256, 256) if min(data.shape) >= 256 else None,
        extratags=[
            (34264, "d", 16, matrix, True),
            *geo_tags,
            (42113, "s", 0, f"{NODATA:g}", True),
        ],
        metadata=None,
    )
    os.replace(tmp, dst)
