"""Training throughput of cmae's MAE against a plain Lightly MAE, side by side.

Both models share the same timm ViT settings, decoder and batch. Ours adds the
scale MLP and the nodata-weighted loss; the plain one is Lightly's
``examples/pytorch/mae.py`` (unweighted MSE, no scale input). Steps are
interleaved (ours, plain, plain, ours, ...) and repeated; medians are compared.
Target: ours/plain >= 0.95 (our additions cost at most 5 %).

Also measures the preprocessing rate (rasters/s) on mixed-size DEM GeoTIFFs, in
one process and with a pool over all cores.

Usage:
    python benchmarks/train_step.py                      # vit_small at 224
    python benchmarks/train_step.py --model vit_tiny_patch16_224 --repeats 10
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightly.models import utils
from lightly.models.modules import (
    MaskedVisionTransformerDecoderTIMM,
    MaskedVisionTransformerTIMM,
)
from torch import nn

from catchment_mae.config import TrainConfig
from catchment_mae.model import build_model, build_vit
from catchment_mae.preprocess import load_sample
from catchment_mae.spec import PreprocessSpec
from catchment_mae.synth import generate_dems
from catchment_mae.workers import limit_worker_threads


class PlainMAE(nn.Module):
    """Lightly's MAE example, with the head built from in_chans."""

    def __init__(self, vit: nn.Module, in_chans: int, cfg: TrainConfig) -> None:
        super().__init__()
        self.mask_ratio = cfg.mask_ratio
        self.patch_size = vit.patch_embed.patch_size[0]
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.sequence_length = self.backbone.sequence_length
        self.decoder_embed = nn.Linear(vit.embed_dim, cfg.decoder_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=vit.patch_embed.num_patches,
            embed_dim=cfg.decoder_dim,
            depth=cfg.decoder_depth,
            num_heads=cfg.decoder_num_heads,
        )
        self.prediction_head = nn.Linear(cfg.decoder_dim, self.patch_size**2 * in_chans)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b = images.shape[0]
        idx_keep, idx_mask = utils.random_token_mask(
            size=(b, self.sequence_length),
            mask_ratio=self.mask_ratio,
            device=images.device,
        )
        x = self.backbone.encode(images=images, idx_keep=idx_keep)
        x = self.decoder_embed(x)
        x_masked = utils.repeat_token(
            self.decoder.mask_token, (b, self.sequence_length)
        )
        x_masked = utils.set_at_index(x_masked, idx_keep, x.type_as(x_masked))
        x_pred = self.prediction_head(
            utils.get_at_index(self.decoder(x_masked), idx_mask)
        )
        target = utils.get_at_index(
            utils.patchify(images, self.patch_size), idx_mask - 1
        )
        return nn.functional.mse_loss(x_pred.float(), target.float())


def time_steps(args: argparse.Namespace, precision: str) -> tuple[float, float]:
    cfg = TrainConfig.from_dict(
        dict(
            vit_model_name=args.model,
            image_size=args.image_size,
            in_chans=args.in_chans,
            decoder_dim=args.decoder_dim,
            decoder_depth=args.decoder_depth,
            decoder_num_heads=args.decoder_heads,
        )
    )
    torch.manual_seed(0)
    ours = build_model(cfg)
    plain = PlainMAE(build_vit(cfg, args.in_chans), args.in_chans, cfg)
    b, c, s = args.batch_size, args.in_chans, args.image_size
    images = torch.randn(b, c, s, s)
    valid = (torch.rand(b, 1, s, s) > 0.2).float()  # 20 % nodata
    scale = torch.log(torch.rand(b, cfg.scale_dim) * 3000 + 50)  # the facts too
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-4)
    ctx = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if precision == "bf16"
        else (lambda: torch.autocast("cpu", enabled=False))
    )

    def step_ours() -> None:
        with ctx():
            loss, _, _ = ours(images, valid, scale)
        opt_ours.zero_grad()
        loss.backward()
        opt_ours.step()

    def step_plain() -> None:
        with ctx():
            loss = plain(images)
        opt_plain.zero_grad()
        loss.backward()
        opt_plain.step()

    for _ in range(args.warmup):
        step_ours()
        step_plain()
    t_ours, t_plain = [], []
    repeats = args.bf16_repeats if precision == "bf16" else args.repeats
    for r in range(repeats):
        order = (("ours", step_ours), ("plain", step_plain))
        for name, fn in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn()
            (t_ours if name == "ours" else t_plain).append(time.perf_counter() - t0)
    return b / statistics.median(t_ours), b / statistics.median(t_plain)


def _load(args: tuple[str, PreprocessSpec]) -> None:
    load_sample(args[0], args[1])


def preprocess_rate(n_files: int, image_size: int) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory() as d:
        paths = generate_dems(d, n_files, min_size=64, max_size=2000, seed=1)
        spec = PreprocessSpec(image_size=image_size, in_chans=1, norm="per-raster")
        _load((str(paths[0]), spec))  # warm caches
        t0 = time.perf_counter()
        for p in paths:
            _load((str(p), spec))
        single = n_files / (time.perf_counter() - t0)
        workers = os.cpu_count() or 1
        ctx = mp.get_context("fork")
        with ctx.Pool(workers, initializer=limit_worker_threads) as pool:
            t0 = time.perf_counter()
            pool.map(_load, [(str(p), spec) for p in paths], chunksize=1)
            pooled = n_files / (time.perf_counter() - t0)
        size_mb = sum(Path(p).stat().st_size for p in paths) / 1e6
    print(f"  ({n_files} DEMs, 64-2000 px, {size_mb:.1f} MB compressed)")
    return single, pooled, workers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--in-chans", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--decoder-dim", type=int, default=256)
    ap.add_argument("--decoder-depth", type=int, default=2)
    ap.add_argument("--decoder-heads", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=11, help="fp32 steps per model")
    ap.add_argument(
        "--bf16-repeats",
        type=int,
        default=3,
        help="bf16 steps per model (slow on CPUs without native bf16)",
    )
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--files", type=int, default=60)
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    args = ap.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.model} @ {args.image_size}, "
        f"batch {args.batch_size}, {args.in_chans} channel(s)"
    )
    for precision in args.precision:
        ours, plain = time_steps(args, precision)
        print(
            f"train step {precision}: cmae {ours:.1f} img/s, plain lightly MAE "
            f"{plain:.1f} img/s, ratio {ours / plain:.3f} (target >= 0.95)"
        )
    single, pooled, workers = preprocess_rate(args.files, args.image_size)
    print(
        f"preprocess to {args.image_size} px: {single:.1f} rasters/s in 1 process, "
        f"{pooled:.1f} rasters/s with {workers} workers"
    )


if __name__ == "__main__":
    main()
