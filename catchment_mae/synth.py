"""Synthetic catchment DEM GeoTIFFs: the embedded default data set and test fixtures.

Each file is fractal terrain (spectral synthesis, power-law spectrum) tilted
towards an outlet and cut by a valley, masked to an irregular catchment outline
(nodata outside), and georeferenced in a UTM zone (EPSG:326xx/327xx) with a pixel
size of 5 to 90 m. numpy and tifffile only.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

PIXEL_SIZES_M = (5.0, 10.0, 30.0, 90.0)


@dataclass
class DemSpec:
    """One synthetic DEM: what :func:`write_dem` needs."""

    height: int
    width: int
    pixel_size: float
    epsg: int
    origin: tuple[float, float]  # upper-left x, y in metres
    dtype: str  # "int16" or "float32"
    nodata: float
    seed: int


def fractal_surface(
    height: int, width: int, rng: np.random.Generator, beta: float = 2.4
) -> np.ndarray:
    """Gaussian noise filtered to a 1/f^beta power spectrum, scaled to [0, 1]."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    f = np.sqrt(fy**2 + fx**2)
    f[0, 0] = 1.0
    amplitude = f ** (-beta / 2)
    amplitude[0, 0] = 0.0
    phase = rng.uniform(0, 2 * np.pi, amplitude.shape)
    spectrum = amplitude * rng.standard_normal(amplitude.shape) * np.exp(1j * phase)
    z = np.fft.irfft2(spectrum, s=(height, width))
    z -= z.min()
    return z / max(float(z.max()), 1e-12)


def catchment_mask(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """An irregular, star-shaped catchment outline: True inside."""
    cy = height / 2 * (1 + rng.uniform(-0.1, 0.1))
    cx = width / 2 * (1 + rng.uniform(-0.1, 0.1))
    yy, xx = np.mgrid[0:height, 0:width]
    dy, dx = (yy - cy) / (height / 2), (xx - cx) / (width / 2)
    theta = np.arctan2(dy, dx)
    r = np.hypot(dy, dx)
    radius = np.full_like(theta, rng.uniform(0.7, 0.9))
    for k in range(2, 7):  # a few harmonics make the outline irregular
        radius += rng.uniform(0.05, 0.25) / k * np.cos(k * theta + rng.uniform(0, 6.3))
    return r <= radius


def dem_array(spec: DemSpec) -> np.ndarray:
    """Elevations in metres with nodata outside the catchment, as ``spec.dtype``."""
    rng = np.random.default_rng(spec.seed)
    h, w = spec.height, spec.width
    base = rng.uniform(100, 2500)
    relief = rng.uniform(50, 900) * math.sqrt(spec.pixel_size * max(h, w) / 10_000)
    z = fractal_surface(h, w, rng) * relief
    # Tilt towards an outlet on one edge and carve a valley to it.
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    along = np.cos(angle) * xx + np.sin(angle) * yy
    across = -np.sin(angle) * xx + np.cos(angle) * yy
    z += relief * 0.6 * (along - along.min())
    z -= relief * 0.3 * np.exp(-(((across - across.mean()) / 0.08) ** 2))
    z += base
    inside = catchment_mask(h, w, rng)
    out = np.where(inside, z, spec.nodata)
    return out.astype(spec.dtype)


def random_spec(
    rng: np.random.Generator, min_size: int, max_size: int, seed: int
) -> DemSpec:
    """Draws size (varied, aspect up to 2:1), resolution, UTM zone and dtype."""
    side = float(np.exp(rng.uniform(math.log(min_size), math.log(max_size))))
    aspect = float(np.exp(rng.uniform(-math.log(2), math.log(2))))
    height = int(np.clip(round(side * math.sqrt(aspect)), min_size, max_size))
    width = int(np.clip(round(side / math.sqrt(aspect)), min_size, max_size))
    zone = int(rng.integers(1, 61))
    north = bool(rng.random() < 0.7)
    epsg = (32600 if north else 32700) + zone
    origin = (float(rng.uniform(300_000, 700_000)), float(rng.uniform(1e6, 9e6)))
    dtype = "int16" if rng.random() < 0.5 else "float32"
    nodata = -32768.0 if dtype == "int16" else -9999.0
    return DemSpec(
        height=height,
        width=width,
        pixel_size=float(rng.choice(PIXEL_SIZES_M)),
        epsg=epsg,
        origin=origin,
        dtype=dtype,
        nodata=nodata,
        seed=seed,
    )


def write_dem(
    path: str | os.PathLike[str], spec: DemSpec, data: np.ndarray | None = None
) -> None:
    """Writes a DEM GeoTIFF with GeoKeys, pixel scale, tie point and GDAL_NODATA.

    ``data`` may be (H, W) or (bands, H, W); None draws the DEM from ``spec``.
    """
    if data is None:
        data = dem_array(spec)
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]  # one band: a plain 2-D image
    tiled = min(data.shape[-2:]) >= 256
    tifffile.imwrite(
        path,
        data,
        photometric="minisblack",
        planarconfig="separate" if data.ndim == 3 else None,
        compression="deflate" if spec.seed % 2 else "lzw",
        predictor=True,
        tile=(256, 256) if tiled else None,
        extratags=geotiff_tags(spec),
        metadata=None,
    )


