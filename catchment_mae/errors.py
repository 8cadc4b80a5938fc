"""Domain exceptions: library code raises these, the CLI turns them into one line."""

from __future__ import annotations

import os


class CmaeError(Exception):
    """Base class of every error cmae reports to a user."""


class ConfigError(CmaeError, ValueError):
    """A config key, value or type is wrong; ``key`` names it (None: no one key)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class BadRasterError(CmaeError):
    """A file cannot be used as a raster; names the file and the reason."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class NoInputError(CmaeError):
    """The input directory is missing, empty, or holds no usable raster."""


class OutputExistsError(CmaeError):
    """The output exists and --overwrite was not given."""


class OutputError(CmaeError):
    """The output cannot be written (unwritable directory, path under a file, ...)."""


class ModelLoadError(CmaeError):
    """NAME.pth / NAME.json cannot be loaded as a cmae model."""


class ExportError(CmaeError):
    """Export or its validation failed."""


class TrainingError(CmaeError):
    """Training cannot go on (non-finite loss, bad checkpoint, ...)."""


def band_mismatch(bands: int, in_chans: int) -> str:
    """Why a raster does not fit the model's channels (training and embedding)."""
    return (
        f"has {bands} band(s) but the model takes {in_chans} (in_chans; the bands "
        "are chosen with cmae train --bands)"
    )
