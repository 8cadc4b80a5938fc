"""The decode-once cache of resampled rasters that training reads (numpy + pyarrow).

A raster is decoded, masked and resized once (:func:`catchment_mae.preprocess.
resample`); what comes out, the per-raster standardised image (float16), its
valid fraction (uint8) and the raster's own statistics, is what every epoch of
every run with the same reading settings needs, since normalising it is a
per-channel affine map done per batch. So it is written once, to numpy shard
files that later epochs and later runs memory-map.

Layout, under ``ROOT/samples-KEY/`` (KEY hashes the cmae version, this format's
version and the resampling settings, so another version or other settings never
read these files)::

    key.json                          what KEY stands for
    SHARD.z.npy                       (rows, C, S, S) float16, standard .npy
    SHARD.valid.npy                   (rows, 1, S, S) uint8
    SHARD.arrow                       Arrow IPC index: one row per raster
    .lock                             flock: shared while in use

Each index row holds the raster's absolute path (and its bytes, where they are
not UTF-8), size and mtime (its key: a changed file is read again), its row in
the shard, its statistics and scale, and a CRC-32 of its two arrays and those
facts. A shard exists once its index does (written last, atomically); the CRC is
checked before a row is used, so a torn or damaged shard or index is dropped and
rebuilt, never trusted. Reader processes write their rows straight into the
shard files (``numpy.lib.format.open_memmap``); nothing is copied through pipes.
A raster or chip with no valid pixel has an index row with no arrays (row -1),
so that later runs know it without reading it; other failures are read again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from catchment_mae.errors import CmaeError
from catchment_mae.io import (
    atomic_output,
    atomic_write_text,
    fd_path,
    open_dir,
    opened_inside,
    text_path,
)
from catchment_mae.preprocess import Resampled
from catchment_mae.shard_rows import ShardTarget, forget
from catchment_mae.spec import PreprocessSpec
from catchment_mae.version import __version__

log = logging.getLogger(__name__)

# 2: chips (a window in the key); 3: path_bytes; 4: scale vectors of any length
CACHE_FORMAT = 4
# Rasters per shard: 51 MB of float16 at one band and 224 px.
SHARD_ROWS = 512

_INDEX = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),  # as text (text_path)
        pa.field("path_bytes", pa.binary()),  # the name's bytes, if not UTF-8
        pa.field("file_size", pa.int64()),
        pa.field("mtime_ns", pa.int64()),
        pa.field("window", pa.list_(pa.int64(), 4)),  # a chip's x0, y0, w, h
        pa.field("row", pa.int32()),
        pa.field("height", pa.int64()),
        pa.field("width", pa.int64()),
        pa.field("bands", pa.int32()),
        pa.field("dtype", pa.string()),
        pa.field("count", pa.int64()),
        pa.field("nodata_fraction", pa.float64()),
        pa.field("mean", pa.list_(pa.float64())),
        pa.field("std", pa.list_(pa.float64())),
        pa.field("scale", pa.list_(pa.float32())),  # the scale vector
        pa.field("crc", pa.uint32()),
    ]
)


def default_cache_dir() -> Path:
    """``$CMAE_CACHE_DIR``, else ``$XDG_CACHE_HOME/cmae``, else ``~/.cache/cmae``."""
    if os.environ.get("CMAE_CACHE_DIR"):
        return Path(os.environ["CMAE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cmae"


@dataclass(frozen=True)
class FileKey:
    """What identifies a raster's (or a chip's) content for the cache."""

    path: str  # absolute
    size: int
    mtime_ns: int
    window: tuple[int, int, int, int] | None = None  # a chip: x0, y0, w, h

    @classmethod
    def of(
        cls,
        path: str | os.PathLike[str],
        window: tuple[int, int, int, int] | None = None,
    ) -> FileKey:
        absolute = os.path.abspath(path)
        st = os.stat(absolute)
        return cls(absolute, st.st_size, st.st_mtime_ns, window)

    @property
    def item(self) -> tuple[str, tuple[int, int, int, int] | None]:
        """What is read: the path and the chip's window (None: the raster)."""
        return self.path, self.window


