"""A training run's data, built once before its loop (:class:`TrainData`).

The rasters listed (or their chips), the first pass that reads each of them
once into the decode-once cache (:mod:`catchment_mae.prepare`), the config
completed from what it found (the band count, the normalisation statistics,
the scale vector's centre and spread), the split into training and validation
samples, and each epoch's batches. When the normalisation is known before any
raster is read, the pass runs in a thread and the first epoch steps on the
rasters as it reads them (:func:`streams`); the loaders of the cache follow.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from catchment_mae import distributed
from catchment_mae.checkpoint import check_resume_config
from catchment_mae.config import TrainConfig
from catchment_mae.data import epoch_seed
from catchment_mae.errors import NoInputError, TrainingError
from catchment_mae.loaders import (
    StreamedEpoch,
    loader_workers,
    make_dataset,
    make_loader,
)
from catchment_mae.pass_thread import PassInThread
from catchment_mae.prepare import (
    Prepared,
    cache_facts,
    chip_items,
    describe,
    prepare,
)
from catchment_mae.ranks import Ranks
from catchment_mae.raster import find_tiffs
from catchment_mae.stats import usable_std
from catchment_mae.workers import READ_TIMEOUT

log = logging.getLogger(__name__)


class TrainData:
    """The data of one run: :meth:`open` reads (or starts reading) it; then
    ``cfg`` is the run's config completed from the data, :meth:`batches` gives
    each epoch's, :meth:`settle` is called after each epoch, ``val_loader``
    (None without validation samples) the validation pass's."""

    def __init__(
        self,
        cfg: TrainConfig,
        device: torch.device,
        ranks: Ranks,
        prepared: Prepared | None = None,
        stream: PassInThread | None = None,
    ) -> None:
        self.cfg, self.device, self.ranks = cfg, device, ranks
        self.prepared, self.stream = prepared, stream
        self.loader: Any = None
        self.val_loader: Any = None
        self.train_idx: list[int] = []
        self.val_idx: list[int] = []
        self.skipped: list[tuple[str, str]] = []
        self.first_pass_seconds = 0.0
        self._split: tuple[list[int], list[int]] = ([], [])
        self._first_epoch: StreamedEpoch | None = None

    @classmethod
    def open(
        cls,
        cfg: TrainConfig,
        items: list[Any],
        device: torch.device,
        ranks: Ranks,
        *,
        ckpt: dict[str, Any] | None = None,
        resume: str | Path | None = None,
        strict: bool = False,
        progress: bool = True,
        within: str | Path | None = None,
        cache_within: str | Path | None = None,
    ) -> TrainData:
        """The data of ``items`` (:func:`listing`): read first, or its first
        epoch streamed beside the pass (:func:`streams`). A resumed run's
        completed config is held to its checkpoint's."""
        if streams(cfg, ckpt, strict, ranks):
            stream = _start_pass(cfg, items, within, cache_within)
            try:
                first = stream.first()  # its band count is the model's
            except BaseException:
                stream.close()
                raise
            if cfg.preprocess.in_chans is None:
                cfg = cfg.merged({"in_chans": len(first.mean)})
            data = cls(cfg, device, ranks, stream=stream)
            # Over every listed sample, read well or not: the first epoch tells
            # the training samples before they are read; the later ones use it.
            data._split = split_items(stream.listed, cfg.val_fraction, cfg.seed)
            data._first_epoch = StreamedEpoch(
                stream, set(data._split[0]), cfg.preprocess_spec(), cfg.batch_size,
                pin=device.type == "cuda",
            )  # fmt: skip
            return data
        t0 = time.perf_counter()
        # Under torchrun the first process of each machine reads every raster
        # into the cache; the others then find it there.
        if not ranks.local_main:
            distributed.barrier(ranks)
        prepared = _prepare(cfg, items, strict, progress and ranks.main, within,
                            cache_within)  # fmt: skip
        if ranks.local_main:
            distributed.barrier(ranks)
        seconds = time.perf_counter() - t0
        try:
            cfg = complete_config(cfg, prepared)
            if ckpt is not None:
                cfg = check_resume_config(cfg, ckpt, resume)
        except BaseException:
            if prepared.cache is not None:
                prepared.cache.close()
            raise
        data = cls(cfg, device, ranks, prepared=prepared)
        data.first_pass_seconds = seconds
        data.train_idx, data.val_idx = split_items(
            prepared.files, cfg.val_fraction, cfg.seed
        )
        data._build_loaders()
        return data

    @property
    def train_count(self) -> int:
        """Training samples (all listed ones' share while the first is streamed)."""
        return len(self._split[0] if self.prepared is None else self.train_idx)

    def batches(self, epoch: int) -> Iterable[dict[str, Any]]:
        """The batches of ``epoch`` (the streamed first epoch, else the cache's
        loader, reshuffled for the epoch)."""
        if self.loader is None:
            assert self._first_epoch is not None
            return self._first_epoch
        self.loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        return self.loader

    def settle(self, failed: list[tuple[str, str]]) -> None:
        """After an epoch: its failed files warned about once each; after a
        streamed first epoch, the pass's result, the config completed from it
        and the cache's loaders."""
        if self.prepared is None:  # the first epoch read every raster
            assert self.stream is not None
            self.prepared = self.stream.result()
            self.first_pass_seconds = self.stream.seconds
            log.debug("%s", describe(self.prepared))
            self.cfg = complete_config(self.cfg, self.prepared)
            self.train_idx, self.val_idx = _at_positions(self.prepared, *self._split)
            self._build_loaders()
        known = {p for p, _ in self.skipped}
        for path, reason in failed:
            if path not in known:
                log.warning("skipped %s: %s", path, reason)
                self.skipped.append((path, reason))
                known.add(path)

    def preview_items(self, n: int = 4) -> list[Any]:
        """The first ``n`` validation samples (training ones without any)."""
        assert self.prepared is not None
        every = self.prepared.items  # built once: a list of every sample
        return [every[i] for i in (self.val_idx or self.train_idx)[:n]]

    def facts(self) -> dict[str, Any]:
        """What the run read, for its result."""
        prepared = self.prepared
        assert prepared is not None
        return {
            "files": len(prepared.files),
            "rasters": len(set(prepared.files)),
            "chips_skipped": prepared.chips_skipped,
            "skipped": self.skipped,
            "cache": describe(prepared),
            "cache_facts": cache_facts(prepared),
        }

    def stop_loaders(self) -> None:
        """Drops the loaders (their workers stop)."""
        self.loader = self.val_loader = None

    def close(self) -> None:
        self.stop_loaders()
        if self.stream is not None:  # it closes the cache it opened
            self.stream.close()
            self.first_pass_seconds = self.stream.seconds
        elif self.prepared is not None and self.prepared.cache is not None:
            self.prepared.cache.close()

    def _build_loaders(self) -> None:
        assert self.prepared is not None
        self.skipped = list(self.prepared.failed)
        self.loader = _loader(
            self.prepared, self.train_idx, self.cfg, self.device, True, self.ranks
        )
        self.val_loader = (
            _loader(self.prepared, self.val_idx, self.cfg, self.device, False)
            if self.val_idx
            else None
        )


