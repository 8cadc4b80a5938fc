"""``cmae embed-dir`` against its limits, side by side in one run.

On a generated set of mixed-size DEM GeoTIFFs (64-2000 px, LZW/DEFLATE), for each
model (randomly initialised: speed does not depend on training) and precision:

  (a) the bare onnxruntime encoder on pre-made input tensors, images/s;
  (d) reading + preprocessing alone (no model), all cores, rasters/s;
  (b) ``embed_dir`` end to end, images/s. Decoding and the model share the CPU,
      so the limit is L = 1 / (1/a + 1/d); target b >= 0.9 L;
  (c) the original tool's way: per image, load the .pth and .json, read,
      preprocess and run one forward in torch; target b / c >= 3.

Then the peak RSS (the process tree's, sampled) of ``cmae embed-dir`` over 200
files and over 2,000 (the same 200 hard-linked ten times, so the work per file
is the same): target within 10%.

Usage:
    python benchmarks/embed_dir.py                       # 500 files, tiny + small
    python benchmarks/embed_dir.py --files 100 --models vit_tiny_patch16_224
    python benchmarks/embed_dir.py --data /tmp/dems      # reuse generated files
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

# Reader processes re-import this file as their __main__ (forkserver): keep torch
# out of its top level, as the cmae command does, so they start as fast.
from catchment_mae.batch.reader import Reader
from catchment_mae.batch.runner import available_cores
from catchment_mae.preprocess import PreprocessSpec, load_sample
from catchment_mae.runtime import create_session
from catchment_mae.synth import generate_dems

CMAE = [sys.executable, "-m", "catchment_mae.cli.main"]


def make_model(name: str, image_size: int, out: Path) -> tuple[Path, Path]:
    """NAME.pth + NAME.json as ``cmae train`` writes them, and the export."""
    import torch

    from catchment_mae.config import TrainConfig
    from catchment_mae.export.onnx import export_encoder
    from catchment_mae.io import atomic_torch_save, atomic_write_text
    from catchment_mae.model import build_model

    cfg = TrainConfig(
        vit_model_name=name,
        image_size=image_size,
        in_chans=1,
        norm="per-raster",
        model_output_path=str(out / f"{name}.pth"),
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    state = {"model": model.state_dict(), "config": cfg.to_dict()}
    atomic_torch_save(state, cfg.weights_path)
    atomic_write_text(cfg.config_path, cfg.to_json())
    onnx = out / f"{name}.onnx"
    export_encoder(cfg.weights_path, onnx, quantize="int8", validate=False)
    return Path(cfg.weights_path), onnx


def bare_rate(onnx: Path, spec: PreprocessSpec, batch: int, repeats: int) -> float:
    """(a): onnxruntime alone, all cores, on pre-made tensors."""
    sess = create_session(onnx, "cpu")
    rng = np.random.default_rng(0)
    s = spec.image_size
    feed = {
        "image": rng.standard_normal((batch, 1, s, s)).astype(np.float32),
        "scale": np.log(rng.uniform(64, 2000, (batch, 2))).astype(np.float32),
    }
    sess.run(["embedding"], feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(["embedding"], feed)
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def read_rate(root: Path, files: list[str], spec: PreprocessSpec) -> float:
    """(d): the reader pool alone, one worker per core, once its workers run."""
    with Reader(root, available_cores(), max_in_flight=64) as reader:
        list(reader.read(files[:8], spec))  # start the workers: a limit, not a run
        t0 = time.perf_counter()
        n = sum(1 for item in reader.read(files, spec) if item.error is None)
        return n / (time.perf_counter() - t0)


def original_rate(pth: Path, root: Path, files: list[str]) -> float:
    """(c): what the original /embed did for every image."""
    import torch

    from catchment_mae.model import load_model

    t0 = time.perf_counter()
    for rel in files:
        model, cfg = load_model(pth)
        sample = load_sample(root / rel, cfg.preprocess_spec())
        with torch.inference_mode():
            model.embed(
                torch.from_numpy(sample.image[None]),
                torch.from_numpy(sample.scale[None]),
            )
    return len(files) / (time.perf_counter() - t0)


def embed_dir_rate(root: Path, onnx: Path, out: Path, batch: int) -> tuple[float, dict]:
    """(b): ``cmae embed-dir`` end to end, process start and imports included."""
    cmd = [*CMAE, "-q", "embed-dir", str(root), "--model", str(onnx), "--out",
           str(out), "--batch-size", str(batch), "--json", "--overwrite"]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"cmae embed-dir failed: {r.stderr[-500:]}")
    summary = json.loads(r.stdout)
    return summary["embedded"] / seconds, summary


def peak_rss_mb(cmd: list[str]) -> float:
    """Peak RSS of ``cmd``'s process tree: the sum of each process's high-water
    mark (Linux VmHWM, exact, unlike sampling RSS), polled until each exits."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(proc.pid)
    peaks: dict[int, int] = {}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for p in procs:
                try:
                    peaks[p.pid] = max(peaks.get(p.pid, 0), _hwm(p.pid))
                except (OSError, ValueError):
                    pass
            time.sleep(0.02)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    _, err = proc.communicate()
    done.set()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {err.decode()[-500:]}")
    return sum(peaks.values()) / 2**20


