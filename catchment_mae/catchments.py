"""The real-terrain benchmark: catchments delineated from real DEMs, and
windows of the same DEMs.

:func:`write_catchment_benchmark` routes the flow over each georeferenced DEM
of a folder (pyflwdir's D8 from the DEM, its depressions filled), picks outlets
just above confluences, spread over the sizes the DEM holds (one per
doubling of the upstream area, up to ``per_dem``), and writes each catchment as
its own GeoTIFF: the bounding box of its cells, nodata outside its outline, the
source's georeferencing. Catchments whose box is large enough are also written
at 2x and 4x coarser resolution (valid-weighted block means), as a user's
archive holds the same land at several resolutions.

``OUT/labels.csv`` holds, per raster: ``path``; ``dem`` (the source file);
``group`` (the DEM and its top-level basin: rows of one basin never fall on both
sides of a split); ``copy_of`` (a coarser copy's original, empty for an
original); ``log10_resolution_m``; and the catchment's attributes computed on
the original with its true ground spacing (:mod:`catchment_mae.geomorph`),
repeated on its copies (the same land).

:func:`write_windows` cuts square windows of the same DEMs instead (tiles of an
archive rather than catchments), with the same copies and labels.

Delineating needs pyflwdir (``pip install 'catchment-mae[catchments]'``).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from catchment_mae.errors import BadRasterError, CmaeError
from catchment_mae.geomorph import attributes, spacing_m
from catchment_mae.raster import Raster, find_tiffs, read_raster
from catchment_mae.terrain import block_mean, write_labels, write_like

log = logging.getLogger(__name__)

MIN_CELLS = 400  # the smallest catchment: 20 x 20 pixels' worth
MAX_SHARE = 0.5  # the largest: half the DEM's valid cells
MIN_COPY_SIDE = 16  # a coarser copy keeps at least this many pixels a side
CONFLUENCE = (
    1.25  # an outlet's downstream cell drains this much more: a tributary joins
)


def write_catchment_benchmark(
    src_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    per_dem: int = 10,
    factors: tuple[int, ...] = (2, 4),
    min_cells: int = MIN_CELLS,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Writes the catchments of every DEM of ``src_dir`` and ``labels.csv`` to
    ``out_dir``; returns the label rows and one line per DEM left out (not
    georeferenced, unreadable, too large to read whole, no catchment)."""
    try:
        import pyflwdir  # noqa: F401
    except ImportError as e:
        raise CmaeError(
            "delineating catchments needs pyflwdir: "
            "pip install 'catchment-mae[catchments]'"
        ) from e
    return _each_dem(src_dir, out_dir, seed, _dem_catchments, per_dem, factors,
                     min_cells)  # fmt: skip


def write_windows(
    src_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    per_dem: int = 10,
    factors: tuple[int, ...] = (2, 4),
    seed: int = 0,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Writes square windows of every DEM of ``src_dir`` (64-512 px a side,
    drawn log-uniformly where they fit, at least half of them valid, none
    overlapping another), each at
    2x and 4x coarser too, with ``labels.csv`` as the catchments' (``group``:
    the window and its copies; the attributes those of the window's valid
    pixels, its length measured from its lowest one): what a tile of an
    archive is, beside the catchments. numpy only."""
    return _each_dem(src_dir, out_dir, seed, _dem_windows, per_dem, factors)


def _each_dem(
    src_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    seed: int,
    cut: Any,
    *args: Any,
) -> tuple[list[dict[str, Any]], list[str]]:
    """``cut(path, rel, out, *args, rng)`` on each DEM of ``src_dir``, and
    ``labels.csv`` of the rows it returns."""
    src, out = Path(src_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    # Listed before anything is written: an OUT inside the source folder is
    # never read as a DEM.
    inside = out.resolve()
    dems = [p for p in find_tiffs(src) if inside not in p.resolve().parents]
    for number, path in enumerate(dems):
        rel = path.relative_to(src).as_posix()
        rng = np.random.default_rng([seed, number])
        try:
            rows += cut(path, rel, out, *args, rng)
        except BadRasterError as e:
            skipped.append(f"{rel}: {e.reason}")
    if rows:
        write_labels(out / "labels.csv", rows)
    return rows, skipped


def _read_dem(path: Path) -> tuple[Raster, float, float]:
    """The DEM's first band, whole, and its ground spacing (dy, dx) in metres."""
    raster = read_raster(path, bands=[1])
    if raster.info.level != 0 or raster.info.geo.transform is None:
        raise BadRasterError(path, "not georeferenced, or too large to read whole")
    dy, dx = spacing_m(raster)
    return raster, dy, dx


