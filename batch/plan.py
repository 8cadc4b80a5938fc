"""Planning stage: which files of an archive (or zones of a mosaic) a run
embeds (no torch).

A run lists the archive lazily (an archive of millions of files is never held in
memory), keeps the files of its shard, and skips those an earlier run embedded
with the same model and whose size and mtime are unchanged; failed files are
tried again. What it saw is recorded, in listing order, for the final merge.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from catchment_mae.errors import NoInputError
from catchment_mae.io import text_path
from catchment_mae.raster import find_tiffs
from catchment_mae.zones import Grid, Zone, ZoneFile, plan_zone, zone_chips


class Plan:
    """The files to embed, as an iterator of paths relative to ``root``.

    Args:
        root: the archive.
        previous: rows of an earlier run with the same model (or None).
        shard: (K, N): only the files whose sha1(relative path) % N == K - 1.
        recursive: search sub-directories.
        within: skip files (symlinks included) that resolve outside it.

    Raises:
        NoInputError: ``root`` is not a directory (raised here, before any output).
    """

    def __init__(
        self,
        root: Path,
        previous: pa.Table | None,
        shard: tuple[int, int] | None = None,
        recursive: bool = True,
        within: Path | None = None,
    ) -> None:
        check_input(root)
        self.root, self.shard, self.recursive = root, shard, recursive
        self.within = within
        self.done = done_rows(previous)
        self.order: dict[str, int] = {}  # every file of the shard seen: position
        self.already_done = 0

    def __iter__(self) -> Iterator[str]:
        for rel, key, done in self._walk():
            self.order[key] = len(self.order)
            if done:
                self.already_done += 1
                continue
            yield rel

    def count_todo(self) -> int:
        """How many files the iteration will yield: a walk of its own (for a
        progress bar's total, beside the run), changing nothing here."""
        return sum(not done for _, _, done in self._walk())

    def _walk(self) -> Iterator[tuple[str, str, bool]]:
        """Every file of the shard: relative path, its key as the table holds
        it, and whether an earlier run embedded it as it is now."""
        for path in find_tiffs(self.root, self.recursive, within=self.within):
            rel = relative(path, self.root)
            if not in_shard(rel, self.shard):
                continue
            key = text_path(rel)
            yield rel, key, key in self.done and self.done[key] == stat_key(path)

    def where(self) -> str:
        """`` in shard K/N`` or nothing, for messages."""
        return shard_text(self.shard)

    def nothing_listed(self) -> str:
        """Why a run that listed nothing stops."""
        return f"{self.root}: no .tif/.tiff files found{self.where()}"


def check_input(root: Path) -> None:
    """Raises NoInputError when ``root`` is not an existing directory."""
    if not root.exists():
        raise NoInputError(f"{root}: input directory does not exist")
    if not root.is_dir():
        raise NoInputError(f"{root}: not a directory")


def shard_text(shard: tuple[int, int] | None) -> str:
    """`` in shard K/N`` or nothing, for messages."""
    return f" in shard {shard[0]}/{shard[1]}" if shard else ""


def in_shard(rel_path: str, shard: tuple[int, int] | None) -> bool:
    """Stable 1/N split by sha1 of the relative path (not Python's salted hash)."""
    if shard is None:
        return True
    k, n = shard
    digest = hashlib.sha1(os.fsencode(rel_path)).digest()  # UTF-8, or the name's bytes
    return int.from_bytes(digest[:8], "big") % n == k - 1


def relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def stat_key(path: Path) -> tuple[int, int] | None:
    """(size, mtime in µs) of a file, as the table records them; None if gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, int(st.st_mtime * 1e6)


def done_rows(previous: pa.Table | None) -> dict[str, tuple[int | None, int | None]]:
    """path -> (file_size, mtime in µs) of embedded rows; failed ones are retried."""
    if previous is None:
        return {}
    mtimes = previous.column("mtime").cast(pa.int64()).to_pylist()
    done: dict[str, tuple[int | None, int | None]] = {}
    rows = zip(
        previous.column("path").to_pylist(),
        previous.column("file_size").to_pylist(),
        mtimes,
        previous.column("error").to_pylist(),
        strict=True,
    )
    for path, size, mtime, error in rows:  # oldest first: the newest row wins
        if error is None:
            done[path] = (size, mtime)
        else:
            done.pop(path, None)
    return done


class ZonePlan:
    """The zones to embed, as an iterator of (key, :class:`Zone`), planned as
    they are taken (reprojected, a grid and window chosen).

    Args:
        zones: the zones file read.
        grids: the mosaic's grids (zones.mosaic).
        previous: rows of an earlier run with the same model (or None).
        shard: (K, N): only the zones whose sha1(key) % N == K - 1.
        chips: cut each zone into chips of this many grid pixels a side
            (zones.zone_chips): the iteration then yields their chips.

    A zone embedded before is skipped while its polygon is unchanged; failed
    zones are tried again (the rasters are not compared: after they change,
    start over).
    """

    def __init__(
        self,
        zones: ZoneFile,
        grids: list[Grid],
        previous: pa.Table | None,
        shard: tuple[int, int] | None = None,
        chips: int | None = None,
    ) -> None:
        self.zones, self.grids, self.shard, self.chips = zones, grids, shard, chips
        self.done = done_zones(previous)
        self.order: dict[str, int] = {}
        self.already_done = 0

    def __iter__(self) -> Iterator[tuple[str, Zone]]:
        for key, wkb in zip(self.zones.keys, self.zones.wkb, strict=True):
            if not in_shard(key, self.shard):
                continue
            zone = plan_zone(key, wkb, self.zones.crs, self.grids)
            self.order[key] = len(self.order)
            if self.done.get(key) == zone.fingerprint:
                self.already_done += 1
                continue
            if self.chips is None:
                yield key, zone
            else:
                for chip in zone_chips(zone, self.chips):
                    yield key, chip

    def count_todo(self) -> int:
        """About how many zones the iteration will yield (those of the shard
        not embedded before; an edited polygon is not seen here)."""
        keys = (k for k in self.zones.keys if in_shard(k, self.shard))
        return sum(k not in self.done for k in keys)

    def where(self) -> str:
        return shard_text(self.shard)

    def nothing_listed(self) -> str:
        return f"{self.zones.path}: no zones{self.where()}"


def done_zones(previous: pa.Table | None) -> dict[str, str]:
    """key -> fingerprint of the polygon of each embedded zone."""
    if previous is None:
        return {}
    done: dict[str, str] = {}
    rows = zip(
        previous.column("path").to_pylist(),
        previous.column("geometry").to_pylist(),
        previous.column("error").to_pylist(),
        strict=True,
    )
    for key, wkb, error in rows:  # oldest first: the newest row wins
        if error is None:
            done[key] = Zone(key, wkb84=wkb).fingerprint
        else:
            done.pop(key, None)
    return done
