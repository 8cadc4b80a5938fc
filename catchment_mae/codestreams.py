"""The image size a strip's or tile's compressed data declares, before decoding.

An image codec decodes to the size in its own header, not the TIFF's: a 64 x 64
TIFF whose one strip held a JPEG declaring 60000 x 60000 made the decoder
allocate 3.6 GB. The reader compares what each codestream declares with the
strip or tile it stands for (:func:`declared_size`) and refuses the file before
decoding. The headers are read here, by their published layouts (ITU-T T.81
for JPEG, ISO/IEC 15444-1 for JPEG 2000, the PNG, WebP, LERC2 and JPEG XL
specifications), from the first bytes of the data only.

Pure Python, no imports beyond the standard library.
"""

from __future__ import annotations

import struct
import zlib

JPEG = frozenset({6, 7, 33007, 34892})
JPEG2000 = frozenset({33003, 33004, 33005, 34712})
PNG = 34933
WEBP = frozenset({34927, 50001})
LERC = 34887
JPEGXL = frozenset({50002, 52546})
# LercParameters' second value: the LERC blob itself deflated (tifffile writes
# it so with compression="lerc_deflate"); zstd-wrapped blobs are not looked into.
_LERC_DEFLATE = 1

_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG, DAC
_HEAD = 4096  # bytes of a codestream looked at for its header


def declared_size(
    compression: int, data: bytes | memoryview, lerc_parameters: tuple = ()
) -> tuple[int, int] | None:
    """(height, width) of the image ``data`` (one strip or tile compressed with
    TIFF ``compression``) declares, or None when the codec is not one of these
    or its header cannot be read (the decoder then says what is wrong)."""
    head = bytes(data[:_HEAD])
    try:
        if compression in JPEG:
            return _jpeg(head)
        if compression in JPEG2000:
            return _jpeg2000(head)
        if compression == PNG:
            return _png(head)
        if compression in WEBP:
            return _webp(head)
        if compression == LERC:
            if len(lerc_parameters) > 1 and lerc_parameters[1] == _LERC_DEFLATE:
                head = zlib.decompressobj().decompress(bytes(data), 64)
            return _lerc(head)
        if compression in JPEGXL:
            return _jpegxl(head)
    except (struct.error, IndexError, ValueError, zlib.error):
        return None
    return None


def _jpeg(b: bytes) -> tuple[int, int] | None:
    """The SOFn segment: precision, then height and width (T.81 B.2.2)."""
    i = 2 if b[:2] == b"\xff\xd8" else 0
    while i + 4 <= len(b):
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        (length,) = struct.unpack_from(">H", b, i + 2)
        if marker in _SOF:
            height, width = struct.unpack_from(">HH", b, i + 5)
            return (height, width) if height else None  # 0: set by a DNL later
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + length
    return None


def _jpeg2000(b: bytes) -> tuple[int, int] | None:
    """The SIZ segment after SOC (A.5.1), in a raw codestream or a JP2 file's
    contiguous codestream box."""
    at = b.find(b"\xff\x4f\xff\x51")
    if at < 0:
        return None
    xsiz, ysiz, xo, yo = struct.unpack_from(">IIII", b, at + 8)
    if xo >= xsiz or yo >= ysiz:  # damaged: the decoder says so
        return None
    return ysiz - yo, xsiz - xo


def _png(b: bytes) -> tuple[int, int] | None:
    if b[:8] != b"\x89PNG\r\n\x1a\n" or b[12:16] != b"IHDR":
        return None
    width, height = struct.unpack_from(">II", b, 16)
    return height, width


def _webp(b: bytes) -> tuple[int, int] | None:
    if b[:4] != b"RIFF" or b[8:12] != b"WEBP":
        return None
    chunk = b[12:16]
    if chunk == b"VP8X":  # canvas size - 1, 24 bits each
        w = int.from_bytes(b[24:27], "little") + 1
        h = int.from_bytes(b[27:30], "little") + 1
        return h, w
    if chunk == b"VP8L":  # signature 0x2f, then 14-bit width - 1, height - 1
        if b[20] != 0x2F:
            return None
        bits = int.from_bytes(b[21:25], "little")
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    if chunk == b"VP8 ":  # key frame: start code, then 14-bit sizes
        if b[23:26] != b"\x9d\x01\x2a":
            return None
        w, h = struct.unpack_from("<HH", b, 26)
        return h & 0x3FFF, w & 0x3FFF
    return None


def _lerc(b: bytes) -> tuple[int, int] | None:
    """LERC2's header: version, a checksum from version 3, rows, columns."""
    if not b.startswith(b"Lerc2 "):
        return None
    (version,) = struct.unpack_from("<i", b, 6)
    at = 10 + (4 if version >= 3 else 0)
    rows, cols = struct.unpack_from("<ii", b, at)
    if rows < 0 or cols < 0:
        return None
    return rows, cols


def _jpegxl(b: bytes) -> tuple[int, int] | None:
    """The SizeHeader after the codestream's signature (ISO/IEC 18181-1 D.2), in
    a bare codestream or the first codestream box of a container."""
    if not b.startswith(b"\xff\x0a"):
        at = b.find(b"jxlc")
        at = at if at >= 0 else b.find(b"jxlp")
        if at < 0:
            return None
        b = b[at + 4 + (4 if b[at : at + 4] == b"jxlp" else 0) :]
        if not b.startswith(b"\xff\x0a"):
            return None
    bits = _Bits(b[2:])

    def size() -> int:
        return 1 + bits.u32((0, 9), (0, 13), (0, 18), (0, 30))

    small = bits.read(1)
    height = 8 * (1 + bits.read(5)) if small else size()
    ratio = bits.read(3)
    if ratio == 0:
        width = 8 * (1 + bits.read(5)) if small else size()
    else:
        num, den = _JXL_RATIOS[ratio]
        width = height * num // den
    return height, width


_JXL_RATIOS = {1: (1, 1), 2: (12, 10), 3: (4, 3), 4: (3, 2), 5: (16, 9),
               6: (5, 4), 7: (2, 1)}  # fmt: skip


class _Bits:
    """Bits of a byte string, least significant first (JPEG XL's order)."""

    def __init__(self, data: bytes) -> None:
        self.value, self.pos = int.from_bytes(data[:16], "little"), 0

    def read(self, n: int) -> int:
        out = (self.value >> self.pos) & ((1 << n) - 1)
        self.pos += n
        return out

    def u32(self, *choices: tuple[int, int]) -> int:
        offset, n = choices[self.read(2)]
        return offset + self.read(n)