def geotiff_tags(spec: DemSpec) -> list[tuple]:
    """tifffile extratags of a DemSpec: GeoKeys (its UTM zone), pixel scale, tie
    point at its origin, GDAL_NODATA."""
    geokeys = [
        1, 1, 0, 4,  # directory header: version, revision, minor, number of keys
        1024, 0, 1, 1,  # GTModelTypeGeoKey = projected
        1025, 0, 1, 1,  # GTRasterTypeGeoKey = PixelIsArea
        3072, 0, 1, spec.epsg,  # ProjectedCSTypeGeoKey
        3076, 0, 1, 9001,  # ProjLinearUnitsGeoKey = metre
    ]  # fmt: skip
    x0, y0 = spec.origin
    extratags = [
        (33550, "d", 3, (spec.pixel_size, spec.pixel_size, 0.0), True),
        (33922, "d", 6, (0.0, 0.0, 0.0, x0, y0, 0.0), True),
        (34735, "H", len(geokeys), tuple(geokeys), True),
        (42113, "s", 0, f"{spec.nodata:g}", True),
    ]
    return extratags


def check_request(
    out_dir: str | os.PathLike[str], count: int, min_size: int, max_size: int
) -> Path:
    """Checks a request for generated rasters; returns the created ``out_dir``."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not 8 <= min_size <= max_size:
        raise ValueError(f"need 8 <= min_size <= max_size, got {min_size}, {max_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def generate_dems(
    out_dir: str | os.PathLike[str],
    count: int = 32,
    *,
    min_size: int = 48,
    max_size: int = 320,
    seed: int = 0,
    bands: int = 1,
    prefix: str = "catchment",
) -> list[Path]:
    """Writes ``count`` synthetic catchment DEMs to ``out_dir``; returns their paths.

    ``bands`` > 1 stacks independent fractal surfaces inside one catchment outline
    (multi-band test and validation data).
    """
    out = check_request(out_dir, count, min_size, max_size)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        spec = random_spec(rng, min_size, max_size, seed=seed * 100_003 + i)
        path = out / f"{prefix}_{i:04d}.tif"
        write_dem(path, spec, _stack(spec, bands) if bands > 1 else None)
        paths.append(path)
    return paths


def _stack(spec: DemSpec, bands: int) -> np.ndarray:
    layers = [
        dem_array(dataclasses.replace(spec, seed=spec.seed + 7919 * b))
        for b in range(bands)
    ]
    inside = layers[0] != spec.nodata
    return np.stack([np.where(inside, x, spec.nodata) for x in layers]).astype(
        spec.dtype
    )


def generate_multiband(
    out_dir: str | os.PathLike[str],
    count: int,
    bands: int,
    *,
    min_size: int = 48,
    max_size: int = 160,
    seed: int = 0,
) -> list[Path]:
    """Georeferenced rasters with ``bands`` fractal bands each (validation data)."""
    return generate_dems(
        out_dir, count, min_size=min_size, max_size=max_size, seed=seed,
        bands=bands, prefix="raster",
    )  # fmt: skip