@dataclass
class Entry:
    """One raster's facts, and where its arrays lie (``shard`` None: not cached)."""

    key: FileKey
    height: int
    width: int
    bands: int
    dtype: str
    count: int  # valid pixels as read
    nodata_fraction: float
    mean: np.ndarray  # (C,) float64
    std: np.ndarray  # (C,) float64
    scale: np.ndarray  # (scale_dim,) float32
    shard: str | None = None
    row: int = -1
    crc: int = 0

    @classmethod
    def of(cls, key: FileKey, r: Resampled) -> Entry:
        info = r.info
        return cls(
            key, info.height, info.width, info.bands, info.dtype, r.count,
            1.0 - r.valid_fraction, r.mean, r.std, r.scale,
        )  # fmt: skip

    @classmethod
    def empty(cls, key: FileKey) -> Entry:
        """A raster (or chip) with no valid pixel: in the index with no arrays
        (row -1), so that a later run knows it without reading it (a scene's
        nodata chips were read again by every run)."""
        no = np.zeros(0)
        return cls(key, 0, 0, 0, "", 0, 1.0, no, no, np.zeros(2, np.float32))

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Every reader sends one back per raster: as lists, its three small
        # arrays pickle and load in half the time, and the pool's thread loads
        # each one.
        return _entry, (
            self.key, self.height, self.width, self.bands, self.dtype, self.count,
            self.nodata_fraction, self.mean.tolist(), self.std.tolist(),
            self.scale.tolist(), self.shard, self.row, self.crc,
        )  # fmt: skip


def _entry(key: FileKey, *facts: Any) -> Entry:
    """An Entry from :meth:`Entry.__reduce__`'s plain values."""
    *head, mean, std, scale, shard, row, crc = facts
    return Entry(
        key, *head, np.asarray(mean, np.float64), np.asarray(std, np.float64),
        np.asarray(scale, np.float32), shard, row, crc,
    )  # fmt: skip