def _hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="vit_tiny_patch16_224,vit_small_patch16_224")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--original-files", type=int, default=20, help="for (c)")
    ap.add_argument("--rss-files", type=int, default=200, help="x1 and x10")
    ap.add_argument("--data", type=Path, help="reuse (or create) DEMs here")
    args = ap.parse_args()
    import onnxruntime
    import torch

    from catchment_mae.export.onnx import variant_path

    cores = available_cores()
    print(
        f"machine: {platform.machine()}, {cores} cores; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}"
    )
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = args.data or tmp / "dems"
        if not root.exists() or len(list(root.glob("*.tif"))) < args.files:
            t0 = time.perf_counter()
            generate_dems(root, args.files, min_size=64, max_size=2000, seed=3)
            print(f"generated {args.files} DEMs in {time.perf_counter() - t0:.0f} s")
        files = sorted(p.name for p in root.glob("*.tif"))[: args.files]
        subset = tmp / "subset"
        subset.mkdir()
        for name in files:
            os.link(root / name, subset / name)
        mb = sum((root / f).stat().st_size for f in files) / 1e6
        print(f"data: {len(files)} DEM GeoTIFFs, 64-2000 px, {mb:.0f} MB compressed")
        spec = PreprocessSpec(image_size=args.image_size, in_chans=1, norm="per-raster")
        d = read_rate(subset, files, spec)
        print(f"(d) read + preprocess, {cores} workers: {d:.1f} rasters/s")
        for name in args.models.split(","):
            pth, onnx = make_model(name, args.image_size, tmp)
            c = original_rate(pth, subset, files[: args.original_files])
            print(f"{name} @ {args.image_size}:")
            print(f"  (c) original way (load .pth per image, torch): {c:.2f} img/s")
            for label, path in (("fp32", onnx), ("int8", variant_path(onnx, "int8"))):
                a = bare_rate(path, spec, args.batch_size, repeats=5)
                limit = 1 / (1 / a + 1 / d)
                out = tmp / f"{name}.{label}.parquet"
                b, s = embed_dir_rate(subset, path, out, args.batch_size)
                print(
                    f"  {label}: (a) bare {a:.1f} img/s, L {limit:.1f}, (b) embed-dir "
                    f"{b:.1f} img/s -> b/L {b / limit:.2f} (target >= 0.9), "
                    f"b/c {b / c:.1f} (target >= 3); {s['failed']} failed"
                )
        # Memory: 200 files vs the same 200 ten times over.
        small = tmp / "rss_small"
        big = tmp / "rss_big"
        small.mkdir()
        for name in files[: args.rss_files]:
            os.link(root / name, small / name)
            for k in range(10):
                (big / f"{k}").mkdir(parents=True, exist_ok=True)
                os.link(root / name, big / f"{k}" / name)
        onnx = tmp / f"{args.models.split(',')[0]}.onnx"
        cmae = [*CMAE, "-q", "embed-dir"]
        rss = []
        for where in (small, big):
            out = tmp / f"rss_{where.name}.parquet"
            cmd = [*cmae, str(where), "--model", str(onnx), "--out", str(out)]
            rss.append(peak_rss_mb(cmd))
        n = args.rss_files
        print(
            f"peak RSS of cmae embed-dir ({onnx.stem}, process tree): {n} files "
            f"{rss[0]:.0f} MB, {10 * n} files {rss[1]:.0f} MB -> ratio "
            f"{rss[1] / rss[0]:.3f} (target within 10%)"
        )


if __name__ == "__main__":
    main()
