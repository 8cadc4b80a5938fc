"""What keeps ``cmae serve`` from being a file-reading, job-launching hole.

- Paths: every server-side path is confined to a root (``--data-root`` or
  ``--model-root``). Relative paths are taken from the root, absolute paths must
  lie inside it, and the check is made on the resolved path, so ``..`` and
  symlinks that lead out are refused. What was checked is then opened from the
  root's descriptor, one component at a time without following links
  (:func:`open_inside`): a component swapped for a symlink between the check and
  the use is refused, never followed; the file is read through its descriptor
  (:func:`held`), and outputs are written into a held folder's descriptor.
- Host header: on a loopback bind, only loopback names are answered (DNS
  rebinding: a hostile page whose name resolves to 127.0.0.1 is refused).
- Cross-site requests: a state-changing request whose ``Origin`` (or
  ``Sec-Fetch-Site``) shows another site is refused. Scripts without a browser
  send neither and are let through (behind the token where one is required).
- Token: required on every request when the server listens beyond loopback;
  taken from a header or the cookie set when the printed URL is first opened
  (the URL's ``?token=`` is then removed by a redirect, never accepted by the
  API, so it does not linger in histories and logs).
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import ipaddress
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from catchment_mae.io import fd_path

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class Refused(Exception):
    """A request refused, with the HTTP status and a message for the user."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def confine(
    root: Path, value: str | None, field: str, root_name: str, must_exist: bool = True
) -> Path:
    """``value`` as a path inside ``root``, or Refused(400) saying why not.

    Args:
        root: the resolved root directory.
        value: what the request named (relative to ``root``, or absolute).
        field: the request field, for the message.
        root_name: the option that set the root (``--data-root``), for the message.
        must_exist: refuse paths that do not exist (404).
    """
    if not value or not str(value).strip():
        raise Refused(400, f"{field}: a path is required", field)
    raw = str(value).strip()
    if "\x00" in raw:
        raise Refused(400, f"{field}: not a valid path", field)
    if len(raw) > 4096:
        raise Refused(
            400, f"{field}: a path of {len(raw)} characters is too long", field
        )
    candidate = Path(raw) if os.path.isabs(raw) else root / raw
    try:
        resolved = candidate.resolve(strict=False)  # follows symlinks, folds '..'
        exists = resolved.exists()
        linked = _has_symlink(root, candidate)
    except RuntimeError as e:  # a symlink loop
        raise Refused(400, f"{field}: {raw!r} is a symlink loop", field) from e
    except OSError as e:  # a name too long, ...
        raise Refused(400, f"{field}: {raw!r}: {e.strerror or e}", field) from e
    if not resolved.is_relative_to(root):
        why = "a symlink that leads" if linked else "a path"
        raise Refused(
            400, f"{field}: {raw!r} is {why} outside {root_name} ({root})", field
        )
    if must_exist and not exists:
        raise Refused(404, f"{field}: {raw!r} does not exist under {root_name}", field)
    return resolved


def open_inside(root: Path, path: Path, field: str, directory: bool = False) -> int:
    """A descriptor of ``path`` (a resolved path inside ``root``, as
    :func:`confine` returns), opened from ``root``'s descriptor one component
    at a time with ``O_NOFOLLOW``: a component swapped for a symlink (or a
    folder for a file) since the check is refused with Refused(400), never
    followed. A regular file, or with ``directory`` a folder; close it."""
    parts = path.relative_to(root).parts
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
            flags |= os.O_NONBLOCK if last and not directory else os.O_DIRECTORY
            nxt = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = nxt
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISDIR(mode) if directory else stat.S_ISREG(mode)):
            raise OSError(errno.EINVAL, "not a regular file")
        if not directory:
            os.set_blocking(fd, True)
        return fd
    except OSError as e:
        os.close(fd)
        if e.errno == errno.ENOENT:
            why = "does not exist"
        elif e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EINVAL):
            why = "a symlink or another kind of file is in its place"
        else:
            why = e.strerror or str(e)
        rel = path.relative_to(root).as_posix()
        raise Refused(400, f"{field}: {rel}: {why}", field) from e


def as_named(text: str, names: dict[Path, str]) -> str:
    """``text`` (a library's message) with each held path (:func:`held`) put
    back as the request named it."""
    for path, name in names.items():
        text = text.replace(str(path), name)
    return text


@contextlib.contextmanager
def held(root: Path, path: Path, field: str, directory: bool = False) -> Iterator[Path]:
    """:func:`open_inside`'s descriptor for the block, as a path that reaches
    the file or folder opened (for a folder, the names under it are created in
    it, wherever its name leads by then)."""
    fd = open_inside(root, path, field, directory)
    try:
        yield fd_path(fd, path)
    finally:
        os.close(fd)


def _has_symlink(root: Path, candidate: Path) -> bool:
    p = candidate
    while p != p.parent:
        if p.is_symlink():
            return True
        p = p.parent
    return False


def check_host(host_header: str | None, allowed: set[str] | None) -> None:
    """Refuses a Host header that is not an allowed name (None: any)."""
    if allowed is None:
        return
    host = _host_name(host_header or "")
    if host not in allowed:
        raise Refused(
            400,
            f"Host {host_header!r} is not served here (allowed: "
            f"{', '.join(sorted(allowed))}; see --allowed-host)",
        )


def check_same_origin(
    method: str, origin: str | None, fetch_site: str | None, host_header: str | None
) -> None:
    """Refuses a state-changing request sent from another site."""
    if method in ("GET", "HEAD", "OPTIONS"):
        return
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        raise Refused(403, f"cross-site request refused (Sec-Fetch-Site: {fetch_site})")
    if origin is None:
        return  # not a browser (curl, requests): the token, if any, decides
    if origin == "null" or urlsplit(origin).netloc != (host_header or ""):
        raise Refused(403, f"cross-site request refused (Origin: {origin})")


def check_token(expected: str | None, given: str | None) -> None:
    if expected is None:
        return
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        raise Refused(
            401,
            "an access token is required: open the URL that cmae serve printed, or "
            "send 'Authorization: Bearer TOKEN'",
        )


def _host_name(host_header: str) -> str:
    """'127.0.0.1:5000' -> '127.0.0.1'; '[::1]:5000' -> '::1'."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h