class SampleCache:
    """The cache directory for one resampling spec (see the module docstring).

    Args:
        root: the cache root (``--cache``; :func:`default_cache_dir`).
        spec: the preprocessing; only its resampling fields make the key.

    Raises:
        CmaeError: the directory cannot be created or written.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        spec: PreprocessSpec,
        within: str | os.PathLike[str] | None = None,
    ) -> None:
        self.where = self.dir = self.dir_for(root, spec)  # where: for people
        self.size = spec.image_size
        self.derived = int(spec.slope_channel)  # channels beyond the bands
        self._fd = None
        try:
            # Used through its descriptor (readers too): a link planted in its
            # place, now or later, is refused or leads nowhere else.
            if within is None:
                self.where.mkdir(parents=True, exist_ok=True)
                self._fd, self.dir = open_dir(self.where, children=True)
            else:
                self._fd, self.dir = _open_inside(Path(root), self.where.name, within)
            if not (self.dir / "key.json").exists():
                atomic_write_text(self.dir / "key.json", _key_text(spec) + "\n")
            flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
            self._lock = os.fdopen(os.open(self.dir / ".lock", flags, 0o600), "a")
        except OSError as e:
            if self._fd is not None:
                os.close(self._fd)
            raise CmaeError(
                f"{self.where}: cannot use the cache there ({e.strerror or e}); "
                "choose another with --cache DIR, or train with --no-cache"
            ) from e
        self.exclusive = _flock(self._lock, exclusive=True)  # nobody else here
        if not self.exclusive:
            _flock(self._lock, exclusive=False, wait=True)

    @staticmethod
    def dir_for(root: str | os.PathLike[str], spec: PreprocessSpec) -> Path:
        """The directory of ``spec``'s samples under ``root``."""
        digest = hashlib.sha256(_key_text(spec).encode()).hexdigest()[:16]
        return Path(root) / f"samples-{digest}"

    # ------------------------------------------------------------------ reading
    def lookup(self, keys: Iterable[FileKey]) -> dict[FileKey, Entry]:
        """The verified entries of ``keys`` (a missing or damaged one is absent).

        With the cache to itself, also removes shards that no live raster uses
        (files changed or gone, or read again since) and the leftovers of
        builds that died.
        """
        wanted = set(keys)
        newest: dict[tuple[str, Any], Entry] = {}
        shards = self._complete_shards()
        for stem in shards:
            for entry in shards[stem]:
                newest[entry.key.item] = entry  # shards are in time order
        found = {
            e.key: e
            for e in newest.values()
            if e.key in wanted  # same path, size and mtime
        }
        bad = self._verify(found.values())
        for stem in bad:
            log.warning("cache shard %s is damaged; its rasters are read again", stem)
            found = {k: e for k, e in found.items() if e.shard != stem}
            shards.pop(stem, None)
        if self.exclusive:
            self._prune(shards, newest, bad)
            _flock(self._lock, exclusive=False)  # others may use it now
            self.exclusive = False
        return found

    def _complete_shards(self) -> dict[str, list[Entry]]:
        out: dict[str, list[Entry]] = {}
        for index in sorted(self.dir.glob("*.arrow")):
            stem = index.name[: -len(".arrow")]
            try:
                out[stem] = list(_read_index(index, stem))
            except (OSError, pa.ArrowException, ValueError, KeyError) as e:
                log.warning("cache index %s is unreadable (%s); ignored", index, e)
                if self.exclusive:
                    self._remove(stem)
        return out

    def _verify(self, entries: Iterable[Entry]) -> set[str]:
        """Shards whose rows do not match their CRC (or whose files are wrong)."""
        by_shard: dict[str, list[Entry]] = {}
        for e in entries:
            by_shard.setdefault(str(e.shard), []).append(e)
        bad = set()
        for stem, rows in by_shard.items():
            try:
                z, valid = self.arrays(stem)
                for e in rows:
                    if e.row < 0:  # no arrays (Entry.empty): its facts alone
                        crc = _with_facts(e, 0)
                    elif z.shape[1:] == (
                        len(e.mean) + self.derived,
                        self.size,
                        self.size,
                    ):
                        arrays = zlib.crc32(valid[e.row], zlib.crc32(z[e.row]))
                        crc = _with_facts(e, arrays)
                    else:
                        crc = -1
                    if crc != e.crc:
                        bad.add(stem)
                        break
            except (OSError, ValueError, IndexError):
                bad.add(stem)
        return bad

    def arrays(self, stem: str) -> tuple[np.ndarray, np.ndarray]:
        """A shard's arrays, memory-mapped read-only: (rows, C, S, S) float16 and
        (rows, 1, S, S) uint8."""
        z = np.load(self.dir / f"{stem}.z.npy", mmap_mode="r")
        valid = np.load(self.dir / f"{stem}.valid.npy", mmap_mode="r")
        if z.dtype != np.float16 or valid.dtype != np.uint8 or len(z) != len(valid):
            raise ValueError(f"cache shard {stem} has unexpected arrays")
        return z, valid

    # ------------------------------------------------------------------ writing
    def new_shard(self, rows: int, in_chans: int) -> ShardBuild:
        """A shard of ``rows`` rasters to fill (committed or discarded later)."""
        return ShardBuild(self, rows, in_chans)

    # -------------------------------------------------------------- housekeeping
    def nbytes(self) -> int:
        """Bytes of every file in the cache directory (0 once it is deleted:
        deleting it at any time is allowed)."""
        total = 0
        with contextlib.suppress(FileNotFoundError):
            for p in self.dir.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    if p.is_file():
                        total += p.stat().st_size
        return total

    def _prune(
        self,
        shards: dict[str, list[Entry]],
        newest: dict[tuple[str, Any], Entry],
        bad: set[str],
    ) -> None:
        live_stems = {
            e.shard for e in newest.values() if _still(e.key) and e.shard not in bad
        }
        for stem in set(shards) - live_stems:
            self._remove(stem)
        for stem in bad:
            self._remove(stem)
        complete = set(shards) | bad
        for path in self.dir.glob("*.npy*"):
            stem = path.name.split(".", 1)[0]
            pid = int(stem.split("-")[1]) if stem.count("-") >= 2 else -1
            if stem not in complete and not _alive(pid):
                with contextlib.suppress(OSError):
                    path.unlink()

    def _remove(self, stem: str) -> None:
        for suffix in (".arrow", ".z.npy", ".valid.npy"):
            with contextlib.suppress(OSError):
                (self.dir / f"{stem}{suffix}").unlink()

    def close(self) -> None:
        self._lock.close()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> SampleCache:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _open_inside(
    root: Path, name: str, within: str | os.PathLike[str]
) -> tuple[int, Path]:
    """``root / name`` made and opened as :func:`open_dir` does, with ``root``
    checked to lie inside ``within`` on the folder opened (the kernel's own
    name for it): a cache root swapped for a link that leads out (the web UI's
    ``.cache`` under --model-root) is refused, whenever it happens."""
    root.mkdir(parents=True, exist_ok=True)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    top = os.open(root, flags)
    try:
        if not opened_inside(top, within):
            raise OSError(errno.EXDEV, f"it leads outside {within}")
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o777, dir_fd=top)
        fd = os.open(name, flags | os.O_NOFOLLOW, dir_fd=top)
    finally:
        os.close(top)
    return fd, fd_path(fd, root / name, children=True)


