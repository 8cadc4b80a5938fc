"""The training loop (after MAE's ``engine_pretrain``) and ``train(cfg)``.

``train_one_epoch`` takes the model, loader, optimizer, device and epoch and returns
a dict of averages; ``train`` owns set-up, the scan of the data, resume, saving and
logging. Each epoch reseeds torch from ``(seed, epoch)``, so masks, flips and the
shuffle of epoch ``e`` do not depend on how the run got there: resuming from an
epoch checkpoint gives the same weights as an uninterrupted run (on the CPU).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from catchment_mae import __version__
from catchment_mae.config import TrainConfig
from catchment_mae.data import RasterDataset, collate
from catchment_mae.errors import ConfigError, NoInputError, TrainingError
from catchment_mae.interrupt import sigterm_as_interrupt
from catchment_mae.io import atomic_torch_save, atomic_write_text, check_writable
from catchment_mae.model import ScaleAwareMAE, build_model
from catchment_mae.preprocess import PreprocessSpec, limit_worker_threads
from catchment_mae.stats import ScanResult, scan_dir

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 1


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
    files: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {
            "weights": str(self.weights_path),
            "config": str(self.config_path),
            "checkpoint": str(self.checkpoint_path),
            "metrics": str(self.metrics_path),
            "epochs_run": self.epochs_run,
            "files": self.files,
            "skipped": len(self.skipped),
            "train_loss": last.get("train_loss"),
            "val_loss": last.get("val_loss"),
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
) -> dict[str, Any]:
    """One pass over the loader; returns averages and the files that failed."""
    model.train()
    steps = max(len(loader), 1)
    flip_gen = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch) + 1)
    total_loss, total_images, failed = 0.0, 0, []
    start = time.perf_counter()
    autocast = autocast_context(device, cfg.precision)
    for step, batch in enumerate(loader):
        failed.extend(batch["failed"])
        if batch["image"] is None:
            continue
        lr = lr_at(epoch + step / steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, valid, scale = _to_device(batch, device)
        if cfg.flips:
            images, valid = random_flips(images, valid, flip_gen)
        with autocast:
            loss, _, _ = model(images, valid, scale)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"loss is {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                "(lower --lr, or check the data's norm_mean/norm_std)"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = images.shape[0]
        total_loss += loss.item() * n
        total_images += n
        if on_batch_end is not None:
            elapsed = time.perf_counter() - start
            on_batch_end(
                {
                    "epoch": epoch,
                    "step": step + 1,
                    "steps": steps,
                    "loss": loss.item(),
                    "lr": lr,
                    "images_per_s": total_images / max(elapsed, 1e-9),
                }
            )
    seconds = time.perf_counter() - start
    return {
        "train_loss": total_loss / total_images if total_images else float("nan"),
        "images": total_images,
        "seconds": seconds,
        "images_per_s": total_images / max(seconds, 1e-9),
        "lr": lr_at(epoch + 1, cfg),
        "failed": failed,
    }


@torch.no_grad()
def evaluate(
    model: ScaleAwareMAE, loader: DataLoader, device: torch.device, cfg: TrainConfig
) -> float | None:
    """Mean masked-reconstruction loss with fixed masks (comparable across epochs).

    None when no validation raster could be read.
    """
    model.eval()
    total, count = 0.0, 0
    with _seeded(_epoch_seed(cfg.seed, 10**6)), autocast_context(device, cfg.precision):
        for batch in loader:
            if batch["image"] is None:
                continue
            images, valid, scale = _to_device(batch, device)
            loss, _, _ = model(images, valid, scale)
            total += loss.item() * images.shape[0]
            count += images.shape[0]
    return total / count if count else None


def random_flips(
    images: torch.Tensor, valid: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flips each image (and its validity) left-right and up-down at random."""
    b = images.shape[0]
    for dim in (-1, -2):
        flip = (torch.rand(b, generator=gen) < 0.5).to(images.device)[
            :, None, None, None
        ]
        images = torch.where(flip, images.flip(dim), images)
        valid = torch.where(flip, valid.flip(dim), valid)
    return images, valid


