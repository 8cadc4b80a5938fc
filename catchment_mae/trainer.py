"""The training loop (after MAE's ``engine_pretrain``) and ``train(cfg)``.

``train_one_epoch`` takes the model, loader, optimizer, device and epoch and returns
a dict of averages; ``train`` owns set-up, the first pass over the data (which
fills the decode-once cache, :mod:`catchment_mae.prepare`), resume, saving and
logging; when the normalisation is known up front, the first epoch steps on the
rasters while that pass reads them (``_streams``). Each epoch reseeds torch
from ``(seed, epoch)``, so masks, flips and the shuffle of epoch ``e`` do not
depend on how the run got there: resuming from an epoch checkpoint gives the
same weights as an uninterrupted run (on the CPU).

The loss stays on the device: it is read back (a host sync on a GPU) every
``log_every`` steps and at the end of each epoch, not after every step.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from catchment_mae import distributed
from catchment_mae.checkpoint import (
    check_resume_config,
    load_checkpoint,
    save_checkpoint,
    save_model,
)
from catchment_mae.config import TrainConfig
from catchment_mae.data import epoch_seed
from catchment_mae.errors import ConfigError, NoInputError, TrainingError
from catchment_mae.interrupt import ignore_interrupts, sigterm_as_interrupt
from catchment_mae.io import check_writable, fresh_output
from catchment_mae.loaders import (
    StreamedEpoch,
    loader_workers,
    make_dataset,
    make_loader,
    random_flips,
    to_model_input,
)
from catchment_mae.model import ScaleAwareMAE, build_model
from catchment_mae.prepare import (
    PassInThread,
    Prepared,
    cache_facts,
    chip_items,
    describe,
    prepare,
)
from catchment_mae.preprocess import PreprocessSpec
from catchment_mae.ranks import Ranks, ranks_from_env
from catchment_mae.raster import find_tiffs
from catchment_mae.workers import READ_TIMEOUT

log = logging.getLogger(__name__)


class TrainingInterrupted(TrainingError):
    """Ctrl-C or SIGTERM; the last epoch checkpoint is intact."""

    exit_code = 130  # the shell's code for a run stopped by a signal


@dataclass
class TrainResult:
    """What a finished run wrote and measured."""

    weights_path: Path
    config_path: Path
    checkpoint_path: Path
    metrics_path: Path
    config: TrainConfig
    epochs_run: int
    history: list[dict[str, Any]] = field(default_factory=list)
    files: int = 0  # samples: rasters, or chips with --tile
    rasters: int = 0
    chips_skipped: int = 0  # --tile: chips left out for nodata
    skipped: list[tuple[str, str]] = field(default_factory=list)
    cache: str = ""  # one line: what the cache held, where, how big
    cache_facts: dict[str, Any] = field(default_factory=dict)  # the same, numbers
    first_pass_seconds: float = 0.0  # reading, checking, caching every raster

    def summary(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {
            "weights": str(self.weights_path),
            "config": str(self.config_path),
            "checkpoint": str(self.checkpoint_path),
            "metrics": str(self.metrics_path),
            "epochs_run": self.epochs_run,
            "files": self.files,
            "rasters": self.rasters,
            "chips_skipped": self.chips_skipped,
            "skipped": len(self.skipped),
            "train_loss": last.get("train_loss"),
            "val_loss": last.get("val_loss"),
            "cache": self.cache,
            **self.cache_facts,
            "first_pass_seconds": round(self.first_pass_seconds, 3),
        }


# ------------------------------------------------------------------- schedule
def lr_at(epoch: float, cfg: TrainConfig) -> float:
    """Learning rate at a fractional epoch (MAE's ``lr_sched``): a pure function."""
    base, warmup = cfg.base_lr, cfg.warmup_epochs
    # 1) linear warm-up from 0
    if epoch < warmup:
        return base * epoch / warmup
    # 2) half-cycle cosine from base down to min_lr at max_epochs
    span = max(cfg.max_epochs - warmup, 1e-8)
    progress = min(max((epoch - warmup) / span, 0.0), 1.0)
    return cfg.min_lr + (base - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX)."""
    try:  # torch has no public API for this yet
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2")


def warn_slow_bf16(device: torch.device, precision: str) -> None:
    """bf16 autocast on a CPU without native bf16 is many times slower than fp32."""
    if precision != "bf16" or device.type != "cpu":
        return
    if not native_cpu_bf16():
        log.warning(
            "this CPU (%s) has no native bf16: --precision bf16 runs many times "
            "slower than fp32 here (benchmarks/README.md)",
            torch.backends.cpu.get_cpu_capability(),
        )


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but torch sees no CUDA GPU")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_context(
    device: torch.device, precision: str
) -> contextlib.AbstractContextManager:
    """Chosen once (nanoGPT): a no-op for fp32, bf16 autocast otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------- epoch
def train_one_epoch(
    model: ScaleAwareMAE,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    cfg: TrainConfig,
    on_batch_end: Callable[[dict[str, Any]], None] | None = None,
    ranks: Ranks | None = None,
) -> dict[str, Any]:
    """One pass over the loader; returns averages and the files that failed.

    A step whose loss is not finite changes nothing: the fused AdamW skips it on
    the device (no host sync), and it is reported, naming its batch's files,
    when the loss is next read. ``on_batch_end`` is called every
    ``cfg.log_every`` steps and after the last one, with the mean loss of the
    steps since its previous call. ``len(loader)`` may misjudge the steps (the
    first epoch while the rasters are read: some may fail); such a loader's
    batches say how far through the epoch each takes the schedule (``done``).

    Raises:
        TrainingError: no step of the epoch had a finite loss.
    """
    ranks = ranks or Ranks()
    model.train()
    steps = max(len(loader), 1)
    flip_gen = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch) + 1)
    failed: list[tuple[str, str]] = []
    meter = _LossMeter(device, f"epoch {epoch + 1}")
    start = time.perf_counter()
    autocast = autocast_context(device, cfg.precision)
    at = 0.0  # the share of the epoch done: where the learning rate stands

    def report(done: int) -> None:
        mean, n = meter.read()
        if on_batch_end is not None and n:
            elapsed = time.perf_counter() - start
            on_batch_end(
                {
                    "epoch": epoch,
                    "epochs": cfg.max_epochs,
                    "step": done,
                    "steps": steps,
                    "loss": mean,
                    "lr": lr_at(epoch + at, cfg),
                    "images_per_s": meter.images / max(elapsed, 1e-9),
                }
            )

    step = -1
    for step, batch in enumerate(loader):
        failed.extend(batch["failed"])
        # Under torchrun every rank takes every step (gradients are averaged
        # over the ranks): one whose files all failed steps with a zero loss.
        ignored = batch["z"] is None and ranks.active
        if batch["z"] is not None or ignored:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch + at, cfg)
            if ignored:
                images, valid, scale = _stand_in(cfg, device)
            else:
                images, valid, scale = to_model_input(batch, device)
            if cfg.flips:
                images, valid = random_flips(images, valid, flip_gen)
            with autocast:
                loss, _, _ = model(images, valid, scale)
            optimizer.zero_grad(set_to_none=True)
            if ignored:
                (loss * 0.0).backward()
                finite = torch.ones((), dtype=torch.bool, device=device)
            else:
                loss.backward()
                finite = meter.add(loss, images.shape[0], batch["path"], step + 1)
            skip_unless_finite(optimizer, distributed.all_finite(finite, ranks))
            optimizer.step()
        at = batch.get("done", min((step + 1) / steps, 1.0))
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            report(step + 1)
    at = 1.0  # the epoch is over, whatever its last batch said (failures after it)
    if meter.steps:  # more or fewer steps than len(loader) said: the last ones
        report(step + 1)
    seconds = time.perf_counter() - start
    total, images, skipped = distributed.sum_over_ranks(
        [meter.total, meter.images, meter.skipped], ranks, device
    )
    if skipped and not images:
        raise TrainingError(
            f"the loss was not finite at any step of epoch {epoch + 1} (lower "
            "--lr, or check the data's norm_mean/norm_std)"
        )
    return {
        "train_loss": total / images if images else float("nan"),
        "images": int(images),
        "skipped_steps": int(skipped),
        "seconds": seconds,
        "images_per_s": images / max(seconds, 1e-9),
        "lr": lr_at(epoch + 1, cfg),
        "failed": failed,
    }