def _write_piece(
    path: Path,
    raster: Raster,
    out: Path,
    name: str,
    box: tuple[int, int, int, int],
    inside: np.ndarray,
    factors: tuple[int, ...],
    label: dict[str, Any],
    outlet: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """Writes the DEM's pixels in ``box`` (y0, y1, x0, x1) where ``inside`` (of
    the box's shape) and the DEM has data, as ``NAME_x1.tif`` and its coarser
    copies; their label rows (``label`` + copy_of, resolution, attributes)."""
    dy, dx = spacing_m(raster)
    y0, y1, x0, x1 = box
    z = raster.data[0, y0:y1, x0:x1].astype(np.float64)
    valid = inside & raster.valid[y0:y1, x0:x1]
    attrs = attributes(z, valid, dy, dx, outlet=outlet)
    c, a, b, f, d, e = raster.info.geo.transform  # type: ignore[misc]
    corner = (c + a * x0 + b * y0, f + d * x0 + e * y0)
    original = f"{name}_x1.tif"
    rows = []
    for k in (1, *factors):
        if k > 1 and min(z.shape) // k < MIN_COPY_SIDE:
            break
        data = block_mean(z, valid, k) if k > 1 else np.where(valid, z, np.nan)
        dst = f"{name}_x{k}.tif"
        write_like(path, out / dst, data, (corner[0], a * k, b * k, corner[1],
                   d * k, e * k))  # fmt: skip
        rows.append(
            {
                "path": dst,
                **label,
                "copy_of": "" if k == 1 else original,
                "log10_resolution_m": round(math.log10(math.sqrt(dy * dx) * k), 6),
                **{key: round(v, 6) for key, v in attrs.items()},
            }
        )
    return rows


def _dem_catchments(
    path: Path,
    rel: str,
    out: Path,
    per_dem: int,
    factors: tuple[int, ...],
    min_cells: int,
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    import pyflwdir

    raster, dy, dx = _read_dem(path)
    z, valid = raster.data[0].astype(np.float64), raster.valid
    nodata = -1e30
    flw = pyflwdir.from_dem(
        np.where(valid, z, nodata), nodata=nodata, transform=(dx, 0, 0, 0, -dy, 0)
    )
    upa = flw.upstream_area(unit="cell").ravel()
    top = flw.basins().ravel()
    outlets = _outlets(upa, flw.idxs_ds, int(valid.sum()), per_dem, min_cells, rng)
    if not outlets:
        raise BadRasterError(path, f"holds no catchment of {min_cells} cells or more")
    stem = rel.replace("/", "__").rsplit(".", 1)[0]
    rows: list[dict[str, Any]] = []
    for idx in outlets:
        inside = flw.basins(idxs=np.array([idx])) > 0
        ys, xs = np.nonzero(inside)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        oy, ox = divmod(int(idx), z.shape[1])
        rows += _write_piece(
            path, raster, out, f"{stem}__{idx}", (y0, y1, x0, x1),
            inside[y0:y1, x0:x1], factors, {"dem": rel, "group": f"{rel}:{top[idx]}"},
            outlet=(oy - y0, ox - x0),
        )  # fmt: skip
    log.info("%s: %d catchment(s)", rel, len(outlets))
    return rows


WINDOW_SIDES = (64, 512)  # pixels, the smallest and largest window
MIN_WINDOW_VALID = 0.5  # a window holds at least this share of valid pixels


def _dem_windows(
    path: Path,
    rel: str,
    out: Path,
    per_dem: int,
    factors: tuple[int, ...],
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    raster, _, _ = _read_dem(path)
    h, w = raster.valid.shape
    largest = min(WINDOW_SIDES[1], h, w)
    if largest < WINDOW_SIDES[0]:
        raise BadRasterError(path, f"is smaller than {WINDOW_SIDES[0]} px a side")
    stem = rel.replace("/", "__").rsplit(".", 1)[0]
    rows: list[dict[str, Any]] = []
    taken = np.zeros((h, w), bool)  # windows never overlap: no pixel on both sides
    lo, hi = math.log(WINDOW_SIDES[0]), math.log(largest)
    for n in range(per_dem * 20):  # draws until per_dem windows hold enough data
        if len(rows) and len({r["group"] for r in rows}) == per_dem:
            break
        side = int(round(math.exp(rng.uniform(lo, hi))))
        y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        box = (y0, y0 + side, x0, x0 + side)
        if taken[y0 : y0 + side, x0 : x0 + side].any():
            continue
        if raster.valid[y0 : y0 + side, x0 : x0 + side].mean() < MIN_WINDOW_VALID:
            continue
        taken[y0 : y0 + side, x0 : x0 + side] = True
        inside = np.ones((side, side), bool)
        rows += _write_piece(path, raster, out, f"{stem}__w{n}", box, inside, factors,
                             {"dem": rel, "group": f"{rel}:w{n}"})  # fmt: skip
    if not rows:
        raise BadRasterError(path, "holds no window with enough valid pixels")
    log.info("%s: %d window(s)", rel, len({r["group"] for r in rows}))
    return rows


def _outlets(
    upa: np.ndarray,
    downstream: np.ndarray,
    cells: int,
    per_dem: int,
    min_cells: int,
    rng: np.random.Generator,
) -> list[int]:
    """Outlets just above a confluence (where a tributary joins), at most one per
    doubling of the upstream area, ``per_dem`` doublings spread over the range
    the DEM holds, each drawn at random within its doubling."""
    n = np.arange(upa.size)
    own = np.maximum(upa, 1.0)
    joined = (downstream != n) & (upa[downstream] >= CONFLUENCE * own)
    cand = np.nonzero(joined & (upa >= min_cells) & (upa <= MAX_SHARE * cells))[0]
    if cand.size == 0:
        return []
    octave = np.floor(np.log2(upa[cand])).astype(int)
    present = np.unique(octave)
    if present.size > per_dem:  # spread the choice over the whole range
        present = present[np.unique(np.linspace(0, present.size - 1, per_dem).round())
                          .astype(int)]  # fmt: skip
    return sorted(int(rng.choice(cand[octave == o])) for o in present)
