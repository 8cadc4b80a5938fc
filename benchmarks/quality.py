"""Embedding quality on real terrain, beside a hand-made baseline.

One run on the CPU, with the commands a user runs and their default settings:

1. ``cmae synth OUT/catchments --catchments-of DEMS``: catchments delineated
   from real DEMs (``../shared/data/dems``: 38 DEMs of 1 m to 1 km, lidar to
   SRTM; or ``--dems`` your own), also at 2x and 4x coarser resolution, with
   their attributes computed on the ground and groups by top-level basin.
2. ``cmae train OUT/catchments --out OUT/NAME.pth``: the defaults (chosen from
   the archive and the device), then ``cmae export`` and ``cmae embed-dir``.
   The same model with its initial weights (one epoch at lr 1e-12) is
   measured too, so the figures show what training adds.
3. ``cmae eval --within dem --baseline``: ridge R² of each attribute, R² of
   log slope within each DEM, which-DEM accuracy, same-basin retrieval and how
   often a coarser copy finds its original, beside the same figures for simple
   terrain features computed from the rasters (geomorph.handmade_features).
4. Windows: ``cmae synth OUT/windows --windows-of DEMS``, square windows of the
   same DEMs (tiles of an archive rather than catchments, none overlapping
   another) with their coarser copies, embedded with the same models and
   evaluated alike. Nodata margins: the originals written again inside a margin
   of nodata half their size on every side, embedded with the same model:
   cosine to themselves without it. Neighbours: each catchment's 5 nearest of
   other basins (as ``cmae search`` ranks them), how well their attributes
   predict its own, beside the hand-made features' neighbours.
5. The synthetic terrain families (``cmae synth --labelled``): family accuracy
   with the defaults, untrained, and without any scale input (``--scale none
   --no-scale-stats``).

Written: ``OUT/quality.json``; printed: the tables of benchmarks/README.md.

Usage:
    python benchmarks/quality.py                  # about 25 minutes on 2 cores
    python benchmarks/quality.py --variant "--no-slope-channel" --skip-synth
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEMS = HERE.parent.parent / "shared" / "data" / "dems"
ATTRIBUTES = (
    "log10_area_km2", "mean_slope", "log10_slope", "mean_elevation", "relief",
    "elongation", "hypsometric_integral",
)  # fmt: skip


def cmae(*args: str | Path) -> dict:
    """Runs one cmae command with --json; its JSON (the failure's stderr ends
    the benchmark)."""
    cmd = [sys.executable, "-m", "catchment_mae.cli.main", *map(str, args), "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, args))}\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else {}


def model_run(
    data: Path, out: Path, name: str, flags: list[str], labels: Path, extra: list[str]
) -> dict:
    """Train (with ``flags``), export, embed ``data`` and evaluate; the figures."""
    pth = out / f"{name}.pth"
    t0 = time.monotonic()
    train = cmae("train", data, "--out", pth, "--cache", out / "cache", "--overwrite",
                 *flags)  # fmt: skip
    seconds = time.monotonic() - t0
    onnx = out / f"{name}.onnx"
    cmae("export", pth, "--out", onnx, "--overwrite")
    table = out / f"{name}.parquet"
    cmae("embed-dir", data, "--model", onnx, "--out", table, "--overwrite")
    result = cmae("eval", table, "--labels", labels, "--no-report", *extra)
    config = json.loads(pth.with_suffix(".json").read_text())
    return {
        "train_seconds": round(seconds, 1),
        "train_loss": train.get("train_loss"),
        "epochs": config["max_epochs"],
        "model": {k: config[k] for k in ("vit_model_name", "image_size",
                                          "patch_size", "embed_dim", "depth")},
        "onnx": str(onnx),
        "eval": result,
    }  # fmt: skip


def margins(data: Path, onnx: str, out: Path) -> dict:
    """Each original catchment inside a nodata margin of half its size on every
    side: the cosine of its embedding to the one without the margin."""
    import pyarrow.parquet as pq

    from catchment_mae.raster import read_raster
    from catchment_mae.terrain import write_like

    padded = out / "margins"
    padded.mkdir(exist_ok=True)
    names = sorted(p.name for p in data.glob("*_x1.tif"))
    for name in names:
        r = read_raster(data / name, bands=[1])
        h, w = r.data.shape[1:]
        dy, dx = h // 2, w // 2
        z = np.full((h + 2 * dy, w + 2 * dx), np.nan)
        z[dy : dy + h, dx : dx + w] = np.where(r.valid, r.data[0], np.nan)
        c, a, b, f, d, e = r.info.geo.transform
        write_like(data / name, padded / name, z,
                   (c - a * dx - b * dy, a, b, f - d * dx - e * dy, d, e))  # fmt: skip
    tables = {}
    for key, folder in (("plain", data), ("padded", padded)):
        tables[key] = out / f"margins_{key}.parquet"
        cmae("embed-dir", folder, "--model", onnx, "--out", tables[key], "--overwrite")
    vec = {}
    for key, path in tables.items():
        t = pq.read_table(path, columns=["path", "embedding"]).to_pylist()
        vec[key] = {row["path"]: np.asarray(row["embedding"]) for row in t}
    cos = []
    for name in names:
        a, b = vec["plain"][name], vec["padded"][name]
        cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return {"rasters": len(cos), "min_cosine": min(cos), "mean_cosine": np.mean(cos)}


def neighbours(table: Path, labels: Path, rasters: Path, k: int = 5) -> dict:
    """How well a catchment's nearest neighbours (by cosine, as ``cmae
    search`` ranks them; from other top-level basins only, originals only)
    predict its own attributes: R² of the mean of its ``k`` neighbours', for
    the embedding and for the hand-made features (standardised)."""
    from catchment_mae import evaluate as ev

    joined = ev.join(ev.read_embeddings(table), ev.read_labels(labels), ("dem",))
    orig = joined.subset(joined.copy_of == "")
    feats, _ = ev.handmade_vectors(orig.paths, rasters)
    spread = feats.std(axis=0)
    feats = (feats - feats.mean(axis=0)) / np.where(spread > 0, spread, 1.0)

    def predicted(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        sims = unit @ unit.T
        sims[orig.groups[:, None] == orig.groups[None, :]] = -np.inf
        return y[np.argsort(-sims, axis=1)[:, :k]].mean(axis=1)

    def r2(y: np.ndarray, p: np.ndarray) -> float:
        return float(1 - np.sum((y - p) ** 2) / np.sum((y - y.mean()) ** 2))

    out = {}
    for name in ATTRIBUTES:
        y = orig.labels[name].astype(float)
        out[name] = {"embedding": r2(y, predicted(orig.vectors, y)),
                     "baseline": r2(y, predicted(feats, y))}  # fmt: skip
    return out


def windows(dems: Path, out: Path, results: dict, extra: list[str]) -> dict:
    """The trained (and untrained) models on square windows of the same DEMs."""
    data = out / "windows"
    if not (data / "labels.csv").is_file():
        cmae("synth", data, "--windows-of", dems)
    evals = {}
    for run in ("default", "untrained"):
        if run not in results:
            continue
        table = out / f"windows_{run}.parquet"
        cmae("embed-dir", data, "--model", results[run]["onnx"], "--out", table,
             "--overwrite")  # fmt: skip
        evals[run] = cmae("eval", table, "--labels", data / "labels.csv",
                          "--no-report", *extra)  # fmt: skip
    return evals


def synthetic(out: Path, flags: list[str]) -> dict:
    """Family accuracy on the synthetic terrains: defaults, untrained, and
    without any scale input."""
    bench = out / "synth"
    if not (bench / "labels.csv").is_file():
        cmae("synth", bench, "--labelled", "--count", 96, "--min-size", 32,
             "--max-size", 384, "--seed", 0)  # fmt: skip
    runs = {}
    for name, extra in (
        ("default", []),
        ("untrained", ["--epochs", "1", "--lr", "1e-12"]),
        ("no_scale", ["--scale", "none", "--no-scale-stats"]),
    ):
        r = model_run(bench, out, f"synth_{name}", [*flags, *extra],
                      bench / "labels.csv", ["--k", "10"])  # fmt: skip
        fam = r["eval"]["labels"]["family"]
        runs[name] = {
            "knn": fam["knn_accuracy"],
            "linear": fam["linear_accuracy"],
            "chance": fam["chance"],
            "train_seconds": r["train_seconds"],
        }
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/cmae-quality"))
    ap.add_argument("--dems", type=Path, default=DEMS)
    ap.add_argument("--per-dem", type=int, default=10)
    ap.add_argument("--variant", default="", help="extra cmae train flags")
    ap.add_argument("--skip-synth", action="store_true")
    ap.add_argument("--skip-untrained", action="store_true")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if not args.dems.is_dir():
        sys.exit(f"{args.dems}: no such folder of DEMs (give --dems)")
    data = out / "catchments"
    if not (data / "labels.csv").is_file():
        cmae("synth", data, "--catchments-of", args.dems, "--per-dem", args.per_dem)
    labels = data / "labels.csv"
    flags = shlex.split(args.variant)
    extra = ["--within", "dem", "--baseline"]
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "node": platform.node()},
        "settings": {**vars(args), "out": str(out), "dems": str(args.dems)},
    }  # fmt: skip
    results["default"] = model_run(data, out, "terrain", flags, labels, extra)
    print(table(results["default"]["eval"]), flush=True)
    if not args.skip_untrained:
        results["untrained"] = model_run(
            data, out, "terrain_untrained", [*flags, "--epochs", "1", "--lr", "1e-12"],
            labels, extra,
        )  # fmt: skip
    results["windows"] = windows(args.dems, out, results, extra)
    results["margins"] = margins(data, results["default"]["onnx"], out)
    table_path = out / "terrain.parquet"
    results["neighbours"] = neighbours(table_path, labels, data)
    if not args.skip_synth:
        results["synthetic"] = synthetic(out, flags)
    (out / "quality.json").write_text(json.dumps(results, indent=1, default=float))
    print_report(results)


def figures(ev: dict) -> list[tuple[str, float]]:
    """The benchmark's figures of one ``cmae eval`` result, in order."""
    lab = ev["labels"]
    rows = [(f"R² {name}", lab[name]["r2"]) for name in ATTRIBUTES]
    rows += [
        ("R² log10 slope within a DEM", lab["log10_slope"]["r2_within"]),
        ("which DEM, linear", lab["dem"]["linear_accuracy"]),
        ("which DEM, kNN", lab["dem"]["knn_accuracy"]),
        ("same basin, top-1", ev["retrieval"]["top1_same_group"]),
        ("copy finds its original, top-1", ev["copies"]["top1_own_original"]),
    ]
    return rows