def _key_text(spec: PreprocessSpec) -> str:
    """What the cache directory's name hashes (its key.json)."""
    key = {"cmae_version": __version__, "cache_format": CACHE_FORMAT,
           **spec.resample_key()}  # fmt: skip
    return json.dumps(key, sort_keys=True)


class ShardBuild:
    """A shard being filled by reader processes, then committed or discarded."""

    def __init__(self, cache: SampleCache, rows: int, in_chans: int) -> None:
        self.cache, self.rows, self.in_chans = cache, rows, in_chans
        self.stem = f"{time.time_ns():016x}-{os.getpid()}-{secrets.token_hex(3)}"
        s = cache.size
        d = cache.dir
        self.z_tmp = d / f"{self.stem}.z.npy.tmp"
        self.valid_tmp = d / f"{self.stem}.valid.npy.tmp"
        try:  # full-size files (sparse until written), header included
            for path, dtype, shape in (
                (self.z_tmp, np.float16, (rows, in_chans, s, s)),
                (self.valid_tmp, np.uint8, (rows, 1, s, s)),
            ):
                mm = np.lib.format.open_memmap(path, "w+", dtype, shape)
                mm.flush()
                del mm
        except OSError as e:
            self.discard()
            raise cannot_write(cache.where, e) from e
        self.entries: list[Entry] = []

    def target(self, row: int) -> ShardTarget:
        return ShardTarget(str(self.z_tmp), str(self.valid_tmp), row)

    def add(self, entry: Entry, row: int, crc: int) -> None:
        entry.shard, entry.row, entry.crc = self.stem, row, _with_facts(entry, crc)
        self.entries.append(entry)

    def commit(self) -> None:
        """Makes the shard visible: arrays renamed, then the index written."""
        forget(self.z_tmp, self.valid_tmp)
        if not self.entries:
            self.discard()
            return
        d = self.cache.dir
        table = pa.Table.from_pylist(
            [_index_row(e) for e in self.entries], schema=_INDEX
        ).replace_schema_metadata(
            {"cache_format": str(CACHE_FORMAT), "cmae_version": __version__}
        )
        try:
            os.replace(self.z_tmp, d / f"{self.stem}.z.npy")
            os.replace(self.valid_tmp, d / f"{self.stem}.valid.npy")
            with atomic_output(d / f"{self.stem}.arrow") as f:
                with ipc.new_file(f, table.schema) as writer:
                    writer.write_table(table)
        except OSError as e:  # a full disk, or the directory deleted meanwhile
            raise cannot_write(self.cache.where, e) from e

    def discard(self) -> None:
        forget(self.z_tmp, self.valid_tmp)
        for p in (self.z_tmp, self.valid_tmp):
            with contextlib.suppress(OSError):
                p.unlink()


