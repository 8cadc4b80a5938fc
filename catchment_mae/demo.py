"""The embedded default job: synthetic DEMs, then a tiny scale-aware MAE on the CPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from catchment_mae.config import TrainConfig
from catchment_mae.synth import generate_dems


def demo_config(out_dir: str | os.PathLike[str], epochs: int = 30) -> TrainConfig:
    """A ViT small enough to train in about a minute on 2 CPU cores."""
    out = Path(out_dir)
    return TrainConfig(
        input_dir=str(out / "dems"),
        model_output_path=str(out / "demo_model.pth"),
        vit_model_name="vit_tiny_patch16_224",
        image_size=64,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=4,
        decoder_dim=64,
        decoder_depth=1,
        decoder_num_heads=4,
        norm="per-raster",  # DEMs: embed the relief, not the altitude
        max_epochs=epochs,
        batch_size=16,
        num_workers=0,
        lr=1e-3,
        warmup_epochs=1.0,
        device="cpu",
    )


def run_demo(
    out_dir: str | os.PathLike[str],
    *,
    count: int = 64,
    epochs: int = 30,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Writes ``count`` DEMs to ``OUT/dems`` and trains ``OUT/demo_model.pth``."""
    from catchment_mae.trainer import train

    cfg = demo_config(out_dir, epochs)
    if Path(cfg.weights_path).exists() and not overwrite:
        from catchment_mae.errors import OutputExistsError

        raise OutputExistsError(f"{cfg.weights_path}: already exists (use --overwrite)")
    generate_dems(cfg.input_dir, count, min_size=40, max_size=320, seed=0)
    result = train(cfg, overwrite=overwrite, progress=progress)
    summary = result.summary()
    first = result.history[0]
    summary.update(
        dems=cfg.input_dir,
        first_train_loss=first["train_loss"],
        loss_png=str(cfg.output_stem) + ".loss.png",
        preview_png=str(cfg.output_stem) + ".preview.png",
    )
    return summary
