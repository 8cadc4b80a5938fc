"""One epoch of training and the validation pass (after MAE's
``engine_pretrain``), the learning-rate schedule, device and precision.

``train_one_epoch`` takes the model, batches, optimizer, device and epoch and
returns a dict of averages. The loss stays on the device: it is read back (a
host sync on a GPU) every ``log_every`` steps and at the end of each epoch, not
after every step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from catchment_mae import distributed
from catchment_mae.config import TrainConfig
from catchment_mae.data import Batch, epoch_seed
from catchment_mae.errors import ConfigError, TrainingError
from catchment_mae.loaders import random_flips, to_model_input
from catchment_mae.model import ScaleAwareMAE
from catchment_mae.ranks import Ranks

log = logging.getLogger(__name__)


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
        if batch["z"] is not None or ranks.active:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch + at, cfg)
            _step(model, batch, optimizer, device, cfg, meter, flip_gen, ranks,
                  step + 1, autocast)  # fmt: skip
        at = batch.get("done", min((step + 1) / steps, 1.0))
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            report(step + 1)
    at = 1.0  # the epoch is over, whatever its last batch said (failures after it)
    if meter.steps:  # more or fewer steps than len(loader) said: the last ones
        report(step + 1)
    stats = _averages(meter, time.perf_counter() - start, epoch, cfg, ranks, device)
    return {**stats, "failed": failed}


def _averages(
    meter: _LossMeter,
    seconds: float,
    epoch: int,
    cfg: TrainConfig,
    ranks: Ranks,
    device: torch.device,
) -> dict[str, Any]:
    """An epoch's figures over every rank; TrainingError when no step of it
    had a finite loss."""
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
    }


def _step(
    model: ScaleAwareMAE,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    cfg: TrainConfig,
    meter: _LossMeter,
    flip_gen: torch.Generator,
    ranks: Ranks,
    step: int,
    autocast: contextlib.AbstractContextManager,
) -> None:
    """One optimizer step on ``batch`` (the forward pass in ``autocast``): a
    batch whose files all failed steps on a stand-in with a zero loss."""
    ignored = batch["z"] is None
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
        finite = meter.add(loss, images.shape[0], batch["path"], step)
    skip_unless_finite(optimizer, distributed.all_finite(finite, ranks))
    optimizer.step()


def _stand_in(
    cfg: TrainConfig, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A one-image batch of zeros, every pixel valid: a step's input on a rank
    whose batch failed (its loss is multiplied by 0)."""
    size = int(cfg.preprocess.image_size or 1)
    chans = int(cfg.preprocess.in_chans or 1) + int(bool(cfg.preprocess.slope_channel))
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
    with seeded(epoch_seed(cfg.seed, 10**6)), autocast_context(device, cfg.precision):
        for step, batch in enumerate(loader):
            if batch["z"] is None:
                continue
            images, valid, scale = to_model_input(batch, device)
            loss, _, _ = model(images, valid, scale)
            meter.add(loss, images.shape[0], batch["path"], step + 1)
    mean, n = meter.read()
    return mean if n else None


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seeds torch (CPU and CUDA) for a block, restoring the previous state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
