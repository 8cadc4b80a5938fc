"""``cmae embed-zones`` over a large mosaic: peak memory, and its rate against
``embed-dir`` over the same catchments written as their own files, side by side
in one run.

1. A SIZE x SIZE int16 mosaic (default 20,000 px: 800 MB decoded) in 2 x 2
   GeoTIFF tiles (256 px tiles, deflate, UTM), written tile by tile, and ZONES
   polygons (default 500, irregular, with 10^2 to 10^6 pixels, log-uniform;
   some across tile edges) in a GeoPackage.
2. Memory: ``cmae embed-zones`` with a negligible model; the peak is the sum of
   each process's high-water mark (main, forkserver, readers). Target: < 1 GB.
3. Rate: each zone also written as its own GeoTIFF (its window of the mosaic,
   nodata outside it; same dtype and compression), then ``embed_zones()`` and
   ``embed_dir()`` on those files, interleaved per repeat: zones/s over
   files/s. Target: >= 0.8. The embeddings of both are compared too (cosine).
4. One basin over most of the mosaic (a disc of 0.8 x SIZE across: 2.5 x 10^8
   pixels at 20,000 px) with ``--chips 512``: peak memory and time.

The model is negligible (ViT depth 1, width 32, 224 px), so the figures are the
data path's: planning, reading the windows, masking, writing.

Usage:
    python benchmarks/zones.py                         # 20,000 px, 500 zones
    python benchmarks/zones.py --size 8000 --zones 200 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).parent))
from chips import scene_spec, terrain  # noqa: E402
from pipeline import CMAE, make_encoder, peak_rss_mb  # noqa: E402

from catchment_mae.synth import geotiff_tags  # noqa: E402

PIXEL = 10.0  # scene_spec's


def write_tiles(folder: Path, size: int, block: int = 256) -> None:
    """The mosaic as 2 x 2 tiles, each written one 256 px tile at a time."""
    half = size // 2
    spec = scene_spec(size)
    for r in range(2):
        for c in range(2):
            y0, x0 = r * half, c * half

            def tiles(y0: int = y0, x0: int = x0) -> Iterator[np.ndarray]:
                for y in range(0, half, block):
                    for x in range(0, half, block):
                        t = np.zeros((block, block), np.int16)
                        h, w = min(block, half - y), min(block, half - x)
                        t[:h, :w] = terrain(y0 + y, x0 + x, h, w)
                        yield t

            tile_spec = dataclasses.replace(
                spec, height=half, width=half,
                origin=(spec.origin[0] + PIXEL * x0, spec.origin[1] - PIXEL * y0),
            )  # fmt: skip
            tifffile.imwrite(
                folder / f"tile_{r}{c}.tif", tiles(), shape=(half, half),
                dtype=np.int16, tile=(block, block), photometric="minisblack",
                compression="deflate", predictor=True,
                extratags=geotiff_tags(tile_spec), metadata=None,
            )  # fmt: skip


def write_zones(path: Path, size: int, n: int, seed: int = 0) -> None:
    """``n`` irregular star-shaped polygons of 10^2 to 10^6 pixels."""
    import pyarrow as pa
    import pyogrio
    import shapely

    rng = np.random.default_rng(seed)
    ox, oy = scene_spec(size).origin
    geoms = []
    for _ in range(n):
        area = 10 ** rng.uniform(2, 6)  # pixels
        radius = np.sqrt(area / np.pi)
        k = 24
        angles = np.sort(rng.uniform(0, 2 * np.pi, k))
        radii = radius * rng.uniform(0.6, 1.3, k)
        cx, cy = rng.uniform(radius * 1.3, size - radius * 1.3, 2)
        xs = ox + PIXEL * (cx + radii * np.cos(angles))
        ys = oy - PIXEL * (cy + radii * np.sin(angles))
        geoms.append(shapely.Polygon(np.column_stack([xs, ys])))
    table = pa.table(
        {
            "basin": [f"b{i:04d}" for i in range(n)],
            "geometry": shapely.to_wkb(geoms),
        }
    )
    pyogrio.write_arrow(
        table, path, geometry_name="geometry", geometry_type="Polygon",
        crs=f"EPSG:{scene_spec(size).epsg}",
    )  # fmt: skip


def write_disc(path: Path, size: int) -> None:
    """One polygon: a disc 0.8 x ``size`` across in the mosaic's middle."""
    import pyarrow as pa
    import pyogrio
    import shapely

    ox, oy = scene_spec(size).origin
    centre = shapely.Point(ox + PIXEL * size / 2, oy - PIXEL * size / 2)
    disc = centre.buffer(PIXEL * size * 0.4, quad_segs=64)
    table = pa.table({"basin": ["big"], "geometry": shapely.to_wkb([disc])})
    pyogrio.write_arrow(
        table, path, geometry_name="geometry", geometry_type="Polygon",
        crs=f"EPSG:{scene_spec(size).epsg}",
    )  # fmt: skip


