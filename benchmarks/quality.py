"""Embedding quality, and whether the scale input earns its place.

One run, on the CPU, with the commands a user runs:

1. ``cmae synth OUT/bench --labelled``: terrains of four families (alpine, hills,
   plateau, floodplain), each at 2-3 ground resolutions of 5-90 m, 32-512 px.
   The surfaces are self-similar: only the scale input says how large a raster
   is on the ground.
2. For each scale mode (default ``ground`` and ``none``, the ablation): ``cmae
   train`` vit_tiny at 64 px (patch 8), per-raster norm, the same epochs, seed and
   settings; nothing is tuned, on any split.
3. ``cmae export --pool cls`` and ``--pool mean``; ``cmae embed-dir`` of the
   benchmark and of the real rasters' scale copies; ``cmae eval`` with
   group-disjoint folds (a terrain's renderings never on both sides).
4. Printed: family kNN / linear accuracy (and chance), the ridge R² of log ground
   extent and of log resolution, and retrieval of a real raster's own x2/x4
   copies (``cmae synth --copies-of``, from ``../shared/data/real`` when
   present), for each mode and pooling. Written: ``OUT/quality.json``.

Targets (issue 11): with the scale input, R²(log extent) >= 0.9 and clearly above
the ablation's; family accuracy with it not lower; the linear probe far above
chance for both poolings.

Usage:
    python benchmarks/quality.py                      # about 20 minutes on 2 cores
    python benchmarks/quality.py --epochs 20 --count 48   # a quick look
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REAL = HERE.parent.parent / "shared" / "data" / "real"
# Real rasters that hold terrain (MANIFEST.tsv): DEMs, a slope and a hillshade.
REAL_DEMS = (
    "pysheds_dem.tif", "pysheds_roi.tif", "rioxarray_small_dem_3m_merged.tif",
    "rioxarray_cog.tif", "rasterstats_slope.tif", "rasterio_shade.tif",
)  # fmt: skip
DECODER = {"decoder_dim": 128, "decoder_depth": 2, "decoder_num_heads": 4}


def cmae(*args: str | Path) -> dict:
    """Runs one cmae command with --json; its JSON, or the failure's stderr."""
    cmd = [sys.executable, "-m", "catchment_mae.cli.main", *map(str, args), "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, args))}\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else {}


def add_log_resolution(labels: Path) -> Path:
    """A copy of labels.csv with ``log_resolution`` = ln(resolution_m)."""
    with open(labels) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["log_resolution"] = round(math.log(float(r["resolution_m"])), 6)
    out = labels.with_name("labels_eval.csv")
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def real_copies(out: Path) -> dict[str, Path]:
    """Scale copies of the real rasters: the terrain ones, and every one."""
    if not REAL.is_dir():
        print(f"(no {REAL}: the real-raster retrieval is left out)")
        return {}
    sets = {}
    dems = out / "real_dem_src"
    dems.mkdir(exist_ok=True)
    for name in REAL_DEMS:
        link = dems / name
        if not link.exists():
            link.symlink_to(REAL / name)
    for key, src in (("real_dems", dems), ("real_all", REAL)):
        dst = out / key
        cmae("synth", dst, "--copies-of", src)
        labels = dst / "labels.csv"
        # Only the group matters for retrieval; drop the numeric columns.
        with open(labels) as f:
            rows = [{"path": r["path"], "group": r["group"], "copy": "x" + r["factor"]}
                    for r in csv.DictReader(f)]  # fmt: skip
        with open(dst / "labels_eval.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["path", "group", "copy"])
            w.writeheader()
            w.writerows(rows)
        sets[key] = dst
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/cmae-quality"))
    ap.add_argument("--count", type=int, default=160, help="terrains")
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--modes", default="ground,none")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    bench = out / "bench"
    if not (bench / "labels.csv").is_file():
        cmae("synth", bench, "--labelled", "--count", args.count, "--min-size", 32,
             "--max-size", 512, "--seed", args.seed)  # fmt: skip
    labels = add_log_resolution(bench / "labels.csv")
    real = real_copies(out)
    (out / "decoder.json").write_text(json.dumps(DECODER))
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {**vars(args), "out": str(out), "decoder": DECODER},
        "runs": {},
    }
    for mode in args.modes.split(","):
        t0 = time.monotonic()
        pth = out / f"scale_{mode}.pth"
        train = cmae(
            "train", bench, "--out", pth, "--model", "vit_tiny_patch16_224",
            "--image-size", args.image_size, "--patch-size", 8, "--batch-size", 32,
            "--epochs", args.epochs, "--device", "cpu", "--scale", mode,
            "--norm", "per-raster", "--seed", args.seed, "--cache", out / "cache",
            "--config", out / "decoder.json", "--overwrite", "--log-every", 50,
        )  # fmt: skip
        train_s = time.monotonic() - t0
        for pool in ("cls", "mean"):
            onnx = out / f"scale_{mode}_{pool}.onnx"
            cmae("export", pth, "--out", onnx, "--pool", pool, "--overwrite")
            run: dict = {"train_seconds": round(train_s, 1),
                         "final_train_loss": train.get("train_loss")}  # fmt: skip
            for key, data, lab in [("bench", bench, labels)] + [
                (k, d, d / "labels_eval.csv") for k, d in real.items()
            ]:
                table = out / f"{key}_{mode}_{pool}.parquet"
                cmae("embed-dir", data, "--model", onnx, "--out", table, "--overwrite")
                run[key] = cmae("eval", table, "--labels", lab, "--k", 20,
                                "--report", table.with_suffix(".png"))  # fmt: skip
            results["runs"][f"{mode}/{pool}"] = run
            print(summary_line(mode, pool, run), flush=True)
    (out / "quality.json").write_text(json.dumps(results, indent=1))
    print_table(results)


def summary_line(mode: str, pool: str, run: dict) -> str:
    lab = run["bench"]["labels"]
    fam = lab["family"]
    return (
        f"scale {mode:<6} pool {pool:<4}: family kNN {fam['knn_accuracy']:.3f} linear "
        f"{fam['linear_accuracy']:.3f} (chance {fam['chance']:.3f}); R2 log extent "
        f"{lab['log_extent']['r2']:.3f}, log resolution "
        f"{lab['log_resolution']['r2']:.3f}; trained in {run['train_seconds']:.0f} s"
    )


def print_table(results: dict) -> None:
    print()
    print("| scale input | pooling | family kNN | family linear | chance | R² log "
          "extent | R² log resolution | real DEM copies top-1 | all real copies "
          "top-1 |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, run in results["runs"].items():
        mode, pool = key.split("/")
        lab = run["bench"]["labels"]

        def top1(name: str, run: dict = run) -> str:
            if name not in run:
                return "-"
            r = run[name]["retrieval"]
            return f"{r['top1_same_group']:.3f} (chance {r['chance']:.3f}, {r['rows']})"

        print(
            f"| {mode} | {pool} | {lab['family']['knn_accuracy']:.3f} | "
            f"{lab['family']['linear_accuracy']:.3f} | {lab['family']['chance']:.3f} | "
            f"{lab['log_extent']['r2']:.3f} | {lab['log_resolution']['r2']:.3f} | "
            f"{top1('real_dems')} | {top1('real_all')} |"
        )


if __name__ == "__main__":
    main()