def listing(cfg: TrainConfig, within: str | Path | None) -> list[Any]:
    """The rasters of ``input_dir`` (or their chips, with ``tile``), as listed."""
    files = list(find_tiffs(cfg.input_dir, cfg.recursive, within=within))
    if not files:
        raise NoInputError(f"{cfg.input_dir}: no .tif/.tiff files found")
    return chip_items(files, cfg.tile, cfg.tile_stride) if cfg.tile else files


def streams(
    cfg: TrainConfig, ckpt: dict[str, Any] | None, strict: bool, ranks: Ranks
) -> bool:
    """Whether the first epoch trains while the first pass reads the rasters.

    Only when no step needs the whole pass first: the normalisation is known
    before any raster is read (``--norm per-raster``, or ``--norm-mean`` and
    ``--norm-std`` given, not as a NAME.json of a run that computed them), so no
    statistic of the data is waited for; there is a
    cache for the samples to be read from; it is not --strict (every file
    checked before any step); one process (under torchrun every rank takes every
    step, and the others wait for the first to fill the cache); and the run
    does not resume (its first epoch is done).

    Its first epoch takes the training samples in the order the pass settles
    them (a shuffle drawn from the seed), whether the pass reads them or finds
    them in the cache: a second run over a filled cache trains the same way.
    """
    # A NAME.json whose statistics came from the data reproduces its run, which
    # read every raster first (streamed, the first epoch's order would differ).
    from_data = cfg.extra.get("norm_stats_from") == "data"
    known = cfg.preprocess.norm == "per-raster" or (
        cfg.preprocess.norm_mean is not None and not from_data
    )
    # The scale vector's centre and spread come from every raster too (and a
    # NAME.json whose ones did reproduces a run that read every raster first).
    scale_from_data = cfg.extra.get("scale_stats_from") == "data"
    known = known and not (
        cfg.preprocess.scale_stats and (cfg.scale_mean is None or scale_from_data)
    )
    return (
        known and cfg.cache and not strict and not ranks.active
        and ckpt is None and cfg.max_epochs > 0
    )  # fmt: skip