def _with_facts(e: Entry, crc: int) -> int:
    """``crc`` (of a row's arrays) carried on over the raster's facts in the
    index: its statistics normalise every batch of it, so a damaged index is
    caught as a damaged shard is (a flipped bit halved a raster's mean, and it
    was used)."""
    facts = (
        np.asarray(e.mean, "<f8").tobytes()
        + np.asarray(e.std, "<f8").tobytes()
        + np.asarray(e.scale, "<f4").tobytes()
        + np.array([e.height, e.width, e.bands, e.count], "<i8").tobytes()
        + np.array([e.nodata_fraction], "<f8").tobytes()
        + e.dtype.encode()
    )
    return zlib.crc32(facts, crc)


class CannotWrite(str):
    """Why a shard row could not be written (a full disk, the directory gone):
    the cache's reason, not the raster's; a reader hands it back as its reason,
    and the run stops on it (:func:`cannot_write`)."""


def cannot_write(where: Path, why: OSError | CannotWrite) -> CmaeError:
    """The run's end when the cache in ``where`` cannot be written."""
    reason = why if isinstance(why, CannotWrite) else why.strerror or str(why)
    return CmaeError(
        f"{where}: cannot write the cache ({reason}); free some space, choose "
        "another with --cache DIR, or use --no-cache"
    )


def _index_row(e: Entry) -> dict[str, Any]:
    text = text_path(e.key.path)
    return {
        "path": text,
        "path_bytes": None if text == e.key.path else os.fsencode(e.key.path),
        "file_size": e.key.size,
        "mtime_ns": e.key.mtime_ns,
        "window": list(e.key.window) if e.key.window else None,
        "row": e.row,
        "height": e.height,
        "width": e.width,
        "bands": e.bands,
        "dtype": e.dtype,
        "count": e.count,
        "nodata_fraction": e.nodata_fraction,
        "mean": np.asarray(e.mean, np.float64).tolist(),
        "std": np.asarray(e.std, np.float64).tolist(),
        "scale": np.asarray(e.scale, np.float64).tolist(),
        "crc": e.crc,
    }


def _read_index(path: Path, stem: str) -> Iterator[Entry]:
    with ipc.open_file(path) as reader:
        table = reader.read_all()
    meta = table.schema.metadata or {}
    if meta.get(b"cache_format") != str(CACHE_FORMAT).encode():
        raise ValueError("another cache format")
    for r in table.to_pylist():
        yield Entry(
            key=FileKey(
                os.fsdecode(r["path_bytes"]) if r["path_bytes"] else r["path"],
                r["file_size"],
                r["mtime_ns"],
                tuple(r["window"]) if r["window"] else None,
            ),
            height=r["height"],
            width=r["width"],
            bands=r["bands"],
            dtype=r["dtype"],
            count=r["count"],
            nodata_fraction=r["nodata_fraction"],
            mean=np.asarray(r["mean"], np.float64),
            std=np.asarray(r["std"], np.float64),
            scale=np.asarray(r["scale"], np.float32),
            shard=stem,
            row=r["row"],
            crc=r["crc"],
        )


def _still(key: FileKey) -> bool:
    """Whether the file still has the content the cache holds for it."""
    try:
        return FileKey.of(key.path, key.window) == key
    except OSError:
        return False


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _flock(handle: Any, exclusive: bool, wait: bool = False) -> bool:
    """Takes a shared or exclusive flock; False when it is held (no POSIX: no
    lock, never exclusive, so nothing is pruned)."""
    try:
        import fcntl
    except ImportError:
        return False
    flags = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    try:
        fcntl.flock(handle, flags | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True
