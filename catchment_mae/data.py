"""The torch Dataset over :mod:`catchment_mae.preprocess` (one path for all)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from catchment_mae.errors import BadRasterError
from catchment_mae.preprocess import PreprocessSpec, load_sample


class RasterDataset(Dataset):
    """Preprocessed rasters; a file that fails yields its reason instead of a crash.

    Args:
        paths: the TIFF files.
        spec: how to preprocess them (shared with embedding).
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]], spec: PreprocessSpec):
        self.paths = [os.fspath(p) for p in paths]
        self.spec = spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        try:
            s = load_sample(path, self.spec, maxworkers=1)
        except BadRasterError as e:
            return {"failed": (path, e.reason)}
        return {"image": s.image, "valid": s.valid, "scale": s.scale, "path": path}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacks the good samples; failures travel beside them as (path, reason)."""
    good = [it for it in items if "failed" not in it]
    batch: dict[str, Any] = {
        "failed": [it["failed"] for it in items if "failed" in it],
        "path": [it["path"] for it in good],
    }
    for key in ("image", "valid", "scale"):
        batch[key] = (
            torch.from_numpy(np.stack([it[key] for it in good])) if good else None
        )
    return batch
