"""Finding the TIFFs of a folder: lazily, in sorted order, links followed
but never out of a fence or round a loop."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

from catchment_mae.errors import NoInputError

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")


def is_tiff_name(name: str) -> bool:
    return name.lower().endswith(TIFF_SUFFIXES)


def find_tiffs(
    root: str | os.PathLike[str],
    recursive: bool = True,
    within: str | os.PathLike[str] | None = None,
) -> Iterator[Path]:
    """Yields the TIFFs under ``root`` lazily, in sorted path order.

    Symbolic links are followed, to files and to directories (a dataset is often
    a folder of links), but a walk never enters a directory twice (by device and
    inode) nor a directory that holds ``root`` (a link to ``/`` or to a parent
    would walk the whole machine, or loop). With ``within`` (the web UI passes its
    ``--data-root``), a file or directory that resolves outside it is skipped
    with a warning, symlinks included.

    Raises NoInputError when ``root`` is not a directory.
    """
    root = Path(root)
    if not root.exists():
        raise NoInputError(f"{root}: input directory does not exist")
    if not root.is_dir():
        raise NoInputError(f"{root}: not a directory")
    seen: set[tuple[int, int]] = set()
    fence = Path(within).resolve() if within is not None else None
    yield from _walk(root, recursive, seen, root.resolve(), fence)


def _walk(
    directory: Path,
    recursive: bool,
    seen: set[tuple[int, int]],
    top: Path,
    fence: Path | None,
) -> Iterator[Path]:
    try:
        st = directory.stat()
    except OSError as e:
        log.warning("%s: cannot list directory: %s", directory, e.strerror or e)
        return
    key = (st.st_dev, st.st_ino)
    if key in seen:
        return
    seen.add(key)
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        log.warning("%s: cannot list directory: %s", directory, e.strerror or e)
        return
    for entry in entries:
        path = Path(entry.path)
        try:
            is_dir = entry.is_dir()  # follows symlinks
            target = path.resolve() if entry.is_symlink() else None
        except (OSError, RuntimeError):  # a link loop, or unreadable
            if is_tiff_name(entry.name):
                yield path  # reading it fails, and says why (it was left out)
            continue
        if is_dir and not recursive:
            continue
        if not is_dir and not is_tiff_name(entry.name):
            continue
        if target is not None:
            if fence is not None and not target.is_relative_to(fence):
                log.warning("skipped %s: a symlink that leads outside %s", path, fence)
                continue
            if is_dir and top.is_relative_to(target):
                log.warning(
                    "skipped %s: a symlink to a folder that holds %s (a loop)",
                    path, top,
                )  # fmt: skip
                continue
        if is_dir:
            yield from _walk(path, recursive, seen, top, fence)
        else:
            yield path
