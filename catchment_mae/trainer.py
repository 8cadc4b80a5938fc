"""``train(cfg)``: a run's set-up, its loop over epochs (after MAE's
``main_pretrain``), resume, saving and logging.

The data is one object built before the loop
(:class:`~catchment_mae.train_data.TrainData`: the first pass, the config
completed from it, the split, each epoch's batches); an epoch is
:func:`~catchment_mae.epochs.train_one_epoch`. Each epoch reseeds torch from
``(seed, epoch)``, so masks, flips and the shuffle of epoch ``e`` do not depend
on how the run got there: resuming from an epoch checkpoint gives the same
weights as an uninterrupted run (on the CPU).
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from catchment_mae import distributed
from catchment_mae.checkpoint import load_checkpoint, save_checkpoint, save_model
from catchment_mae.config import TrainConfig
from catchment_mae.data import epoch_seed
from catchment_mae.epochs import (
    evaluate,
    pick_device,
    seeded,
    train_one_epoch,
    warn_slow_bf16,
)
from catchment_mae.errors import ConfigError, NoInputError, TrainingError
from catchment_mae.interrupt import ignore_interrupts, sigterm_as_interrupt
from catchment_mae.io import check_writable, fresh_output
from catchment_mae.model import ScaleAwareMAE, build_model
from catchment_mae.ranks import Ranks, ranks_from_env
from catchment_mae.spec import PreprocessSpec
from catchment_mae.train_data import TrainData, listing

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
        items = listing(cfg, within)
        cfg, chosen = _choose(cfg, items, device)
        data = TrainData.open(
            cfg, items, device, ranks, ckpt=ckpt, resume=resume, strict=strict,
            progress=progress, within=within, cache_within=cache_within,
        )  # fmt: skip
        try:
            result = _train(
                data, ckpt, resume, progress, on_batch_end, on_epoch_end, chosen
            )
        finally:
            data.close()
        result.first_pass_seconds = data.first_pass_seconds
        return result
    finally:
        _READ_WITHIN.reset(confined)
        distributed.stop(ranks)
        if device.type == "cuda":  # a server's next job sees the memory free
            torch.cuda.empty_cache()


def _train(
    data: TrainData,
    ckpt: dict[str, Any] | None,
    resume: str | Path | None,
    progress: bool,
    on_batch_end: Callable[[dict[str, Any]], None] | None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None,
    chosen: str = "",
) -> TrainResult:
    """The epochs over ``data``: the model and optimizer built (or resumed),
    one checkpoint and metrics line per epoch, the outputs at the end.
    ``chosen`` (what the run chose, one line) is said before the first step."""
    cfg, device, ranks = data.cfg, data.device, data.ranks
    if chosen and ranks.main:
        log.info("%s", chosen)
    warn_slow_bf16(device, cfg.precision)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    optimizer = make_optimizer(model, cfg)
    start_epoch, history = _resumed(model, optimizer, ckpt, resume, cfg, ranks)
    step_model = distributed.wrap(model, ranks, device)  # forward and backward
    bar = _ProgressBar(progress and ranks.main, cfg, data.train_count)
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
                with seeded(epoch_seed(cfg.seed, epoch)):
                    bar.start_epoch(epoch)
                    hook = _chain(bar.update, on_batch_end) if writes else None
                    stats = train_one_epoch(
                        step_model, data.batches(epoch), optimizer, device, epoch,
                        cfg, on_batch_end=hook, ranks=ranks,
                    )  # fmt: skip
                data.settle(stats.pop("failed"))
                history.append(_validated(stats, epoch, model, data))
                if writes:
                    save_checkpoint(data.cfg, model, optimizer, epoch, history)
                    metrics.write(json.dumps(stats) + "\n")
                    metrics.flush()
                    bar.end_epoch(stats)
                    if on_epoch_end is not None:
                        on_epoch_end(stats)
    except KeyboardInterrupt as e:
        if ranks.active:  # the launcher forwards the same signal: one stop is enough
            ignore_interrupts()
        raise _interrupted(len(history), cfg) from e
    finally:
        bar.close()
        data.stop_loaders()  # their workers stop before the plots
    cfg = data.cfg  # completed by the first pass, when it ran beside the first epoch
    if writes:
        save_model(cfg, model, len(history))
        _save_plots(
            cfg, model, history, data.preview_items(), cfg.preprocess_spec(), device
        )
    distributed.barrier(ranks)  # the outputs are written when any rank returns
    return _result(cfg, cfg.max_epochs - start_epoch, history, data)


def _result(
    cfg: TrainConfig, epochs_run: int, history: list[dict[str, Any]], data: TrainData
) -> TrainResult:
    """What a finished run wrote, and what it read."""
    return TrainResult(
        weights_path=cfg.weights_path,
        config_path=cfg.config_path,
        checkpoint_path=cfg.checkpoint_path,
        metrics_path=cfg.metrics_path,
        config=cfg,
        epochs_run=epochs_run,
        history=history,
        **data.facts(),
    )


def _validated(
    stats: dict[str, Any], epoch: int, model: ScaleAwareMAE, data: TrainData
) -> dict[str, Any]:
    """An epoch's stats with its number and validation loss (None without
    validation samples); NoInputError when no raster could be read."""
    cfg = data.cfg
    if stats["images"] == 0:
        raise NoInputError(f"{cfg.input_dir}: no raster could be read this epoch")
    stats["epoch"] = epoch + 1
    stats["val_loss"] = (
        evaluate(model, data.val_loader, data.device, cfg) if data.val_loader else None
    )
    return stats


def _resumed(
    model: ScaleAwareMAE,
    optimizer: torch.optim.Optimizer,
    ckpt: dict[str, Any] | None,
    resume: str | Path | None,
    cfg: TrainConfig,
    ranks: Ranks,
) -> tuple[int, list[dict[str, Any]]]:
    """(the first epoch to run, the finished epochs' stats): the checkpoint's
    weights and optimizer state loaded, where the run resumes one."""
    if ckpt is None:
        return 0, []
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
    return start_epoch, history


def _interrupted(done: int, cfg: TrainConfig) -> TrainingInterrupted:
    """What a stopped run says: how far it got and how to go on."""
    hint = (
        f"resume with --resume {cfg.checkpoint_path}"
        if done
        else "no epoch had finished, so there is nothing to resume"
    )
    return TrainingInterrupted(
        f"interrupted after {done} of {cfg.max_epochs} epoch(s); {hint}"
    )


def _left_to_choose(cfg: TrainConfig, key: str) -> bool:
    """Whether ``key`` is one :mod:`catchment_mae.defaults` would choose in
    ``cfg`` (so a checkpoint's value for it is the run's)."""
    from catchment_mae.config import AUTO
    from catchment_mae.defaults import CHOSEN_KEYS

    return key in CHOSEN_KEYS and cfg.setting(key) in (None, AUTO)


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


def make_optimizer(model: ScaleAwareMAE, cfg: TrainConfig) -> torch.optim.Optimizer:
    from timm.optim import param_groups_weight_decay

    # No weight decay on biases, norms, tokens and position embeddings (MAE).
    groups = param_groups_weight_decay(model, cfg.weight_decay)
    # Fused: one kernel for all parameters, and it skips a step on the device
    # when the loss is not finite (skip_unless_finite).
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.base_lr, betas=(0.9, 0.95), fused=fused)


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
