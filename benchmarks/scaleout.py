"""Training in 1 vs N processes (DistributedDataParallel) on this machine.

Both runs train the same model on the same cached DEMs with the same global
batch and the same cores: one process with all of them as torch threads, or
``--nproc N`` processes with an equal share each (what ``cmae train --nproc``
sets). On one machine's CPU the processes add no compute: the ratio N/1 is the
cost of the engine (gradient all-reduce over gloo, the sampler, the ranks'
start) when it is below 1, and the better use of the cores when above.
Images/s are the epochs' own rates, the first epoch left out.

Usage:
    python benchmarks/scaleout.py                 # vit_tiny at 224 px, 2 processes
    python benchmarks/scaleout.py --nproc 4 --image-size 64 --files 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--files", type=int, default=128)
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from catchment_mae.synth import generate_dems

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "dems"
        generate_dems(data, args.files, min_size=64, max_size=512, seed=1)
        warm = argparse.Namespace(**{**vars(args), "epochs": 1})
        run(data, Path(tmp) / "warm.pth", 1, warm)  # fills the cache
        pairs = []
        for _ in range(args.repeats):
            one = run(data, Path(tmp) / "one.pth", 1, args)
            many = run(data, Path(tmp) / "many.pth", args.nproc, args)
            pairs.append((one, many))
            print(f"1 process {one:.1f} img/s, {args.nproc} processes {many:.1f} "
                  f"img/s: ratio {many / one:.3f}", flush=True)  # fmt: skip
    ratios = [m / o for o, m in pairs]
    print(f"{args.model} @ {args.image_size} px, global batch {args.batch_size}: "
          f"{args.nproc} processes / 1 = {statistics.median(ratios):.3f} "
          f"(runs {', '.join(f'{r:.3f}' for r in ratios)})")  # fmt: skip


if __name__ == "__main__":
    main()
