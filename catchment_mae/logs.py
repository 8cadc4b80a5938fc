"""Logging on stderr: ``cmae: warning: FILE: reason`` lines, in every process.

The CLI sets the levels from ``-v``/``-q``; reader processes copy them, so a
warning from a worker reads like one from the main process (never a bare
library line), and tifffile's chatter about odd tags stays off unless asked for.
"""

from __future__ import annotations

import logging
import sys
from typing import Any


def configure(verbosity: int) -> None:
    """-q/-v counts to levels (rasterio's configure_logging); messages on stderr."""
    level = {-2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO}.get(
        max(verbosity, -2), logging.DEBUG
    )
    configure_worker(
        {
            "catchment_mae": level,
            # tifffile logs a line for every odd tag (a GDAL_NODATA outside the
            # dtype, which we handle; 10,000 lines for a GeoKeyDirectory claiming
            # 10,000 keys): cmae says what is wrong with a file in one line of its
            # own, so tifffile's lines show only with -vv.
            "tifffile": logging.DEBUG if verbosity >= 2 else logging.CRITICAL + 1,
        }
    )


def configure_worker(levels: dict[str, int]) -> None:
    """Sets each named logger's level; ours gets the one-line stderr format;
    codecs' own lines on stderr go to the debug log (:class:`_CodecLines`)."""
    if not isinstance(sys.stderr, _CodecLines):
        sys.stderr = _CodecLines(sys.stderr)  # type: ignore[assignment]
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    handler = _LineHandler(sys.stderr)
    handler.setFormatter(Formatter())
    pkg = logging.getLogger("catchment_mae")
    pkg.handlers[:] = [handler]
    pkg.propagate = False


class _CodecLines:
    """sys.stderr without the lines a codec writes there itself: libpng's
    "PNG warning: IDAT: incorrect data check", printed by imagecodecs for a
    damaged strip of which cmae says, in its own line, what is wrong. Those
    lines go to the debug log (``-vv``); everything else passes."""

    PREFIXES = ("PNG warning: ",)

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        if text.startswith(self.PREFIXES):
            logging.getLogger("catchment_mae.codecs").debug("%s", text.rstrip())
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, encoding
        return getattr(self._stream, name)


class _LineHandler(logging.StreamHandler):
    """On a terminal, each message starts on a cleared line: a progress bar
    (tqdm redraws its line with a carriage return) shared its line with a
    warning ("embedding: 1raster [00:04]cmae: warning: ..."); the bar draws
    itself again below at its next update. Reader processes write here too, so
    tqdm's own logging redirection (main process only) would not do."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return "\r\x1b[2K" + text if _is_terminal(self.stream) else text


def _is_terminal(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):  # closed, or not a file
        return False


class Formatter(logging.Formatter):
    """``cmae: warning: ...`` for warnings and errors, the bare message below."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"cmae: {record.levelname.lower()}: {msg}"
        return msg
