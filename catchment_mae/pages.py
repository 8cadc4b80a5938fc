"""A TIFF's pages (IFDs) and their strips or tiles: which level to read, and
reading every k-th row and column of it, one strip or tile at a time.

numpy and tifffile only. Every strip or tile is held to the read's
:class:`~catchment_mae.budget.Budget` before it is decoded.
"""

from __future__ import annotations

import collections
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from catchment_mae import budget as bounds
from catchment_mae.budget import MAX_PAGES, Budget, mb
from catchment_mae.errors import BadRasterError

FILETYPE_REDUCED = 1  # an overview
FILETYPE_MASK = 4  # a transparency mask
_EXTRASAMPLE_ALPHA = (1, 2)  # associated, unassociated alpha
_JPEG_LIKE = {6, 7, 34892, 33007}  # the codecs that take JPEG tables


def list_pages(tif: tifffile.TiffFile) -> list[Any]:
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


def single_int(value: Any, tag: str, path: Path) -> int:
    """A tag that must hold one whole number (ImageLength, SamplesPerPixel, ...)."""
    if isinstance(value, tuple | list | np.ndarray):
        if len(value) != 1:
            raise BadRasterError(path, f"{tag} holds {len(value)} values, not one")
        value = value[0]
    try:
        return int(value)
    except (TypeError, ValueError) as e:
        raise BadRasterError(path, f"{tag} is not a number ({value!r})") from e


def page_hw(page: Any, path: Path | None = None) -> tuple[int, int]:
    where = Path(path) if path is not None else Path(str(page.parent.filename))
    return (
        single_int(page.imagelength, "ImageLength", where),
        single_int(page.imagewidth, "ImageWidth", where),
    )


def alpha_index(page: Any) -> int | None:
    """The sample that is alpha (ExtraSamples), if one is."""
    extras = tuple(int(e) for e in (page.extrasamples or ()))
    spp = int(page.samplesperpixel)
    for i, e in enumerate(extras):
        if e in _EXTRASAMPLE_ALPHA:
            return spp - len(extras) + i
    return None


def _pixels(page: Any, path: Path) -> int:
    h, w = page_hw(page, path)
    return h * w