def complete_config(cfg: TrainConfig, prepared: Prepared) -> TrainConfig:
    """Fills in_chans, the data's mean/std (fixed norm) and the scale vector's
    centre and spread (with scale_stats)."""
    updates: dict[str, Any] = {}
    if cfg.preprocess.in_chans is None:
        updates["in_chans"] = prepared.bands
    if cfg.preprocess.norm_mean is None:
        updates["norm_mean"] = prepared.mean
        updates["norm_std"] = usable_std(prepared.std)
        updates["extra"] = {**cfg.extra, "norm_stats_from": "data"}
    if cfg.preprocess.scale_stats and cfg.scale_mean is None:
        vectors = np.stack([e.scale for e in prepared.entries]).astype(np.float64)
        spread = vectors.std(axis=0)
        updates["scale_mean"] = [round(float(v), 6) for v in vectors.mean(axis=0)]
        updates["scale_std"] = [round(float(v), 6) if v > 1e-6 else 1.0 for v in spread]
        extra = updates.get("extra", cfg.extra)
        updates["extra"] = {**extra, "scale_stats_from": "data"}
    return cfg.merged(updates)


# ------------------------------------------------------------------ the split
def split_files(
    files: list[Path], val_fraction: float, seed: int
) -> tuple[list[Path], list[Path]]:
    """A seeded split; at least one training file, no validation below 2 files."""
    train, val = split_indices(len(files), val_fraction, seed)
    return [files[i] for i in train], [files[i] for i in val]


