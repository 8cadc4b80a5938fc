"""Pictures of a training run: the loss curve and reconstructions (matplotlib)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from catchment_mae.io import atomic_output, text_path

TITLES = ("input", "visible to encoder", "reconstruction")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a screen
    import matplotlib.pyplot as plt

    return plt


def save_loss_curve(
    history: list[dict[str, Any]], path: str | os.PathLike[str]
) -> None:
    """Train and validation loss per epoch."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    val = [h.get("val_loss") for h in history]
    if any(v is not None for v in val):
        ax.plot(
            epochs, [np.nan if v is None else v for v in val], "s-", label="validation"
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("masked MSE (valid pixels)")
    ax.set_title("cmae training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def save_reconstructions(
    model: Any,
    files: list[Path] | list[tuple[Path, Any]],
    spec: Any,
    device: Any,
    path: str | os.PathLike[str],
    seed: int = 0,
    within: str | None = None,
) -> None:
    """For a few rasters (or (path, chip window) pairs): input, what the
    encoder saw, reconstruction (channel 1); each file opened must lie in the
    folder ``within``, where given."""
    import torch
    from lightly.models import utils

    from catchment_mae.preprocess import load_sample

    samples = []
    for f in files:
        f, window = f if isinstance(f, tuple) else (f, None)
        try:
            samples.append(load_sample(f, spec, window=window, within=within))
        except Exception:  # a preview must never fail a finished run
            continue
    if not samples:
        return
    images = torch.from_numpy(np.stack([s.image for s in samples])).to(device)
    valid = torch.from_numpy(np.stack([s.valid for s in samples])).to(device)
    scale = torch.from_numpy(np.stack([s.scale for s in samples])).to(device)
    model.eval()
    p, c = model.patch_size, model.in_chans
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        idx_keep, idx_mask = model.random_masking(len(samples), images.device, valid)
        pred = model.forward_decoder(
            model.forward_encoder(images, scale, idx_keep, valid), idx_keep, idx_mask
        )
        patches = utils.patchify(images, p)
        pidx = idx_mask - 1
        seen = utils.set_at_index(
            patches,
            pidx,
            torch.full_like(utils.get_at_index(patches, pidx), float("nan")),
        )
        if model.norm_pix_loss:  # show the prediction in the input's units
            target = utils.get_at_index(patches, pidx)
            pred = pred * target.std(-1, keepdim=True) + target.mean(-1, keepdim=True)
        recon = utils.set_at_index(patches, pidx, pred.float())
    seen_img = utils.unpatchify(seen, p, channels=c)
    recon_img = utils.unpatchify(recon, p, channels=c)
    plt = _pyplot()
    fig, axes = plt.subplots(
        len(samples), 3, figsize=(7.5, 2.6 * len(samples)), squeeze=False
    )
    for i, s in enumerate(samples):
        invalid = valid[i, 0].cpu().numpy() <= 0
        panels = (images[i, 0], seen_img[i, 0], recon_img[i, 0])
        vmin, vmax = float(images[i, 0].min()), float(images[i, 0].max())
        for j, (ax, panel, title) in enumerate(
            zip(axes[i], panels, TITLES, strict=True)
        ):
            img = np.where(invalid, np.nan, panel.cpu().numpy())
            ax.imshow(img, cmap="terrain", vmin=vmin, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title)
            if j == 0:
                name, w = text_path(Path(s.info.path).name), s.info.window
                where = f"\nchip x {w[0]}, y {w[1]}" if w else ""
                ax.set_ylabel(name + where, fontsize=7)
    _save(fig, path)


def _save(fig: Any, path: str | os.PathLike[str]) -> None:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    with atomic_output(path, "wb") as f:
        f.write(buf.getvalue())