# ---------------------------------------------------------------------- train
def train(
    config: TrainConfig | dict[str, Any],
    *,
    overwrite: bool = False,
    resume: str | Path | None = None,
    strict: bool = False,
    progress: bool = True,
    on_batch_end: Callable[[dict[str, Any]], None] | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Trains a scale-aware MAE and writes ``NAME.pth`` + ``NAME.json``.

    Args:
        config: a TrainConfig or the original tool's config dict.
        overwrite: replace existing outputs (otherwise OutputExistsError).
        resume: an epoch checkpoint (``NAME.ckpt.pth``) to continue from.
        strict: stop at the first bad file instead of skipping it.
        progress: show a progress bar on stderr.
        on_batch_end, on_epoch_end: progress hooks (web UI, tests).
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    if not cfg.input_dir:
        raise ConfigError("input_dir is not set")
    ckpt = _load_checkpoint(resume) if resume is not None else None
    # A resumed run finishes the outputs its first part was about to write.
    check_writable(
        [cfg.weights_path, cfg.config_path], overwrite=overwrite or ckpt is not None
    )

    scan = _scan(cfg, strict, progress)
    cfg = _complete_config(cfg, scan)
    if ckpt is not None:
        cfg = _check_resume_config(cfg, ckpt, resume)
    spec = PreprocessSpec.from_mapping(cfg.to_dict())
    device = pick_device(cfg.device)
    warn_slow_bf16(device, cfg.precision)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    optimizer = _optimizer(model, cfg)
    start_epoch, history = 0, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, history = int(ckpt["epoch"]) + 1, list(ckpt["history"])
        log.info("resuming %s at epoch %d", resume, start_epoch + 1)

    train_files, val_files = split_files(scan.files, cfg.val_fraction, cfg.seed)
    val_loader = _loader(val_files, spec, cfg, shuffle=False) if val_files else None
    skipped = list(scan.failed)
    bar = _ProgressBar(progress, cfg, len(train_files))
    try:
        with sigterm_as_interrupt(), open(cfg.metrics_path, "w") as metrics:
            for stats in history:  # a resumed run rewrites the finished epochs first
                metrics.write(json.dumps(stats) + "\n")
            for epoch in range(start_epoch, cfg.max_epochs):
                with _seeded(_epoch_seed(cfg.seed, epoch)):
                    loader = _loader(train_files, spec, cfg, shuffle=True, epoch=epoch)
                    bar.start_epoch(epoch)
                    stats = train_one_epoch(
                        model, loader, optimizer, device, epoch, cfg,
                        on_batch_end=_chain(bar.update, on_batch_end),
                    )  # fmt: skip
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
                _save_checkpoint(cfg, model, optimizer, epoch, history)
                metrics.write(json.dumps(stats) + "\n")
                metrics.flush()
                bar.end_epoch(stats)
                if on_epoch_end is not None:
                    on_epoch_end(stats)
    except KeyboardInterrupt as e:
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
    bar.close()
    _save_model(cfg, model, len(history))
    _save_plots(cfg, model, history, val_files or train_files, spec, device)
    return TrainResult(
        weights_path=cfg.weights_path,
        config_path=cfg.config_path,
        checkpoint_path=cfg.checkpoint_path,
        metrics_path=cfg.metrics_path,
        config=cfg,
        epochs_run=cfg.max_epochs - start_epoch,
        history=history,
        files=len(scan.files),
        skipped=skipped,
    )


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
    n_val = int(round(len(files) * val_fraction))
    n_val = min(n_val, len(files) - 1) if len(files) > 1 else 0
    if val_fraction > 0 and n_val == 0 and len(files) >= 10:
        n_val = 1
    order = np.random.default_rng(seed).permutation(len(files))
    val = sorted(files[i] for i in order[:n_val])
    train = sorted(files[i] for i in order[n_val:])
    return train, val


# -------------------------------------------------------------------- helpers
def _scan(cfg: TrainConfig, strict: bool, progress: bool) -> ScanResult:
    from tqdm.auto import tqdm

    bar = tqdm(
        desc="scanning", unit="file", disable=None if progress else True, leave=False
    )

    def on_file(path: Path, reason: str | None) -> None:
        bar.update(1)
        if strict and reason is not None:
            raise TrainingError(f"{path}: {reason} (--strict)")

    try:
        return scan_dir(
            cfg.input_dir,
            recursive=cfg.recursive,
            bands=cfg.bands,
            nodata=cfg.nodata,
            in_chans=cfg.in_chans,
            max_pixels=cfg.max_pixels,
            on_file=on_file,
        )
    finally:
        bar.close()


def _complete_config(cfg: TrainConfig, scan: ScanResult) -> TrainConfig:
    """Fills in_chans and, for fixed norm, the data's mean/std."""
    updates: dict[str, Any] = {}
    if cfg.in_chans is None:
        updates["in_chans"] = scan.bands
    if cfg.norm_mean is None:
        updates["norm_mean"] = scan.mean
        updates["norm_std"] = [s if s > 0 else 1.0 for s in scan.std]
        updates["extra"] = {**cfg.extra, "norm_stats_from": "data"}
    return cfg.merged(updates)


def _optimizer(model: ScaleAwareMAE, cfg: TrainConfig) -> torch.optim.Optimizer:
    from timm.optim import param_groups_weight_decay

    # No weight decay on biases, norms, tokens and position embeddings (MAE).
    groups = param_groups_weight_decay(model, cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.base_lr, betas=(0.9, 0.95))


def _loader(
    files: list[Path],
    spec: PreprocessSpec,
    cfg: TrainConfig,
    shuffle: bool,
    epoch: int = 0,
) -> DataLoader:
    gen = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch))
    workers = loader_workers(cfg.num_workers, len(files))
    # Off the main thread (a web UI job), the process has other threads: forking
    # it could copy a held lock into the workers; start them from a clean server.
    off_main = threading.current_thread() is not threading.main_thread()
    return DataLoader(
        RasterDataset(files, spec),
        batch_size=cfg.batch_size,
        shuffle=shuffle,
        num_workers=workers,
        multiprocessing_context="forkserver" if workers and off_main else None,
        collate_fn=collate,
        generator=gen,
        worker_init_fn=_init_worker,
        drop_last=False,
    )