def write_clips(tiles: Path, zones: Path, out: Path, size: int) -> None:
    """Each zone as its own GeoTIFF: its window of the mosaic, nodata outside."""
    from catchment_mae.zone_reader import read_zone
    from catchment_mae.zones import iter_zones, mosaic, read_zones

    out.mkdir(parents=True, exist_ok=True)
    spec = scene_spec(size)
    grids, _ = mosaic(tiles)
    for zone in iter_zones(read_zones(zones, "basin"), grids):
        raster, _ = read_zone(tiles, zone, max_pixels=10**8, max_memory_mb=1024)
        data = np.where(raster.valid, raster.data[0], spec.nodata).astype(np.int16)
        c, _, _, f, _, _ = raster.info.geo.transform
        clip = dataclasses.replace(
            spec, height=data.shape[0], width=data.shape[1], origin=(c, f)
        )
        tiled = min(data.shape) >= 256
        tifffile.imwrite(
            out / f"{zone.key}.tif", data, photometric="minisblack",
            compression="deflate", predictor=True,
            tile=(256, 256) if tiled else None,
            extratags=geotiff_tags(clip), metadata=None,
        )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=20_000, help="mosaic side, px")
    ap.add_argument("--zones", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", type=Path, help="keep generated files here")
    args = ap.parse_args()
    import pyarrow.parquet as pq

    from catchment_mae.batch.runner import embed_dir
    from catchment_mae.batch.zone_runner import embed_zones

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = args.data or Path(tmp_name)
        tiles, clips = tmp / f"mosaic{args.size}", tmp / f"clips{args.size}"
        zones = tmp / f"zones{args.size}-{args.zones}.gpkg"
        onnx = make_encoder(
            "vit_tiny_patch16_224", tmp, depth=1, embed_dim=32, num_heads=2
        )
        t0 = time.perf_counter()
        if not tiles.exists():
            tiles.mkdir(parents=True)
            write_tiles(tiles, args.size)
        if not zones.exists():
            write_zones(zones, args.size, args.zones)
        if not clips.exists():
            write_clips(tiles, zones, clips, args.size)
        print(f"data ready in {time.perf_counter() - t0:.0f} s")

        out = tmp / "zones.parquet"
        cmd = [*CMAE, "-q", "embed-zones", str(tiles), "--zones", str(zones),
               "--id", "basin", "--model", str(onnx), "--out", str(out),
               "--overwrite"]  # fmt: skip
        t0 = time.perf_counter()
        peak = peak_rss_mb(cmd)
        took = time.perf_counter() - t0
        print(f"embed-zones, {args.zones} zones of a {args.size} px mosaic: peak "
              f"{peak:.0f} MB (process tree), {took:.1f} s")  # fmt: skip

        ratios = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            z = embed_zones(tiles, zones, onnx, out, id_column="basin", overwrite=True)
            zr = z.embedded / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            d = embed_dir(clips, onnx, tmp / "clips.parquet", overwrite=True)
            dr = d.embedded / (time.perf_counter() - t0)
            ratios.append(zr / dr)
            print(f"  zones {zr:.1f}/s ({z.embedded} embedded, {z.failed} failed), "
                  f"files {dr:.1f}/s: {zr / dr:.2f}")  # fmt: skip
        print(f"rate, zones over files: median {statistics.median(ratios):.2f}")
        a = {r["path"]: r["embedding"] for r in pq.read_table(out).to_pylist()}
        b = {
            r["path"][:-4]: r["embedding"]
            for r in pq.read_table(tmp / "clips.parquet").to_pylist()
        }
        cos = [
            float(np.dot(a[k], b[k]) / np.linalg.norm(a[k]) / np.linalg.norm(b[k]))
            for k in a
            if a[k] is not None and b.get(k) is not None
        ]
        print(f"cosine zone / file: min {min(cos):.5f} over {len(cos)} zones")

        big = tmp / f"big{args.size}.gpkg"
        write_disc(big, args.size)
        cmd = [*CMAE, "-q", "embed-zones", str(tiles), "--zones", str(big),
               "--model", str(onnx), "--out", str(tmp / "big.parquet"),
               "--chips", "512", "--overwrite"]  # fmt: skip
        t0 = time.perf_counter()
        peak = peak_rss_mb(cmd)
        took = time.perf_counter() - t0
        print(f"one basin of 0.8 x {args.size} px across, --chips 512: peak "
              f"{peak:.0f} MB (process tree), {took:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
