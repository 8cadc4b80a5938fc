"""Chips of large scenes (``embed-dir --tile``): a grid over each raster (no torch).

A chip is a window of the raster's full-resolution pixels; its row in the table
carries the raster's path and size, and the chip's grid place, window, footprint
and nodata fraction. Chips are read one at a time, each decoding only the strips
or tiles it touches, so memory stays flat however large the scene.

Sizes are pixels (``--tile``), or ground metres (``--tile-m``), turned into each
raster's own pixels by the ground rule of ``--scale ground``: a 2,240 m chip is
224 px of a 10 m DEM and 75 px of a 30 m one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from catchment_mae.errors import BadRasterError
from catchment_mae.raster import image_size, pixel_metres

MIN_TILE = 8  # pixels a side, as --tile's minimum


@dataclass(frozen=True)
class Chip:
    """One chip of a raster: its place in the grid and its pixel window."""

    row: int
    col: int
    x0: int
    y0: int
    width: int
    height: int
    last: bool  # the raster's last chip (its rows are then complete)
    error: str | None = None  # the raster cannot be cut as asked: its one row says why

    @property
    def window(self) -> tuple[int, int, int, int]:
        return self.x0, self.y0, self.width, self.height


def grid(length: int, tile: int, stride: int) -> list[int]:
    """Chip starts along one side: every ``stride`` pixels, the last chip
    shifted inside so that it ends at the edge (no chip is padded); one start
    when the side is shorter than a tile."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def chips(
    rels: Iterable[str], root: Path, tile: float, stride: float, metres: bool = False
) -> Iterator[str | tuple[str, Chip]]:
    """Each file's chips, from its header; a file whose header cannot be read
    is passed on whole, and the reader gives it its failure row. With
    ``metres``, ``tile`` and ``stride`` are ground metres; a raster without
    usable georeferencing is one chip carrying the reason."""
    for rel in rels:
        try:
            h, w = image_size(root / rel)
        except BadRasterError:
            yield rel
            continue
        sizes = (int(tile), int(tile)), (int(stride), int(stride))
        if metres:
            try:
                _, _, my, mx = pixel_metres(root / rel)
            except BadRasterError as e:  # no usable georeferencing
                yield rel, Chip(0, 0, 0, 0, 0, 0, last=True, error=e.reason)
                continue
            sizes = _pixels(tile, my, mx), _pixels(stride, my, mx)
            if min(sizes[0]) < MIN_TILE:
                reason = (
                    f"a {tile:g} m chip is {sizes[0][1]}x{sizes[0][0]} of its pixels "
                    f"({mx:.3g} x {my:.3g} m), below the {MIN_TILE} px a chip needs"
                )
                yield rel, Chip(0, 0, 0, 0, 0, 0, last=True, error=reason)
                continue
            sizes = sizes[0], (max(1, sizes[1][0]), max(1, sizes[1][1]))
        for chip in chip_grid(h, w, *sizes):
            yield rel, chip


def _pixels(metres: float, my: float, mx: float) -> tuple[int, int]:
    """A length in ground metres as whole pixels down and across (at least 1)."""
    return max(1, round(metres / my)), max(1, round(metres / mx))


def chip_grid(
    height: int,
    width: int,
    tile: int | tuple[int, int],
    stride: int | tuple[int, int],
) -> list[Chip]:
    """The chips of a ``height`` x ``width`` raster, row by row (see grid);
    ``tile`` and ``stride`` are pixels, or (down, across) pairs of them."""
    th, tw = tile if isinstance(tile, tuple) else (tile, tile)
    sh, sw = stride if isinstance(stride, tuple) else (stride, stride)
    ys, xs = grid(height, th, sh), grid(width, tw, sw)
    return [
        Chip(i, j, x0, y0, min(tw, width), min(th, height),
             last=i == len(ys) - 1 and j == len(xs) - 1)
        for i, y0 in enumerate(ys)
        for j, x0 in enumerate(xs)
    ]  # fmt: skip
