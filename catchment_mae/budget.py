"""What reading one raster may take: memory, strips or tiles, decoded bytes.

Every bound is checked from what the file declares before anything is decoded,
and the decoded bytes are counted as they come (strips may share one
codestream); a codec's own header is held to the strip or tile it stands for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catchment_mae import codestreams
from catchment_mae.codestreams import declared_size
from catchment_mae.errors import BadRasterError

# A file declaring more than this many pixels is refused before anything is read:
# even a decimated read would have to visit every one of its tiles.
ABSURD_PIXELS = 1 << 36
# The memory one raster may take while it is read and preprocessed. It is
# enforced from the sizes the file declares, before anything is decoded: a
# decoded strip or tile may take a quarter of it, the array read (an overview, or
# every k-th row and column) is sized to fit it, and reading may decode at most
# four times it in all (a bound on the time a file can take).
DEFAULT_MAX_MEMORY_MB = 1024
# IFDs looked at: a COG's image, overviews and masks take a few dozen at most;
# a chain of 200,000 IFDs, or one that loops back, must not be walked.
MAX_PAGES = 64
# Strips or tiles one read may decode: a file of a few MB listing 4 million
# one-byte strips kept a reader busy for most of a minute in Python's loop
# alone. A 100,000 px square scene of 256 px tiles has 152,600.
MAX_SEGMENTS = 1 << 18


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


def codestream_check(
    page: Any, path: Path, segment: tuple[int, int]
) -> Callable[[bytes], None]:
    """What refuses a strip's or tile's compressed data whose own header
    declares an image larger than the ``segment`` (height, width) it stands for
    (the whole page for old-style JPEG): image codecs decode to the size they
    declare, so a 216-byte JPEG declaring 60000 x 60000 would take 3.6 GB."""
    compression = int(page.keyframe.compression)
    if compression not in CODESTREAMS:
        return lambda raw: None
    lerc = tuple(page.tags.valueof(50674) or ())  # LercParameters
    kind = "tile" if page.is_tiled else "strip"
    name = CODESTREAMS[compression]

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
DECODE_COST = {
    **dict.fromkeys(codestreams.JPEG2000, 16),
    **dict.fromkeys(codestreams.JPEGXL, 16),
    **dict.fromkeys(codestreams.WEBP, 4),
}
CODESTREAMS = {
    **dict.fromkeys(codestreams.JPEG, "JPEG"),
    **dict.fromkeys(codestreams.JPEG2000, "JPEG 2000"),
    codestreams.PNG: "PNG",
    **dict.fromkeys(codestreams.WEBP, "WebP"),
    codestreams.LERC: "LERC",
    **dict.fromkeys(codestreams.JPEGXL, "JPEG XL"),
}


def check_segment(budget: Budget, path: Path, seg_bytes: int, tiled: bool) -> None:
    """Refuses a strip or tile whose decoded size is above a quarter of the
    budget."""
    if seg_bytes > budget.segment:
        raise BadRasterError(
            path,
            f"one {'tile' if tiled else 'strip'} decodes to "
            f"{mb(seg_bytes)}, above the {mb(budget.segment)} one may take "
            f"(a quarter of the memory budget, {budget.max_memory_mb} MB: "
            "cmae train --max-memory)",
        )


def check_count(path: Path, segments: int) -> None:
    """Refuses a read of more than MAX_SEGMENTS strips or tiles."""
    if segments > MAX_SEGMENTS:
        raise BadRasterError(
            path,
            f"reading it would decode {segments:,} strips or "
            f"tiles, more than the {MAX_SEGMENTS:,} a raster may",
        )


def check_decoded(
    budget: Budget, path: Path, segments: int, seg_bytes: int, compression: int
) -> None:
    """Refuses a read whose declared decoded bytes, counted DECODE_COST times
    for slow codecs, are above ``budget.decoded``."""
    cost = DECODE_COST.get(compression, 1)
    if segments * seg_bytes * cost > budget.decoded:
        slow = (
            f", {CODESTREAMS[compression]} data counted {cost} times (slow to decode)"
            if cost > 1
            else ""
        )
        raise BadRasterError(
            path,
            f"reading it would decode {mb(segments * seg_bytes)}, above the "
            f"{mb(budget.decoded)} a raster may (four times the memory budget: "
            f"cmae train --max-memory){slow}",
        )


def mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{n / 2**10:,.0f} kB"