def split_items(
    paths: list[Path], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """:func:`split_indices` by raster: the chips of one raster (``--tile``)
    all fall on the same side, so validation never sees a training raster.
    Whole rasters, in a seeded order, go to validation until it holds about
    ``val_fraction`` of the samples (one scene of 1,000 chips among nine small
    rasters is not drawn as the whole validation set); never all of them."""
    rasters = list(dict.fromkeys(paths))
    if len(rasters) == len(paths):  # no chips: the plain split
        return split_indices(len(paths), val_fraction, seed)
    sizes = Counter(paths)
    in_val: set[Path] = set()
    want, taken = val_fraction * len(paths), 0
    for k in np.random.default_rng(seed).permutation(len(rasters)):
        r = rasters[k]
        if taken >= want or len(in_val) == len(rasters) - 1:
            break
        if taken + sizes[r] <= 1.5 * want:  # a raster far above the share waits
            in_val.add(r)
            taken += sizes[r]
    return (
        [i for i, p in enumerate(paths) if p not in in_val],
        [i for i, p in enumerate(paths) if p in in_val],
    )


def split_indices(
    n: int, val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """:func:`split_files` on positions: (train, validation), each sorted."""
    n_val = int(round(n * val_fraction))
    n_val = min(n_val, n - 1) if n > 1 else 0
    if val_fraction > 0 and n_val == 0 and n >= 10:
        n_val = 1
    order = np.random.default_rng(seed).permutation(n)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def _at_positions(
    prepared: Prepared, train_pos: list[int], val_pos: list[int]
) -> tuple[list[int], list[int]]:
    """A split of every listed sample (a run whose first epoch trained while
    the rasters were read) as indices of ``prepared``'s usable ones; at least
    one training sample, as StreamedEpoch does. (A run that reads first splits
    the usable samples only.)"""
    where = {p: k for k, p in enumerate(prepared.positions)}
    train_idx = [where[p] for p in train_pos if p in where]
    val_idx = [where[p] for p in val_pos if p in where]
    if not train_idx:
        return val_idx, []
    return train_idx, val_idx


# -------------------------------------------------------------- the first pass
def _prepare(
    cfg: TrainConfig,
    items: list[Any],
    strict: bool,
    progress: bool,
    within: str | Path | None = None,
    cache_within: str | Path | None = None,
) -> Prepared:
    """The first pass: every raster read once (into the cache), checked, measured."""
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(items), desc="reading", unit="chip" if cfg.tile else "file",
        disable=None if progress else True, leave=False,
    )  # fmt: skip

    def on_file(path: Path, reason: str | None) -> None:
        bar.update(1)
        if strict and reason is not None:
            raise TrainingError(f"{path}: {reason} (--strict)")

    cache_root = None
    if cfg.cache:
        from catchment_mae.cache import default_cache_dir

        cache_root = cfg.cache_dir or default_cache_dir()
    try:
        prepared = prepare(
            items,
            cfg.preprocess_spec(),
            cache_root=cache_root,
            workers=loader_workers(cfg.num_workers, len(items)),
            on_file=on_file,
            timeout=READ_TIMEOUT,
            max_nodata=cfg.max_nodata,
            within=within,
            cache_within=cache_within,
        )
    except NoInputError as e:
        raise NoInputError(f"{cfg.input_dir}: {e}") from e
    finally:
        bar.close()
    if strict and prepared.screened:
        if prepared.cache is not None:
            prepared.cache.close()
        path, reason = prepared.screened[0]
        raise TrainingError(f"{path}: {reason} (--strict)")
    log.debug("%s", describe(prepared))
    return prepared


def _start_pass(
    cfg: TrainConfig,
    items: list[Any],
    within: str | Path | None = None,
    cache_within: str | Path | None = None,
) -> PassInThread:
    """The first pass (as :func:`_prepare`) in a thread, in a seeded order."""
    from catchment_mae.cache import default_cache_dir

    order = np.random.default_rng(epoch_seed(cfg.seed, 0)).permutation(len(items))
    return PassInThread(
        items,
        cfg.preprocess_spec(),
        cache_root=cfg.cache_dir or default_cache_dir(),
        workers=loader_workers(cfg.num_workers, len(items)),
        timeout=READ_TIMEOUT,
        max_nodata=cfg.max_nodata,
        order=order.tolist(),
        where=cfg.input_dir,
        within=within,
        cache_within=cache_within,
    )


def _loader(
    prepared: Prepared,
    indices: list[int],
    cfg: TrainConfig,
    device: torch.device,
    shuffle: bool,
    ranks: Ranks | None = None,
) -> DataLoader:
    ranks = ranks or Ranks()
    return make_loader(
        make_dataset(prepared, indices, cfg.preprocess_spec()),
        cfg.batch_size // ranks.world,  # this rank's share of the global batch
        shuffle=shuffle,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        device=device,
        rank=ranks.rank,
        world=ranks.world,
        on_gpu=cfg.cache_on_gpu,
    )
