"""Encoder throughput: torch eager vs onnxruntime fp32 vs onnxruntime int8.

Same weights (randomly initialised: speed does not depend on training), same
inputs, one run; calls interleaved and repeated, medians compared, printed as
images/s and as ratios to torch. Also the int8 variant's cosine to fp32.

Usage:
    python benchmarks/export_speed.py                    # vit_tiny and vit_small @ 224
    python benchmarks/export_speed.py --models vit_tiny_patch16_224 --batch-size 16
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from catchment_mae.config import TrainConfig
from catchment_mae.export.onnx import export_model, variant_path
from catchment_mae.model import Embedder, build_model
from catchment_mae.runtime import create_session


def bench(name: str, args: argparse.Namespace) -> None:
    cfg = TrainConfig.from_dict(
        dict(
            vit_model_name=name,
            image_size=args.image_size,
            in_chans=args.in_chans,
            norm_mean=[0.0] * args.in_chans,
            norm_std=[1.0] * args.in_chans,
            # The encoder alone, as the original tool's: two extents in, no
            # validity input (the speed is the ViT's).
            norm="fixed",
            scale="pixels",
            max_epochs=1,
            scale_stats=False,
            slope_channel=False,
            slope_stats=False,
            valid_channel=False,
            drop_empty_patches=False,
        )  # fmt: skip
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    embedder = Embedder(model.encoder).eval()
    rng = np.random.default_rng(0)
    b, c, s = args.batch_size, args.in_chans, args.image_size
    feed = {
        "image": rng.standard_normal((b, c, s, s)).astype(np.float32),
        "scale": np.log(rng.uniform(50, 5000, (b, 2))).astype(np.float32),
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "enc.onnx"
        export_model(model, cfg, out, quantize="int8", validate=False)
        fp32 = create_session(out, "cpu")
        int8 = create_session(variant_path(out, "int8"), "cpu")
        tensors = [torch.from_numpy(v) for v in feed.values()]

        def run_torch() -> np.ndarray:
            with torch.inference_mode():
                return embedder(*tensors).numpy()

        runners = {
            "torch eager": run_torch,
            "onnxruntime fp32": lambda: fp32.run(["embedding"], feed)[0],
            "onnxruntime int8": lambda: int8.run(["embedding"], feed)[0],
        }
        outputs = {k: fn() for k, fn in runners.items()}  # warm-up
        times: dict[str, list[float]] = {k: [] for k in runners}
        for r in range(args.repeats):
            order = list(runners.items())
            for key, fn in order if r % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    rate = {k: b / statistics.median(v) for k, v in times.items()}
    ref, q = outputs["onnxruntime fp32"], outputs["onnxruntime int8"]
    cos = (ref * q).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(q, axis=1)
    print(f"{name} @ {s}, batch {b}:")
    for key, value in rate.items():
        ratio = value / rate["torch eager"]
        print(f"  {key:17s} {value:8.1f} img/s  ({ratio:.2f}x torch)")
    print(f"  int8 vs fp32: min cosine {cos.min():.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--models", nargs="+", default=["vit_tiny_patch16_224", "vit_small_patch16_224"]
    )
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--in-chans", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), onnxruntime "
        f"{ort.__version__}"
    )
    for name in args.models:
        bench(name, args)


if __name__ == "__main__":
    main()
