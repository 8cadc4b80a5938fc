"""The reader tasks that ``feed.py`` and ``feed_pass.py`` put in place of the
real ones: a module of their own, since cmae's reader processes import
modules, never the script that started them (``catchment_mae.workers``)."""

from __future__ import annotations

import os
import time

from catchment_mae.batch.schema import Row
from catchment_mae.cache import Entry
from catchment_mae.preprocess import load_resampled
from catchment_mae.shard_rows import write_row

_template = None


def fake_read(root, rel, spec, layout, slot, chip=None, within=None):  # noqa: ANN001, ANN201
    """embed-dir's read without the reading: ``CMAE_FEED_READ_MS`` of sleep and
    a row like a DEM's (the ring slot keeps what it holds)."""
    t0 = time.perf_counter()
    time.sleep(float(os.environ["CMAE_FEED_READ_MS"]) / 1000)
    row = Row(
        path=rel, height=300, width=300, bands=1, dtype="int16",
        nodata_fraction=0.1, file_size=1000, mtime=1.0, crs="EPSG:32633",
        pixel_size_x=30.0, pixel_size_y=30.0,
    )  # fmt: skip
    return row, time.perf_counter() - t0


def fake_build(path, key, spec, target, within=None):  # noqa: ANN001, ANN201
    """Training's read without the decoding: ``CMAE_FEED_READ_MS`` of sleep,
    then a real DEM's preprocessed arrays (``CMAE_FEED_DEM``) written into the
    shard row (``within``, the readers' fence, has nothing to check here)."""
    global _template
    time.sleep(float(os.environ["CMAE_FEED_READ_MS"]) / 1000)
    if _template is None:
        _template = load_resampled(os.environ["CMAE_FEED_DEM"], spec)
    crc = write_row(target, _template) if target is not None else 0
    return Entry.of(key, _template), crc, None
