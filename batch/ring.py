"""Slots of model input in shared memory: readers write them, onnxruntime reads them.

One POSIX shared-memory segment (``multiprocessing.shared_memory``) holds ``rows``
slots of three numpy views: ``image`` (rows, C, S, S) float32, ``valid`` (rows, 1,
S, S) uint8 (the valid fraction in 1/255 steps, as preprocessing keeps it) and
``scale`` (rows, scale_dim) float32. A reader process writes one raster into the slot it
is given and sends back only the row's facts; a batch of consecutive slots is fed
to onnxruntime as it lies, a view, with no copy through pipes and no
concatenation. The segment is named ``cmae-PID-RANDOM`` and unlinked by its
creator on every way out; if the creator is killed (``kill -9``), Python's
resource tracker unlinks it, and when the tracker dies with it (``kill -9`` of
the process group), the next ring made on the machine removes the segments
whose creator is gone (:func:`remove_orphans`). No torch here.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

SEGMENT_PREFIX = "cmae-"


@dataclass(frozen=True)
class RingLayout:
    """What a reader needs to attach: the segment's name and the slot shapes."""

    name: str  # the segment's name (a private ring's is unique too)
    rows: int
    in_chans: int  # channels of an image (the bands, and a slope channel)
    size: int
    shared: bool = True  # False: plain memory of this process (reading inline)
    scale_dim: int = 2

    def offsets(self) -> tuple[int, int, int]:
        """Byte offsets of image, valid and scale; each 64-byte aligned."""
        image = self.rows * self.in_chans * self.size**2 * 4
        valid = self.rows * self.size**2
        return 0, _align(image), _align(image) + _align(valid)

    @property
    def nbytes(self) -> int:
        return self.offsets()[2] + self.rows * self.scale_dim * 4


class SlotRing:
    """``rows`` slots of model input, shared with reader processes or private.

    Args:
        rows: slots.
        in_chans: channels of an image.
        size: the model's image size.
        shared: a shared-memory segment (else plain memory of this process).
        scale_dim: length of the scale vector.
    """

    def __init__(
        self,
        rows: int,
        in_chans: int,
        size: int,
        shared: bool = True,
        scale_dim: int = 2,
    ):
        self._shm: shared_memory.SharedMemory | None = None
        self._owner = True
        name = f"{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        self.layout = RingLayout(name, rows, in_chans, size, shared, scale_dim)
        if shared:
            remove_orphans()
            try:
                self._shm = shared_memory.SharedMemory(
                    name=name, create=True, size=self.layout.nbytes
                )
            except BaseException:
                # A Ctrl-C inside it (while it starts Python's resource tracker,
                # say) leaves the segment made and nobody holding it: a segment
                # was found left in /dev/shm after a Ctrl-C in a run's first second.
                _unlink(name)
                raise
            buf = self._shm.buf
        else:
            buf = memoryview(bytearray(self.layout.nbytes))
        self._views(buf)

    @classmethod
    def attach(cls, layout: RingLayout) -> SlotRing:
        """The ring a reader process writes into (never unlinks it)."""
        ring = cls.__new__(cls)
        ring._shm = shared_memory.SharedMemory(name=layout.name)
        ring._owner = False
        ring.layout = layout
        ring._views(ring._shm.buf)
        return ring

    def _views(self, buf: memoryview) -> None:
        lay = self.layout
        a, b, c = lay.offsets()
        s = lay.size
        self.image = np.ndarray((lay.rows, lay.in_chans, s, s), np.float32, buf, a)
        self.valid = np.ndarray((lay.rows, 1, s, s), np.uint8, buf, b)
        self.scale = np.ndarray((lay.rows, lay.scale_dim), np.float32, buf, c)

    def move(self, src: int, dst: int) -> None:
        """Copies slot ``src`` into slot ``dst`` (closing a failed file's gap)."""
        for arr in (self.image, self.valid, self.scale):
            arr[dst] = arr[src]

    def close(self) -> None:
        """Drops the views and the mapping; the creator also unlinks the segment."""
        self.image = self.valid = self.scale = None  # type: ignore[assignment]
        shm, self._shm = self._shm, None
        if shm is None:
            return
        with contextlib.suppress(BufferError):  # a view still held elsewhere
            shm.close()
        if self._owner:
            with contextlib.suppress(FileNotFoundError):
                shm.unlink()

    def __enter__(self) -> SlotRing:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def remove_orphans(folder: str = "/dev/shm") -> list[str]:
    """Unlinks the rings in ``folder`` (Linux keeps POSIX shared memory there)
    whose creating process is no longer running; the names removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:  # not Linux, or no such folder: nothing to look at
        return removed
    for name in names:
        if not name.startswith(SEGMENT_PREFIX):
            continue
        pid = name[len(SEGMENT_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or _running(int(pid)):
            continue
        with contextlib.suppress(OSError):  # gone already, or another user's
            os.unlink(os.path.join(folder, name))
            removed.append(name)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: running, as another user
        return True
    return True


def _unlink(name: str) -> None:
    """Unlinks the segment ``name`` if it exists."""
    with contextlib.suppress(Exception):
        leftover = shared_memory.SharedMemory(name=name)
        leftover.close()
        leftover.unlink()


def _align(n: int, to: int = 64) -> int:
    return -(-n // to) * to