# ------------------------------------------------------------ choosing a level
def choose_level(
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
        big_enough = [p for p in fits if min(page_hw(p, path)) >= min_size]
        if big_enough:
            page = big_enough[-1]
            return page, levels.index(page), (1, 1)
    if fits:
        return fits[0], levels.index(fits[0]), (1, 1)
    page = levels[-1]
    return page, levels.index(page), steps(*page_hw(page, path), limit)


def window_level(
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
    h, w = page_hw(full, path)
    x0, y0, ww, wh = window
    best: tuple[Any, int, tuple[int, int, int, int]] = (full, 0, window)
    if min_size is None:
        return best
    levels = sorted([full, *overviews], key=lambda p: -_pixels(p, path))
    for level, page in enumerate(levels):
        oh, ow = page_hw(page, path)
        ox0, oy0 = x0 * ow // w, y0 * oh // h  # whole numbers: no rounding slips
        ox1 = min(ow, max(ox0 + 1, -(-(x0 + ww) * ow // w)))
        oy1 = min(oh, max(oy0 + 1, -(-(y0 + wh) * oh // h)))
        if min(ox1 - ox0, oy1 - oy0) >= min(min_size, ww, wh):
            best = (page, level, (ox0, oy0, ox1 - ox0, oy1 - oy0))
    return best


def steps(h: int, w: int, limit: int) -> tuple[int, int]:
    """Row and column steps so that ceil(h/ky) * ceil(w/kx) <= limit, about
    equal unless one side is too short to share the reduction (1 x 1e9)."""
    k = max(1, math.ceil(math.sqrt(h * w / limit)))
    ky = kx = k
    ow = -(-w // kx)
    ky = max(ky, -(-h // max(1, limit // ow)))
    oh = -(-h // ky)
    kx = max(kx, -(-w // max(1, limit // oh)))
    return ky, kx


# ------------------------------------------------------------- reading a page
@dataclass(frozen=True)
class _Grid:
    """A page's strips or tiles: each ``th`` x ``tw`` pixels, ``rows`` x
    ``cols`` of them in each of ``planes`` planes, ``contig`` samples a pixel
    in each plane."""

    h: int
    w: int
    spp: int
    th: int
    tw: int
    rows: int
    cols: int
    planes: int
    contig: int
    seg_bytes: int  # one decoded strip or tile, tiles at full size

    @property
    def per_plane(self) -> int:
        return self.rows * self.cols


def _grid(page: Any, path: Path) -> _Grid:
    """The page's strips or tiles as it declares them; refused where their
    offsets and byte counts are fewer than its size needs."""
    h, w = page_hw(page, path)
    spp = single_int(page.samplesperpixel, "SamplesPerPixel", path)
    separate = page.planarconfig == 2 and spp > 1
    planes, contig = (spp, 1) if separate else (1, spp)
    if page.is_tiled:
        th, tw = int(page.tilelength), int(page.tilewidth)
        if th < 1 or tw < 1:
            raise BadRasterError(path, "declares tiles of size 0")
    else:
        th = min(max(1, int(page.rowsperstrip or h)), h)
        tw = w
    rows, cols = -(-h // th), -(-w // tw)
    itemsize = np.dtype(page.dtype).itemsize
    seg_bytes = th * tw * contig * itemsize
    grid = _Grid(h, w, spp, th, tw, rows, cols, planes, contig, seg_bytes)
    offsets, counts = page.dataoffsets, page.databytecounts
    if min(len(offsets), len(counts)) < planes * grid.per_plane:
        raise BadRasterError(
            path,
            f"declares {min(len(offsets), len(counts))} strip(s)/tile(s) (with "
            f"their byte counts) where its size needs {planes * grid.per_plane}",
        )
    return grid


def read_page(
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
    g = _grid(page, path)
    wx0, wy0, ww, wh = window or (0, 0, g.w, g.h)
    wx1, wy1 = min(g.w, wx0 + ww), min(g.h, wy0 + wh)
    bounds.check_segment(budget, path, g.seg_bytes, page.is_tiled)
    # The segments a read decodes, counted before they are listed: a sample in
    # every segment spanned, or one per segment at most where the step is the
    # larger (4 million one-byte strips must not be listed to be refused).
    spans = [
        min(len(range(lo, hi, k)), (hi - 1) // size - lo // size + 1)
        for lo, hi, k, size in ((wy0, wy1, ky, g.th), (wx0, wx1, kx, g.tw))
    ]
    bounds.check_count(path, g.planes * spans[0] * spans[1])
    # Only the segment rows and columns the window spans are looked at: a chip
    # of a 20,000 px scene touches 4 of its 6,400 tiles, and testing every one
    # took a third of the chip's read.
    rows = [
        r
        for r in range(wy0 // g.th, (wy1 - 1) // g.th + 1)
        if _hits(r * g.th, g.th, wy0, wy1, ky)
    ]
    if not rows:  # nothing to read (and a 0-row page must not walk its columns)
        return np.zeros((g.spp, 0, 0), page.dtype), np.zeros((0, 0), bool)
    cols = [
        c
        for c in range(wx0 // g.tw, (wx1 - 1) // g.tw + 1)
        if _hits(c * g.tw, g.tw, wx0, wx1, kx)
    ]
    needed = [
        p * g.per_plane + r * g.cols + c
        for p in range(g.planes)
        for r in rows
        for c in cols
    ]
    compression = int(page.keyframe.compression)
    bounds.check_decoded(budget, path, len(needed), g.seg_bytes, compression)
    oh, ow = -(-(wy1 - wy0) // ky), -(-(wx1 - wx0) // kx)
    out = np.zeros((g.spp, oh, ow), dtype=page.dtype)
    present = np.zeros((oh, ow), dtype=bool)
    offsets, counts = page.dataoffsets, page.databytecounts
    data = [i for i in needed if offsets[i] and counts[i]]
    if not data:
        return out, present
    if max(counts[i] for i in data) > budget.segment:
        raise BadRasterError(
            path, f"a strip or tile holds over {mb(budget.segment)} of data"
        )
    for i, block in _blocks(page, g, data, budget, path, window is not None):
        plane, r = divmod(i, g.per_plane)
        y0, x0 = (r // g.cols) * g.th, (r % g.cols) * g.tw
        ys = _picked(y0, g.th, wy0, wy1, ky)  # rows of the block sampled
        xs = _picked(x0, g.tw, wx0, wx1, kx)
        if not len(ys) or not len(xs):
            continue
        if block.shape[0] <= ys[-1] or block.shape[1] <= xs[-1]:
            raise BadRasterError(
                path, "a strip or tile holds fewer pixels than the file declares"
            )
        oy, ox = (y0 + ys[0] - wy0) // ky, (x0 + xs[0] - wx0) // kx
        part = block[ys.start : ys.stop : ky, xs.start : xs.stop : kx]  # a view
        s0 = plane if g.planes > 1 else 0
        target = out[s0 : s0 + part.shape[2], oy : oy + len(ys), ox : ox + len(xs)]
        target[...] = part.transpose(2, 0, 1)
        present[oy : oy + len(ys), ox : ox + len(xs)] = True
    return out, present


def _blocks(
    page: Any, g: _Grid, data: list[int], budget: Budget, path: Path, chip: bool
) -> Iterator[tuple[int, np.ndarray]]:
    """(index, decoded block as (rows, cols, contig)) of the strips or tiles
    ``data``, decoded one at a time: each codestream's own header is held to
    its segment and the bytes decoded are counted. A ``chip``'s blocks come
    from, and go to, the process's cache of decoded segments."""
    blocks: dict[int, np.ndarray] = {}
    ident = None
    if chip:  # chips: neighbours share strips and tiles
        st = os.fstat(page.parent.filehandle.fileno())  # what is read
        ident = (str(path), st.st_size, st.st_mtime_ns, page.offset)
        for i in data:
            block = _SEGMENTS.get((*ident, i))
            if block is not None:
                blocks[i] = block
        data = [i for i in data if i not in blocks]
    yield from blocks.items()
    keyframe = page.keyframe
    check = bounds.codestream_check(
        page, path, (g.h, g.w) if keyframe.compression == 6 else (g.th, g.tw)
    )
    decodeargs: dict[str, Any] = {"_fullsize": page.is_tiled}
    if keyframe.compression in _JPEG_LIKE:  # as tifffile does
        decodeargs["jpegtables"] = page.jpegtables
        decodeargs["jpegheader"] = keyframe.jpegheader
    offsets, counts = page.dataoffsets, page.databytecounts
    segments = page.parent.filehandle.read_segments(
        [offsets[i] for i in data], [counts[i] for i in data], indices=data,
        sort=True, flat=True, buffersize=min(budget.segment, 8 << 20),
    ) if data else ()  # fmt: skip
    decoded_bytes = 0
    for raw, i in segments:
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
                f"decoding it took over {mb(budget.decoded)} (four times "
                "the memory budget: cmae train --max-memory)",
            )
        block = np.asarray(decoded).reshape(shape)[0]  # (rows, cols, contig)
        if ident is not None:
            _SEGMENTS.put((*ident, i), block)
        yield i, block


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
