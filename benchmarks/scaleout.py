"""Training in 1 vs N processes (DDP), and embed-dir plain vs on Ray, here.

Both runs train the same model on the same cached DEMs with the same global
batch and the same cores: one process with all of them as torch threads, or
``--nproc N`` processes with an equal share each (what ``cmae train --nproc``
sets). On one machine's CPU the processes add no compute: the ratio N/1 is the
cost of the engine (gradient all-reduce over gloo, the sampler, the ranks'
start) when it is below 1, and the better use of the cores when above.
Images/s are the epochs' own rates, the first epoch left out.

embed-dir: the plain runner (reader processes, shared memory) against
``--ray`` on a local Ray with the same cores, both end to end (wall time of the
command, Ray's start included, and without it: Ray's own execution time), with a
negligible model exported here, on the same DEMs.

Usage:
    python benchmarks/scaleout.py                 # vit_tiny at 224 px, 2 processes
    python benchmarks/scaleout.py --nproc 4 --image-size 64 --files 256
    python benchmarks/scaleout.py --parts embed --files 600
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(data: Path, out: Path, nproc: int, args: argparse.Namespace) -> float:
    cmd = [
        sys.executable, "-m", "catchment_mae.cli.main", "train", str(data),
        "--out", str(out), "--model", args.model, "--image-size", str(args.image_size),
        "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
        "--num-workers", "1", "--device", "cpu", "--norm", "per-raster",
        "--val-fraction", "0", "--cache", str(out.parent / "cache"), "--overwrite",
        "--nproc", str(nproc), "--json",
    ]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        sys.exit(p.stderr[-2000:])
    metrics = out.with_suffix(".metrics.jsonl").read_text().splitlines()
    rates = [json.loads(ln)["images_per_s"] for ln in metrics]
    return statistics.median(rates[1:] or rates)


def embed(data: Path, model: Path, out: Path, ray: bool) -> tuple[float, int]:
    """Seconds of one embed-dir command (wall) and the rasters it embedded."""
    cmd = [
        sys.executable, "-m", "catchment_mae.cli.main", "embed-dir", str(data),
        "--model", str(model), "--out", str(out), "--overwrite", "--json",
    ]  # fmt: skip
    if ray:
        cmd.append("--ray")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if p.returncode:
        sys.exit(p.stderr[-2000:])
    return seconds, json.loads(p.stdout)["embedded"]


def tiny_model(data: Path, tmp: Path) -> Path:
    """A negligible encoder (ViT depth 1, width 32) exported to ONNX."""
    base = [sys.executable, "-m", "catchment_mae.cli.main"]
    cfg = tmp / "dec.json"
    cfg.write_text(json.dumps({"decoder_dim": 32, "decoder_depth": 1,
                               "decoder_num_heads": 2}))  # fmt: skip
    subprocess.run([*base, "train", str(data), "--out", str(tmp / "n.pth"),
                    "--image-size", "224", "--patch-size", "16", "--embed-dim",
                    "32", "--depth", "1", "--num-heads", "2", "--epochs", "1",
                    "--device", "cpu", "--no-cache", "--config", str(cfg)],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run([*base, "export", str(tmp / "n.pth"), "--out",
                    str(tmp / "n.onnx")], check=True, capture_output=True)  # fmt: skip
    return tmp / "n.onnx"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--files", type=int, default=128)
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--parts", default="train,embed")
    args = ap.parse_args()
    from catchment_mae.synth import generate_dems

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "dems"
        generate_dems(data, args.files, min_size=64, max_size=512, seed=1)
        if "train" in args.parts:
            train_part(data, Path(tmp), args)
        if "embed" in args.parts:
            embed_part(data, Path(tmp), args)


def train_part(data: Path, tmp: Path, args: argparse.Namespace) -> None:
    warm = argparse.Namespace(**{**vars(args), "epochs": 1})
    run(data, tmp / "warm.pth", 1, warm)  # fills the cache
    pairs = []
    for _ in range(args.repeats):
        one = run(data, tmp / "one.pth", 1, args)
        many = run(data, tmp / "many.pth", args.nproc, args)
        pairs.append((one, many))
        print(f"train: 1 process {one:.1f} img/s, {args.nproc} processes "
              f"{many:.1f} img/s: ratio {many / one:.3f}", flush=True)  # fmt: skip
    ratios = [m / o for o, m in pairs]
    print(f"train {args.model} @ {args.image_size} px, global batch "
          f"{args.batch_size}: {args.nproc} processes / 1 = "
          f"{statistics.median(ratios):.3f} (runs "
          f"{', '.join(f'{r:.3f}' for r in ratios)})")  # fmt: skip


def embed_part(data: Path, tmp: Path, args: argparse.Namespace) -> None:
    model = tiny_model(data, tmp)
    embed(data, model, tmp / "w.parquet", ray=False)  # warm the page cache
    pairs = []
    for _ in range(args.repeats):
        plain, n = embed(data, model, tmp / "p.parquet", ray=False)
        ray, m = embed(data, model, tmp / "r.parquet", ray=True)
        assert n == m == args.files, (n, m)
        pairs.append((plain, ray))
        print(f"embed-dir: plain {n / plain:.1f} img/s, Ray {m / ray:.1f} img/s "
              f"(wall, Ray's start included): ratio {plain / ray:.3f}",
              flush=True)  # fmt: skip
    ratios = [p / r for p, r in pairs]
    print(f"embed-dir, {args.files} DEMs, negligible model: Ray / plain = "
          f"{statistics.median(ratios):.3f} (runs "
          f"{', '.join(f'{r:.3f}' for r in ratios)})")  # fmt: skip


if __name__ == "__main__":
    main()
