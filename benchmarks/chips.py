"""Chips of a large scene (``embed-dir --tile``): peak memory, and the rate per chip
against as many small files of the chip's size, side by side in one run.

1. Memory: a SIZE x SIZE int16 GeoTIFF (default 20,000 px: 800 MB decoded; 256 px
   tiles, deflate, UTM), written tile by tile, embedded with ``cmae embed-dir
   --tile 224`` and a negligible model. The peak is the sum of each process's
   high-water mark (main, forkserver, readers). Target: under 1 GB.
2. Rate: a smaller scene of N chips (default 30 x 30 chips of 224 px) and N small
   GeoTIFFs holding exactly those chips (same terrain, dtype and compression),
   each embedded with ``embed_dir()`` in this process, interleaved per repeat:
   chips/s over files/s. Target: >= 0.9.

The model is negligible (ViT depth 1, width 32, 224 px), so the figures are the
data path's: reading, windowing, footprints, writing.

Usage:
    python benchmarks/chips.py                        # both, 20,000 px scene
    python benchmarks/chips.py --size 8000 --grid 20 --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).parent))
from pipeline import CMAE, make_encoder, peak_rss_mb  # noqa: E402

from catchment_mae.synth import DemSpec, geotiff_tags  # noqa: E402

TILE = 224


def scene_spec(size: int) -> DemSpec:
    return DemSpec(
        height=size, width=size, pixel_size=10.0, epsg=32633,
        origin=(400_000.0, 5_300_000.0), dtype="int16", nodata=-32768, seed=1,
    )  # fmt: skip


def terrain(y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Smooth relief plus roughness at any window, without the whole scene."""
    y = np.arange(y0, y0 + h, dtype=np.float32)[:, None]
    x = np.arange(x0, x0 + w, dtype=np.float32)[None, :]
    rng = np.random.default_rng(y0 * 100_003 + x0)
    z = (
        800 * np.sin(x / 1500.0) * np.cos(y / 2100.0)
        + 200 * np.sin((x + 2 * y) / 310.0)
        + rng.normal(0, 5, (h, w))
    )
    return (z + 1200).astype(np.int16)


def write_scene(path: Path, size: int, block: int = 256) -> None:
    """The scene, written one 256 px tile at a time (flat memory)."""

    def tiles() -> Iterator[np.ndarray]:
        for y0 in range(0, size, block):
            for x0 in range(0, size, block):
                t = np.zeros((block, block), np.int16)
                h, w = min(block, size - y0), min(block, size - x0)
                t[:h, :w] = terrain(y0, x0, h, w)
                yield t

    spec = scene_spec(size)
    tifffile.imwrite(
        path, tiles(), shape=(size, size), dtype=np.int16, tile=(block, block),
        photometric="minisblack", compression="deflate", predictor=True,
        extratags=geotiff_tags(spec), metadata=None,
    )  # fmt: skip


def write_chip_files(out: Path, grid: int) -> None:
    """grid x grid GeoTIFFs of 224 px: the chips of the rate scene, one a file."""
    spec = scene_spec(grid * TILE)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(grid):
        for j in range(grid):
            x0, y0 = j * TILE, i * TILE
            chip = dataclasses.replace(
                spec,
                height=TILE,
                width=TILE,
                origin=(spec.origin[0] + 10.0 * x0, spec.origin[1] - 10.0 * y0),
            )
            tifffile.imwrite(
                out / f"chip_{i:03d}_{j:03d}.tif", terrain(y0, x0, TILE, TILE),
                photometric="minisblack", compression="deflate", predictor=True,
                extratags=geotiff_tags(chip), metadata=None,
            )  # fmt: skip


def embed_rate(root: Path, onnx: Path, out: Path, tile: int | None) -> float:
    """embed_dir() start to finish: rows per second."""
    from catchment_mae.batch.runner import embed_dir

    t0 = time.perf_counter()
    s = embed_dir(root, onnx, out, batch_size=32, overwrite=True, tile=tile)
    return s.embedded / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=20_000, help="memory scene, px")
    ap.add_argument("--grid", type=int, default=30, help="rate scene: chips a side")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", default="memory,rate")
    ap.add_argument("--data", type=Path, help="keep generated files here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = args.data or Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        onnx = make_encoder(
            "vit_tiny_patch16_224", tmp, depth=1, embed_dim=32, num_heads=2
        )
        if "memory" in args.parts:
            scene = tmp / f"scene{args.size}"
            scene.mkdir(exist_ok=True)
            if not (scene / "scene.tif").exists():
                t0 = time.perf_counter()
                write_scene(scene / "scene.tif", args.size)
                print(
                    f"wrote a {args.size} px scene in {time.perf_counter() - t0:.0f} s"
                )
            mb = (scene / "scene.tif").stat().st_size / 2**20
            out = tmp / "scene.parquet"
            cmd = [*CMAE, "-q", "embed-dir", str(scene), "--model", str(onnx),
                   "--out", str(out), "--tile", str(TILE), "--overwrite"]  # fmt: skip
            t0 = time.perf_counter()
            peak = peak_rss_mb(cmd)
            seconds = time.perf_counter() - t0
            import pyarrow.parquet as pq

            rows = pq.read_metadata(out).num_rows
            print(
                f"memory: {args.size} x {args.size} int16 ({mb:.0f} MB on disk, "
                f"{args.size**2 * 2 / 2**20:.0f} MB decoded) in {TILE} px chips: "
                f"{rows} chips in {seconds:.0f} s, peak RSS of the process tree "
                f"{peak:.0f} MB (target < 1024 MB)"
            )
        if "rate" in args.parts:
            scene = tmp / f"rate{args.grid}"
            files = tmp / f"files{args.grid}"
            if not (scene / "scene.tif").exists():
                scene.mkdir(exist_ok=True)
                write_scene(scene / "scene.tif", args.grid * TILE)
                write_chip_files(files, args.grid)
            ratios, chip_rates, file_rates = [], [], []
            embed_rate(files, onnx, tmp / "files.parquet", None)  # warm-up
            for _ in range(args.repeats):
                f = embed_rate(files, onnx, tmp / "files.parquet", None)
                c = embed_rate(scene, onnx, tmp / "chips.parquet", TILE)
                file_rates.append(f)
                chip_rates.append(c)
                ratios.append(c / f)
            n = args.grid**2
            print(
                f"rate: {n} chips of one scene {statistics.median(chip_rates):.1f}/s, "
                f"{n} files of the chip's size "
                f"{statistics.median(file_rates):.1f}/s -> chips/files "
                f"{statistics.median(ratios):.2f} "
                f"({', '.join(f'{r:.2f}' for r in ratios)}; target >= 0.9)"
            )
            print(json.dumps({"chips_per_s": chip_rates, "files_per_s": file_rates}))


if __name__ == "__main__":
    main()
