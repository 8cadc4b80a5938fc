"""What training writes and reads back: the model, the epoch checkpoint, resuming.

Plain data only (state dicts, lists, numbers, strings), so every file loads with
``torch.load(path, weights_only=True)``; each is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from catchment_mae.config import TrainConfig
from catchment_mae.errors import TrainingError
from catchment_mae.interrupt import deferred_interrupts
from catchment_mae.io import atomic_torch_save, atomic_write_text
from catchment_mae.version import __version__

CHECKPOINT_FORMAT = 1
# Keys that may differ between the original run and its resumption.
RESUME_FREE_KEYS = {
    "max_epochs", "num_workers", "device", "extra", "input_dir", "cache", "cache_dir",
    "cache_on_gpu", "log_every",
}  # fmt: skip


def save_model(cfg: TrainConfig, model: torch.nn.Module, epochs: int) -> None:
    """``NAME.pth`` and ``NAME.json``: the weights and the config used."""
    state = {
        "model": cpu_state(model),
        "config": cfg.to_dict(),
        "epoch": epochs,
        "cmae_version": __version__,
        "format_version": CHECKPOINT_FORMAT,
    }
    with deferred_interrupts():  # a stop waits for the file to be whole
        atomic_torch_save(state, cfg.weights_path)
    atomic_write_text(cfg.config_path, cfg.to_json())


def save_checkpoint(
    cfg: TrainConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    history: list[dict[str, Any]],
) -> None:
    """``NAME.ckpt.pth``: what ``--resume`` needs after epoch ``epoch``."""
    state = {
        "model": cpu_state(model),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "history": history,
        "config": cfg.to_dict(),
        "cmae_version": __version__,
        "format_version": CHECKPOINT_FORMAT,
    }
    with deferred_interrupts():  # a stop waits for the file to be whole
        atomic_torch_save(state, cfg.checkpoint_path)


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def read_torch_file(path: str | Path, error: type[Exception]) -> Any:
    """``torch.load(path, weights_only=True)``, failing with ``error`` in one line
    that says what the file is instead (an ONNX encoder, not a checkpoint at all)
    rather than torch's unpickling text."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: does not exist")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives
        hint = (
            " but an ONNX encoder (cmae export wrote it; give the NAME.pth that "
            "cmae train wrote)"
            if path.suffix.lower() == ".onnx"
            else ""
        )
        raise error(f"{path}: not a PyTorch checkpoint{hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types: their first line
        first = (str(e).strip().splitlines() or [""])[0]
        raise error(
            f"{path}: unreadable checkpoint ({type(e).__name__}: {first})"
        ) from e


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """An epoch checkpoint, checked to be one.

    Raises:
        TrainingError: missing, unreadable, or not a cmae epoch checkpoint.
    """
    ckpt = read_torch_file(path, TrainingError)
    if (
        not isinstance(ckpt, dict)
        or not {"model", "optimizer", "epoch", "config"} <= ckpt.keys()
    ):
        raise TrainingError(f"{path}: not a cmae epoch checkpoint (NAME.ckpt.pth)")
    return ckpt


def check_resume_config(
    cfg: TrainConfig, ckpt: dict[str, Any], path: str | Path | None
) -> TrainConfig:
    """``cfg`` if it trains what the checkpoint was training, else TrainingError."""
    saved = TrainConfig.from_dict(ckpt["config"]).to_dict()
    diff = [
        k
        for k, v in cfg.to_dict().items()
        if k not in RESUME_FREE_KEYS and v != saved[k]
    ]
    if diff:
        raise TrainingError(
            f"{path}: was trained with other settings ({', '.join(sorted(diff))}); "
            "resume with the same config"
        )
    return cfg