def table(ev: dict) -> str:
    """Embedding against baseline, one row per figure (markdown)."""
    lines = ["| figure | embedding | hand-made baseline |", "| --- | --- | --- |"]

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for (name, a), (_, b) in zip(figures(ev), figures(ev["baseline"]), strict=True):
        lines.append(f"| {name} | {cell(a)} | {cell(b)} |")
    return "\n".join(lines)


def print_report(r: dict) -> None:
    ev, base = r["default"]["eval"], r["default"]["eval"]["baseline"]
    print()
    print(f"default run: {r['default']['model']}, {r['default']['epochs']} epochs, "
          f"trained in {r['default']['train_seconds']:.0f} s")  # fmt: skip
    print(table(ev))
    if "untrained" in r:
        print()
        print("untrained (the same model, initial weights):")
        print(table(r["untrained"]["eval"]))
    for run, ev_w in r.get("windows", {}).items():
        print(f"\nwindows of the same DEMs, {run}:")
        print(table(ev_w))
    m = r["margins"]
    print(
        "\nnodata margin of half the size on every side: min cosine "
        f"{m['min_cosine']:.4f}, mean {m['mean_cosine']:.4f} over {m['rasters']}"
    )
    if "neighbours" in r:
        print("\nthe 5 nearest catchments of other basins predict (R², embedding / "
              "baseline):")  # fmt: skip
        for name, f in r["neighbours"].items():
            print(f"  {name:<22} {f['embedding']:.3f} / {f['baseline']:.3f}")
    if "synthetic" in r:
        print("\nsynthetic families (linear / kNN, chance):")
        for name, f in r["synthetic"].items():
            print(
                f"  {name:<10} {f['linear']:.3f} / {f['knn']:.3f} ({f['chance']:.3f})"
            )
    # The targets.
    close = [n for n in ATTRIBUTES
             if ev["labels"][n]["r2"] >= base["labels"][n]["r2"] - 0.02]  # fmt: skip
    print(f"\nattributes within 0.02 of the baseline or above: {len(close)} of "
          f"{len(ATTRIBUTES)} ({', '.join(close)})")  # fmt: skip
    if "untrained" in r:
        w = ev["labels"]["log10_slope"]["r2_within"]
        u = r["untrained"]["eval"]["labels"]["log10_slope"]["r2_within"]
        print(f"within-DEM log slope: trained {w:.3f}, untrained {u:.3f}")
    print(f"trained in {r['default']['train_seconds'] / 60:.1f} min "
          f"({math.ceil(r['default']['train_seconds'])} s)")  # fmt: skip


if __name__ == "__main__":
    main()