def _stand_in(
    cfg: TrainConfig, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A one-image batch of zeros, every pixel valid: a step's input on a rank
    whose batch failed (its loss is multiplied by 0)."""
    size = int(cfg.image_size or 1)
    chans = int(cfg.in_chans or 1) + int(bool(cfg.slope_channel))
    images = torch.zeros(1, chans, size, size, device=device)
    return (
        images,
        torch.ones(1, 1, size, size, device=device),
        torch.zeros(1, cfg.scale_dim, device=device),
    )


def skip_unless_finite(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """Makes the next ``optimizer.step()`` a no-op unless ``finite`` (a device
    bool): fused AdamW reads ``found_inf`` on the device, as GradScaler sets it,
    so no host sync is needed. Other optimizers check on the host."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~finite).float()  # type: ignore[attr-defined]
    elif not bool(finite):
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # an optimizer skips parameters without a gradient


class _LossMeter:
    """Sums the finite losses on the device; read back only when asked (one host
    sync), when the steps whose loss was not finite are reported."""

    def __init__(self, device: torch.device, where: str) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, n
        self.where = where
        self.steps: list[tuple[torch.Tensor, list[str], int]] = []
        self.total, self.images, self.skipped = 0.0, 0, 0

    def add(self, loss: torch.Tensor, n: int, paths: list[str], step: int) -> Any:
        """Counts one step; returns whether its loss is finite (on the device)."""
        loss = loss.detach()
        finite = torch.isfinite(loss)
        ok = finite.double()
        self.sums += torch.stack([torch.where(finite, loss.double(), 0.0) * n, ok * n])
        self.steps.append((finite, paths, step))
        return finite

    def read(self) -> tuple[float, int]:
        """Mean loss and images since the last read (a warning names the files
        of any step whose loss was not finite)."""
        if not self.steps:
            return math.nan, 0
        flags = torch.stack([f for f, _, _ in self.steps]).tolist()
        loss, n = self.sums.tolist()
        self.sums.zero_()
        bad = [(s, paths) for (_, paths, s), ok in zip(self.steps, flags, strict=True)
               if not ok]  # fmt: skip
        self.steps = []
        if bad:
            self.skipped += len(bad)
            names = [Path(p).name for _, paths in bad for p in paths]
            more = f" and {len(names) - 8} more" if len(names) > 8 else ""
            log.warning(
                "skipped %d step(s) of %s whose loss was not finite (step %s); "
                "their batches held %s%s",
                len(bad), self.where, ", ".join(str(s) for s, _ in bad),
                ", ".join(names[:8]), more,
            )  # fmt: skip
        self.total += loss
        self.images += int(n)
        return (loss / n if n else math.nan), int(n)

    @property
    def mean(self) -> float:
        return self.total / self.images if self.images else float("nan")


@torch.no_grad()
def evaluate(
    model: ScaleAwareMAE, loader: DataLoader, device: torch.device, cfg: TrainConfig
) -> float | None:
    """Mean masked-reconstruction loss with fixed masks (comparable across epochs).

    None when no validation raster could be read.
    """
    model.eval()
    meter = _LossMeter(device, "the validation pass")
    with _seeded(epoch_seed(cfg.seed, 10**6)), autocast_context(device, cfg.precision):
        for step, batch in enumerate(loader):
            if batch["z"] is None:
                continue
            images, valid, scale = to_model_input(batch, device)
            loss, _, _ = model(images, valid, scale)
            meter.add(loss, images.shape[0], batch["path"], step + 1)
    mean, n = meter.read()
    return mean if n else None


# ---------------------------------------------------------------------- train
# SIGTERM as Ctrl-C for the whole run: the first pass (the longest part of a
# large run when the statistics come from the data) was killed without a word
# (exit 143, temporary shard files left); the epochs' own handler says more.
@sigterm_as_interrupt()
def train(
    config: TrainConfig | dict[str, Any],
    *,
    overwrite: bool = False,
    resume: str | Path | None = None,
    strict: bool = False,
    progress: bool = True,
    within: str | Path | None = None,
    on_batch_end: Callable[[dict[str, Any]], None] | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    cache_within: str | Path | None = None,
) -> TrainResult:
    """Trains a scale-aware MAE and writes ``NAME.pth`` + ``NAME.json``.

    Args:
        config: a TrainConfig or the original tool's config dict.
        overwrite: replace existing outputs (otherwise OutputExistsError).
        resume: an epoch checkpoint (``NAME.ckpt.pth``) to continue from.
        strict: stop at the first bad file instead of skipping it.
        progress: show a progress bar on stderr.
        within: skip rasters (symlinks included) that resolve outside this folder
            (the web UI's --data-root), and refuse each one whose file, once
            opened, lies outside it.
        on_batch_end, on_epoch_end: progress hooks (web UI, tests).
        cache_within: the cache's folder must lie in this one, checked on the
            folder opened (the web UI's --model-root).
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    if not cfg.input_dir:
        raise ConfigError("input_dir is not set")
    ckpt = load_checkpoint(resume) if resume is not None else None
    if ckpt is not None and not cfg.resolved:  # the choices its first part made
        cfg = cfg.merged(
            {k: v for k, v in ckpt["config"].items() if _left_to_choose(cfg, k)}
        )
    # A resumed run finishes the outputs its first part was about to write.
    check_writable(
        [cfg.weights_path, cfg.config_path], overwrite=overwrite or ckpt is not None
    )
    ranks = ranks_from_env()
    if cfg.batch_size % ranks.world:
        raise ConfigError(
            f"batch_size {cfg.batch_size} is the global batch: it must divide "
            f"among the {ranks.world} processes",
            key="batch_size",
        )
    device = distributed.start(ranks, pick_device(cfg.device))
    confined = _READ_WITHIN.set(None if within is None else str(within))
    try:
        items = _listing(cfg, within)
        cfg, chosen = _choose(cfg, items, device)
        if _streams(cfg, ckpt, strict, ranks):
            stream = _start_pass(cfg, items, within, cache_within)
            try:
                result = _train(
                    cfg, None, device, ckpt, resume, progress, on_batch_end,
                    on_epoch_end, ranks, chosen, stream,
                )  # fmt: skip
            finally:
                stream.close()
            result.first_pass_seconds = stream.seconds
            return result
        t0 = time.perf_counter()
        # Under torchrun the first process of each machine reads every raster
        # into the cache; the others then find it there.
        if not ranks.local_main:
            distributed.barrier(ranks)
        prepared = _prepare(
            cfg, items, strict, progress and ranks.main, within, cache_within
        )
        if ranks.local_main:
            distributed.barrier(ranks)
        first_pass = time.perf_counter() - t0
        try:
            result = _train(
                cfg, prepared, device, ckpt, resume, progress, on_batch_end,
                on_epoch_end, ranks, chosen,
            )  # fmt: skip
            result.first_pass_seconds = first_pass
            return result
        finally:
            if prepared.cache is not None:
                prepared.cache.close()
    finally:
        _READ_WITHIN.reset(confined)
        distributed.stop(ranks)
        if device.type == "cuda":  # a server's next job sees the memory free
            torch.cuda.empty_cache()


def _train(
    cfg: TrainConfig,
    prepared: Prepared | None,
    device: torch.device,
    ckpt: dict[str, Any] | None,
    resume: str | Path | None,
    progress: bool,
    on_batch_end: Callable[[dict[str, Any]], None] | None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None,
    ranks: Ranks,
    chosen: str = "",
    stream: PassInThread | None = None,
) -> TrainResult:
    """The epochs, after the first pass (``prepared``) or during it (``stream``:
    the first epoch steps on the samples as they are read; see _streams).
    ``chosen`` (what the run chose, one line) is said before the first step."""
    if chosen and ranks.main:
        log.info("%s", chosen)
    if stream is not None:
        first = stream.first()  # its band count is the model's
        if cfg.in_chans is None:
            cfg = cfg.merged({"in_chans": len(first.mean)})
    else:
        assert prepared is not None
        cfg = _complete_config(cfg, prepared)
    if ckpt is not None:
        cfg = check_resume_config(cfg, ckpt, resume)
    spec = cfg.preprocess_spec()
    warn_slow_bf16(device, cfg.precision)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    optimizer = _optimizer(model, cfg)
    start_epoch, history = 0, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, history = int(ckpt["epoch"]) + 1, list(ckpt["history"])
        if ranks.main and start_epoch >= cfg.max_epochs:
            log.warning(
                "%s has all %d epoch(s) done: nothing to train; its outputs are "
                "written again (raise --epochs to train on)",
                resume, cfg.max_epochs,
            )  # fmt: skip
        elif ranks.main:
            log.info("resuming %s at epoch %d", resume, start_epoch + 1)
    step_model = distributed.wrap(model, ranks, device)  # forward and backward

    loader = val_loader = None
    if prepared is not None:
        train_idx, val_idx = split_items(prepared.files, cfg.val_fraction, cfg.seed)
        loader, val_loader = _loaders(
            prepared, train_idx, val_idx, spec, cfg, device, ranks
        )
        skipped = list(prepared.failed)
    else:
        assert stream is not None
        # Over every listed sample, read well or not: the first epoch tells the
        # training samples before they are read; the later ones use it too.
        split = split_items(stream.listed, cfg.val_fraction, cfg.seed)
        train_pos = split[0]
        first_epoch = StreamedEpoch(
            stream, set(train_pos), spec, cfg.batch_size, pin=device.type == "cuda"
        )
        skipped = []
    bar = _ProgressBar(
        progress and ranks.main,
        cfg,
        len(train_idx if prepared is not None else train_pos),
    )
    writes = ranks.main  # one process writes the outputs, logs and plots
    try:
        with (
            sigterm_as_interrupt(),
            fresh_output(cfg.metrics_path)
            if writes
            else open(os.devnull, "w") as metrics,
        ):
            for stats in history:  # a resumed run rewrites the finished epochs first
                metrics.write(json.dumps(stats) + "\n")
            for epoch in range(start_epoch, cfg.max_epochs):
                if loader is not None:
                    loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
                with _seeded(epoch_seed(cfg.seed, epoch)):
                    bar.start_epoch(epoch)
                    stats = train_one_epoch(
                        step_model,
                        first_epoch if loader is None else loader,
                        optimizer, device, epoch, cfg,
                        on_batch_end=_chain(bar.update, on_batch_end)
                        if writes else None,
                        ranks=ranks,
                    )  # fmt: skip
                if prepared is None:  # the first epoch read every raster
                    assert stream is not None
                    prepared = stream.result()
                    log.debug("%s", describe(prepared))
                    cfg = _complete_config(cfg, prepared)
                    spec = cfg.preprocess_spec()
                    train_idx, val_idx = _at_positions(prepared, *split)
                    loader, val_loader = _loaders(
                        prepared, train_idx, val_idx, spec, cfg, device, ranks
                    )
                    skipped = list(prepared.failed)
                _record_failures(stats.pop("failed"), skipped)
                if stats["images"] == 0:
                    raise NoInputError(
                        f"{cfg.input_dir}: no raster could be read this epoch"
                    )
                stats["epoch"] = epoch + 1
                stats["val_loss"] = (
                    evaluate(model, val_loader, device, cfg) if val_loader else None
                )
                history.append(stats)
                if writes:
                    save_checkpoint(cfg, model, optimizer, epoch, history)
                    metrics.write(json.dumps(stats) + "\n")
                    metrics.flush()
                    bar.end_epoch(stats)
                    if on_epoch_end is not None:
                        on_epoch_end(stats)
    except KeyboardInterrupt as e:
        if ranks.active:  # the launcher forwards the same signal: one stop is enough
            ignore_interrupts()
        bar.close()
        done = len(history)
        hint = (
            f"resume with --resume {cfg.checkpoint_path}"
            if done
            else "no epoch had finished, so there is nothing to resume"
        )
        raise TrainingInterrupted(
            f"interrupted after {done} of {cfg.max_epochs} epoch(s); {hint}"
        ) from e
    finally:
        bar.close()
        del loader, val_loader  # stop their workers before the plots
    assert prepared is not None
    if writes:
        save_model(cfg, model, len(history))
        every = prepared.items  # built once: a list of every sample
        items = [every[i] for i in (val_idx or train_idx)[:4]]
        _save_plots(cfg, model, history, items, spec, device)
    distributed.barrier(ranks)  # the outputs are written when any rank returns
    return TrainResult(
        weights_path=cfg.weights_path,
        config_path=cfg.config_path,
        checkpoint_path=cfg.checkpoint_path,
        metrics_path=cfg.metrics_path,
        config=cfg,
        epochs_run=cfg.max_epochs - start_epoch,
        history=history,
        files=len(prepared.files),
        rasters=len(set(prepared.files)),
        chips_skipped=prepared.chips_skipped,
        skipped=skipped,
        cache=describe(prepared),
        cache_facts=cache_facts(prepared),
    )


def _left_to_choose(cfg: TrainConfig, key: str) -> bool:
    """Whether ``key`` is one :mod:`catchment_mae.defaults` would choose in
    ``cfg`` (so a checkpoint's value for it is the run's)."""
    from catchment_mae.config import AUTO
    from catchment_mae.defaults import CHOSEN_KEYS

    return key in CHOSEN_KEYS and getattr(cfg, key) in (None, AUTO)


def _choose(
    cfg: TrainConfig, items: list[Any], device: torch.device
) -> tuple[TrainConfig, str]:
    """Chooses what the config leaves open (:mod:`catchment_mae.defaults`) and
    gives torch the threads chosen (CPU); returns the config and the line that
    says what the run does."""
    from catchment_mae.defaults import resolve
    from catchment_mae.workers import available_cores

    paths = list(dict.fromkeys(i[0] if isinstance(i, tuple) else i for i in items))
    threads = cfg.threads
    if threads is None:  # a machine's setting, not the model's: not recorded
        # Under torchrun the launcher gave each process its share of the cores.
        threads = torch.get_num_threads() if ranks_from_env().active else None
        threads = threads or available_cores()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    return resolve(cfg, paths, len(items), device.type, threads)


def _streams(
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
    known = cfg.norm == "per-raster" or (cfg.norm_mean is not None and not from_data)
    # The scale vector's centre and spread come from every raster too (and a
    # NAME.json whose ones did reproduces a run that read every raster first).
    scale_from_data = cfg.extra.get("scale_stats_from") == "data"
    known = known and not (
        cfg.scale_stats and (cfg.scale_mean is None or scale_from_data)
    )
    return (
        known and cfg.cache and not strict and not ranks.active
        and ckpt is None and cfg.max_epochs > 0
    )  # fmt: skip


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


def _loaders(
    prepared: Prepared,
    train_idx: list[int],
    val_idx: list[int],
    spec: PreprocessSpec,
    cfg: TrainConfig,
    device: torch.device,
    ranks: Ranks,
) -> tuple[Any, Any]:
    """The training loader and the validation one (None without samples)."""
    loader = _loader(prepared, train_idx, spec, cfg, device, shuffle=True, ranks=ranks)
    val_loader = (
        _loader(prepared, val_idx, spec, cfg, device, shuffle=False)
        if val_idx
        else None
    )
    return loader, val_loader


def _record_failures(
    failed: list[tuple[str, str]], skipped: list[tuple[str, str]]
) -> None:
    """Warns once per file that failed while loading (e.g. decoding errors)."""
    known = {p for p, _ in skipped}
    for path, reason in failed:
        if path not in known:
            log.warning("skipped %s: %s", path, reason)
            skipped.append((path, reason))
            known.add(path)


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


# -------------------------------------------------------------------- helpers
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


def _listing(cfg: TrainConfig, within: str | Path | None) -> list[Any]:
    """The rasters of ``input_dir`` (or their chips, with ``tile``), as listed."""
    files = list(find_tiffs(cfg.input_dir, cfg.recursive, within=within))
    if not files:
        raise NoInputError(f"{cfg.input_dir}: no .tif/.tiff files found")
    return chip_items(files, cfg.tile, cfg.tile_stride) if cfg.tile else files


def _complete_config(cfg: TrainConfig, prepared: Prepared) -> TrainConfig:
    """Fills in_chans, the data's mean/std (fixed norm) and the scale vector's
    centre and spread (with scale_stats)."""
    updates: dict[str, Any] = {}
    if cfg.in_chans is None:
        updates["in_chans"] = prepared.bands
    if cfg.norm_mean is None:
        updates["norm_mean"] = prepared.mean
        updates["norm_std"] = [s if s > 0 else 1.0 for s in prepared.std]
        updates["extra"] = {**cfg.extra, "norm_stats_from": "data"}
    if cfg.scale_stats and cfg.scale_mean is None:
        vectors = np.stack([e.scale for e in prepared.entries]).astype(np.float64)
        spread = vectors.std(axis=0)
        updates["scale_mean"] = [round(float(v), 6) for v in vectors.mean(axis=0)]
        updates["scale_std"] = [round(float(v), 6) if v > 1e-6 else 1.0 for v in spread]
        extra = updates.get("extra", cfg.extra)
        updates["extra"] = {**extra, "scale_stats_from": "data"}
    return cfg.merged(updates)


def _optimizer(model: ScaleAwareMAE, cfg: TrainConfig) -> torch.optim.Optimizer:
    from timm.optim import param_groups_weight_decay

    # No weight decay on biases, norms, tokens and position embeddings (MAE).
    groups = param_groups_weight_decay(model, cfg.weight_decay)
    # Fused: one kernel for all parameters, and it skips a step on the device
    # when the loss is not finite (skip_unless_finite).
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.base_lr, betas=(0.9, 0.95), fused=fused)


def _loader(
    prepared: Prepared,
    indices: list[int],
    spec: PreprocessSpec,
    cfg: TrainConfig,
    device: torch.device,
    shuffle: bool,
    ranks: Ranks | None = None,
) -> DataLoader:
    ranks = ranks or Ranks()
    return make_loader(
        make_dataset(prepared, indices, spec),
        cfg.batch_size // ranks.world,  # this rank's share of the global batch
        shuffle=shuffle,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        device=device,
        rank=ranks.rank,
        world=ranks.world,
        on_gpu=cfg.cache_on_gpu,
    )


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seeds torch (CPU and CUDA) for a block, restoring the previous state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _chain(
    *fns: Callable[[dict[str, Any]], None] | None,
) -> Callable[[dict[str, Any]], None]:
    def call(info: dict[str, Any]) -> None:
        for fn in fns:
            if fn is not None:
                fn(info)

    return call


class _ProgressBar:
    """tqdm bar per epoch: loss, images/s; ETA from tqdm. Once, after the first
    steps, a line with the time the whole run will take at that rate."""

    def __init__(self, enabled: bool, cfg: TrainConfig, n_files: int) -> None:
        self.enabled, self.cfg, self.n_files = enabled, cfg, n_files
        self.bar: Any = None
        self.estimated = not enabled

    def start_epoch(self, epoch: int) -> None:
        from tqdm.auto import tqdm

        self.close()
        steps = max(1, math.ceil(self.n_files / self.cfg.batch_size))
        self.bar = tqdm(
            total=steps,
            desc=f"epoch {epoch + 1}/{self.cfg.max_epochs}",
            unit="step",
            disable=None if self.enabled else True,
            leave=False,
        )

    def update(self, info: dict[str, Any]) -> None:
        if not self.estimated and info["step"] >= min(info["steps"], 10):
            self.estimated = True
            done = info["epoch"] * info["steps"] + info["step"]
            left = (self.cfg.max_epochs * info["steps"] - done) * self.cfg.batch_size
            seconds = left / max(info["images_per_s"], 1e-9)
            log.info(
                "%.0f img/s: about %s to go (%d epochs)",
                info["images_per_s"], _duration(seconds), self.cfg.max_epochs,
            )  # fmt: skip
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{info['loss']:.4f}", img_s=f"{info['images_per_s']:.1f}"
            )
            self.bar.update(info["step"] - self.bar.n)

    def end_epoch(self, stats: dict[str, Any]) -> None:
        self.close()  # the summary line must not land on the bar's line
        val = stats["val_loss"]
        log.info(
            "epoch %d/%d  train_loss %.4f  val_loss %s  %.1f img/s",
            stats["epoch"], self.cfg.max_epochs, stats["train_loss"],
            "-" if val is None else f"{val:.4f}", stats["images_per_s"],
        )  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    """A time span as people say it: "45 s", "12 min", "3.5 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# The folder a run's rasters must lie in (train's ``within``), for the reads
# after its first pass (the preview), in the thread that trains.
_READ_WITHIN: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "read_within", default=None
)


def _save_plots(
    cfg: TrainConfig,
    model: ScaleAwareMAE,
    history: list[dict[str, Any]],
    items: list[tuple[Path, Any]],
    spec: PreprocessSpec,
    device: torch.device,
) -> None:
    from catchment_mae.plots import save_loss_curve, save_reconstructions

    stem = cfg.output_stem
    save_loss_curve(history, stem.with_name(stem.name + ".loss.png"))
    save_reconstructions(
        model,
        items[:4],
        spec,
        device,
        stem.with_name(stem.name + ".preview.png"),
        cfg.seed,
        within=_READ_WITHIN.get(),
    )