def loader_workers(requested: int, n_files: int) -> int:
    """Data-loading processes: at most one per available core (and per file).

    More workers than cores only oversubscribe the CPU that the training step
    needs too (and make torch warn).
    """
    cores = (
        len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count()
    )
    workers = min(requested, n_files, cores or 1)
    if workers < requested:
        log.debug(
            "num_workers %d -> %d (%s cores, %d files)",
            requested,
            workers,
            cores,
            n_files,
        )
    return workers


def _init_worker(worker_id: int) -> None:
    """One thread per data-loading process: the cores are shared with training."""
    limit_worker_threads()
    torch.set_num_threads(1)


def _to_device(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(
        batch[k].to(device, non_blocking=True) for k in ("image", "valid", "scale")
    )


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63)


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
    """tqdm bar per epoch: loss, images/s; ETA from tqdm."""

    def __init__(self, enabled: bool, cfg: TrainConfig, n_files: int) -> None:
        self.enabled, self.cfg, self.n_files = enabled, cfg, n_files
        self.bar: Any = None

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
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{info['loss']:.4f}", img_s=f"{info['images_per_s']:.1f}"
            )
            self.bar.update(1)

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


# ------------------------------------------------------------- saving/loading
def _save_model(cfg: TrainConfig, model: ScaleAwareMAE, epochs: int) -> None:
    """``NAME.pth``: plain data only, loadable with ``weights_only=True``."""
    state = {
        "model": _cpu_state(model),
        "config": cfg.to_dict(),
        "epoch": epochs,
        "cmae_version": __version__,
        "format_version": CHECKPOINT_FORMAT,
    }
    atomic_torch_save(state, cfg.weights_path)
    atomic_write_text(cfg.config_path, cfg.to_json())


def _save_checkpoint(
    cfg: TrainConfig,
    model: ScaleAwareMAE,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    history: list[dict[str, Any]],
) -> None:
    state = {
        "model": _cpu_state(model),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "history": history,
        "config": cfg.to_dict(),
        "cmae_version": __version__,
        "format_version": CHECKPOINT_FORMAT,
    }
    atomic_torch_save(state, cfg.checkpoint_path)


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _load_checkpoint(path: str | Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise TrainingError(f"{path}: checkpoint does not exist") from e
    except Exception as e:  # unpickling errors come in many types; keep the reason
        raise TrainingError(
            f"{path}: not a cmae checkpoint ({type(e).__name__}: {e})"
        ) from e
    if (
        not isinstance(ckpt, dict)
        or not {"model", "optimizer", "epoch", "config"} <= ckpt.keys()
    ):
        raise TrainingError(f"{path}: not a cmae epoch checkpoint (NAME.ckpt.pth)")
    return ckpt


# Keys that may differ between the original run and its resumption.
_RESUME_FREE_KEYS = {"max_epochs", "num_workers", "device", "extra", "input_dir"}


def _check_resume_config(
    cfg: TrainConfig, ckpt: dict[str, Any], path: str | Path | None
) -> TrainConfig:
    saved = TrainConfig.from_dict(ckpt["config"])
    diff = [
        k
        for k, v in cfg.to_dict().items()
        if k not in _RESUME_FREE_KEYS and v != getattr(saved, k)
    ]
    if diff:
        raise TrainingError(
            f"{path}: was trained with other settings ({', '.join(sorted(diff))}); "
            "resume with the same config"
        )
    return cfg


def _save_plots(
    cfg: TrainConfig,
    model: ScaleAwareMAE,
    history: list[dict[str, Any]],
    files: list[Path],
    spec: PreprocessSpec,
    device: torch.device,
) -> None:
    from catchment_mae.plots import save_loss_curve, save_reconstructions

    stem = cfg.output_stem
    save_loss_curve(history, stem.with_name(stem.name + ".loss.png"))
    save_reconstructions(
        model,
        files[:4],
        spec,
        device,
        stem.with_name(stem.name + ".preview.png"),
        cfg.seed,
    )
