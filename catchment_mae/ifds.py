"""What a TIFF's directories (IFDs) would take to list, before a parser lists them.

tifffile turns each directory's arrays into Python tuples when it reads a page,
about 36 bytes a number: 64 IFDs whose offset and byte-count arrays (a million
each) point at one shared array took 5.1 GB before any pixel was read.
:func:`listing_bytes` walks the directory chain itself, reading only the entry
headers (tag, type, count), and says what the listing would hold.

Pure Python, no imports beyond the standard library.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

# Bytes a value of each TIFF type takes once listed: numbers become Python ints
# or floats in a tuple (28 bytes each and an 8-byte slot); bytes and text stay
# bytes (BYTE, ASCII, SBYTE, UNDEFINED).
_AS_BYTES = frozenset({1, 2, 6, 7})
_PER_NUMBER = 36


def listing_bytes(f: BinaryIO, max_ifds: int) -> int:
    """About the memory tifffile takes to list the first ``max_ifds`` directories
    of the TIFF open in ``f`` (classic or BigTIFF), stopping where the chain
    ends, loops back or leaves the file. 0 for what is not a TIFF."""
    f.seek(0, 2)
    size = f.tell()
    f.seek(0)
    head = f.read(16)
    if len(head) < 8 or head[:2] not in (b"II", b"MM"):
        return 0
    order = "<" if head[:2] == b"II" else ">"
    (magic,) = struct.unpack_from(order + "H", head, 2)
    if magic == 43:  # BigTIFF: 8-byte counts and offsets, 20-byte entries
        if len(head) < 16:
            return 0
        count_fmt, entry, at = "Q", struct.Struct(order + "HHQ8x"), 8
    elif magic == 42:
        count_fmt, entry, at = "H", struct.Struct(order + "HHI4x"), 4
    else:
        return 0
    offset_fmt = order + ("Q" if magic == 43 else "I")
    (offset,) = struct.unpack_from(offset_fmt, head, at)
    n_size, o_size = struct.calcsize(count_fmt), struct.calcsize(offset_fmt)
    total, seen = 0, set()
    for _ in range(max_ifds):
        if not 0 < offset < size or offset in seen:
            break
        seen.add(offset)
        f.seek(offset)
        raw = f.read(n_size)
        if len(raw) < n_size:
            break
        (n,) = struct.unpack(order + count_fmt, raw)
        n = min(n, (size - offset) // entry.size)  # entries past the end: none
        entries = f.read(n * entry.size)
        for k in range(len(entries) // entry.size):
            _, typ, count = entry.unpack_from(entries, k * entry.size)
            total += count if typ in _AS_BYTES else count * _PER_NUMBER
        raw = f.read(o_size)
        if len(raw) < o_size:
            break
        (offset,) = struct.unpack(offset_fmt, raw)
    return total
