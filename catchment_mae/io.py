"""Atomic writes: a temp file in the target directory, then ``os.replace``.

A crash or Ctrl-C mid-write leaves the previous file (or none), never half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from catchment_mae.errors import OutputError, OutputExistsError


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Yields a temp file beside ``path``; renames it into place on success."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yields the name of an empty temp file beside ``path``, for writers that
    take a name (a library's ``save(path)``); renames it into place, synced,
    on success."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _commit(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _temp_beside(path: Path) -> tuple[int, str]:
    """A new temp file in ``path``'s folder (made if missing): its fd and name."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from e


def _commit(tmp: str, path: Path) -> None:
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def fresh_output(path: str | os.PathLike[str], mode: str = "w") -> IO[Any]:
    """``path`` opened as a new file, for an output written as it grows (a log
    of epochs): the old name is unlinked first and the new file is created
    exclusively, so a hard link there loses only its name and a symlink planted
    there (even between the two steps) is refused, never written through."""
    path = Path(path)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        return os.fdopen(os.open(path, flags, 0o644), mode)
    except OSError as e:
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from e


def open_dir(path: str | os.PathLike[str], children: bool = False) -> tuple[int, Path]:
    """The directory at ``path`` opened without following a link in its place
    (OSError for a link or a file), and a path that reaches that directory
    whatever ``path`` leads to later (Linux's /proc/self/fd; with ``children``,
    /proc/PID/fd, which this process's reader processes reach too; ``path``
    itself where there is no /proc): names created under it are created in it.
    Close the descriptor."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    return fd, fd_path(fd, path, children)


def fd_path(fd: int, name: str | os.PathLike[str], children: bool = False) -> Path:
    """A path that opens what ``fd`` refers to, whatever ``name`` leads to now:
    Linux's /proc/self/fd/FD, or /proc/PID/fd/FD with ``children`` (this
    process's reader processes reach it too); ``name`` itself where there is
    no /proc (the check before the use then stands alone)."""
    if not Path("/proc/self/fd").is_dir():
        return Path(name)
    return Path("/proc", str(os.getpid()) if children else "self", "fd", str(fd))


def opened_inside(fd: int, folder: str | os.PathLike[str]) -> bool:
    """Whether what is open as ``fd`` lies inside ``folder``, by the kernel's own
    name for it (Linux's /proc/self/fd), not the name it was opened by; where
    there is no /proc, True (the caller's check of the name stands alone)."""
    try:
        real = Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return True
    return real.is_relative_to(Path(folder).resolve())


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_output(path, "w") as f:
        f.write(text)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    import torch

    with atomic_output(path, "wb") as f:
        torch.save(obj, f)


def check_writable(
    paths: Iterable[str | os.PathLike[str]], overwrite: bool = False
) -> None:
    """Fails early, before hours of work, if an output cannot be written.

    Raises:
        OutputExistsError: an output exists and ``overwrite`` is False.
        OutputError: its directory cannot be created or written.
    """
    for p in map(Path, paths):
        if p.exists() and not overwrite:
            raise OutputExistsError(
                f"{p}: already exists (use --overwrite to replace it)"
            )
        if p.is_dir():
            raise OutputError(f"{p}: is a directory")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=p.parent):
                pass
        except OSError as e:
            raise OutputError(f"{p}: cannot write there: {e.strerror or e}") from e


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def try_lock(path: str | os.PathLike[str], nofollow: bool = False) -> IO[str] | None:
    """Opens ``path`` and takes an exclusive ``flock`` on it without waiting.

    Returns the open file, which holds the lock until it is closed, or None when
    another open file (this process's or another's) holds it. Off POSIX there is
    no lock: the file is returned all the same.

    Args:
        nofollow: refuse a symlink at ``path`` (a lock in a shared directory).

    Raises:
        OSError: the file cannot be opened (a directory, a symlink with
            ``nofollow``, no permission).
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_APPEND
    if nofollow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        import fcntl
    except ImportError:  # not POSIX
        return os.fdopen(os.open(path, flags, 0o600), "a")
    for _ in range(10):
        handle = os.fdopen(os.open(path, flags, 0o600), "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        try:  # the holder may have removed the file while we opened it
            current = os.stat(path, follow_symlinks=not nofollow)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(current, os.fstat(handle.fileno())):
            return handle
        handle.close()  # we locked a removed file: lock the one there now
    raise OSError(f"{path}: the lock file keeps being replaced")


def private_dir(name: str = "cmae") -> Path:
    """A directory only this user can write, for locks: ``$XDG_RUNTIME_DIR/NAME``,
    else ``TMPDIR/NAME-UID``, created with mode 0700.

    Raises:
        OSError: it cannot be created, or what is there is a symlink, not a
            directory, another user's, or writable by others.
    """
    base = os.environ.get("XDG_RUNTIME_DIR")
    uid = os.getuid() if hasattr(os, "getuid") else None
    path = (
        Path(base) / name
        if base
        else Path(tempfile.gettempdir())
        / (f"{name}-{uid}" if uid is not None else name)
    )
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if (
        not stat.S_ISDIR(st.st_mode)  # a symlink or a file planted there
        or (uid is not None and st.st_uid != uid)
        or st.st_mode & 0o022
    ):
        raise OSError(f"{path} is not a private directory of this user")
    return path


def text_path(path: str) -> str:
    """``path`` as UTF-8 text, for tables and messages: a name whose bytes are
    not UTF-8 (Python holds them as surrogates, which Arrow refuses) keeps them
    as ``\\xNN`` escapes; any other path is itself."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    return path
