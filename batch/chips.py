"""Chips of large scenes (``embed-dir --tile``): a grid over each raster (no torch).

A chip is a window of the raster's full-resolution pixels; its row in the table
carries the raster's path and size, and the chip's grid place, window, footprint
and nodata fraction. Chips are read one at a time, each decoding only the strips
or tiles it touches, so memory stays flat however large the scene.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from catchment_mae.errors import BadRasterError
from catchment_mae.raster import image_size


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
    rels: Iterable[str], root: Path, tile: int, stride: int
) -> Iterator[str | tuple[str, Chip]]:
    """Each file's chips, from its header; a file whose header cannot be read
    is passed on whole, and the reader gives it its failure row."""
    for rel in rels:
        try:
            h, w = image_size(root / rel)
        except BadRasterError:
            yield rel
            continue
        for chip in chip_grid(h, w, tile, stride):
            yield rel, chip


def chip_grid(height: int, width: int, tile: int, stride: int) -> list[Chip]:
    """The chips of a ``height`` x ``width`` raster, row by row (see grid)."""
    ys, xs = grid(height, tile, stride), grid(width, tile, stride)
    return [
        Chip(i, j, x0, y0, min(tile, width), min(tile, height),
             last=i == len(ys) - 1 and j == len(xs) - 1)
        for i, y0 in enumerate(ys)
        for j, x0 in enumerate(xs)
    ]  # fmt: skip
