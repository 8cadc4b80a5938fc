"""The data path against its limits, side by side in one run (embed-dir and training).

embed-dir, on generated DEM GeoTIFFs (64-1024 px, log-uniform, LZW/DEFLATE), for
a negligible model (ViT depth 1, width 32) and vit_small, all at 224 px:

  (d) the reader pool alone: ``load_sample`` in one process per core, results
      dropped (multiprocessing.Pool, chunks of 4). (d+) adds the row's footprint,
      which embed-dir computes per file too;
  (a) the bare onnxruntime encoder on ready tensors, all cores;
  (b) ``embed_dir()`` end to end (pool start, session, listing, Parquet merge
      included), and the ``cmae embed-dir`` command's wall time;
  L = 1 / (1/a + 1/d): reading and the model share the CPU.
  Targets: negligible model b >= 0.9 d; vit_small b >= 0.9 L. Each repeat
  measures d and b back to back and the ratios are taken per repeat.
  (c), with --original N: the original tool's way, per image: load the .pth,
  read, preprocess, one torch forward.

Then the peak memory of ``cmae embed-dir`` over N files and over 10 N (the same
files hard-linked ten times, so the work per file is the same): within 10 %.

Training (vit_tiny at 224 px, batch 32, the CPU; ``--train-model``,
``--train-batch``, ``--precision`` and ``--epochs`` for a GPU):

  (s) the in-memory step rate: forward, backward and AdamW on a batch already
      in memory, images/s;
  uncached epoch: ``--no-cache``, each epoch reads the TIFFs (loader workers);
  first epoch with the cache: the pass that reads every raster into the cache
  and the first epoch, which (per-raster norm) steps on the rasters as they are
  read: images/s from train()'s call to the first epoch's checkpoint (model
  set-up included); target >= 0.9 min(d, s), on a CPU, where both share the
  cores, at most 1/(1/s + 1/d). "pass first": the same, every raster read
  before the first step (as before, and as with norm statistics from the data);
  cached epoch: a later epoch, from the memory-mapped cache (on a GPU, held
      in its memory when it fits); target >= 0.9 s.

With ``--device cuda`` the same figures on a GPU: (a) and (b) on onnxruntime's
CUDA provider, training on the GPU, and how busy the GPU was (NVML's
utilisation, sampled every 50 ms: the share of time a kernel ran) during (b) and
during the cached epochs; targets: embed-dir b >= 0.9 d, GPU busy >= 80 % while
training from the cache. ``benchmarks/gpu.sh`` installs what it needs and runs
it on a GPU machine; ``--embed-models`` and ``--train-runs`` run less of it (a
short device lease).

Usage:
    python benchmarks/pipeline.py                          # everything
    python benchmarks/pipeline.py --parts embed --files 600
    python benchmarks/pipeline.py --parts train --train-files 96
    python benchmarks/pipeline.py --data /tmp/dems         # reuse generated files
    bash benchmarks/gpu.sh train|embed                     # on a GPU machine
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# (d)'s pool processes import this file as their __main__ (Python's way; cmae's
# own readers do not): no torch at its top level, so they start as fast.
from catchment_mae.geo import footprint
from catchment_mae.preprocess import load_resampled, load_sample, normalise
from catchment_mae.spec import PreprocessSpec
from catchment_mae.synth import generate_dems
from catchment_mae.workers import limit_worker_threads, start_context

CMAE = [sys.executable, "-m", "catchment_mae.cli.main"]
SPEC = PreprocessSpec(image_size=224, in_chans=1, norm="per-raster")


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


# ------------------------------------------------------------------ embed-dir
def _pixels_only(path: Path) -> None:
    load_sample(path, SPEC)


def _pixels_and_row(path: Path) -> None:
    r = load_resampled(path, SPEC)
    normalise(r, SPEC)
    footprint(r.info.geo, r.info.height, r.info.width)


def read_rate(files: list[Path], work) -> float:  # noqa: ANN001
    """(d): rasters/s of a plain pool of readers, started before the clock,
    from cmae's forkserver (the first pool to start one sets what it preloads:
    with Python's default, (b)'s readers each imported our modules again)."""
    ctx = start_context()
    with ctx.Pool(cores(), initializer=limit_worker_threads) as pool:
        pool.map(work, files[: 2 * cores()])
        t0 = time.perf_counter()
        for _ in pool.imap_unordered(work, files, chunksize=4):
            pass
        return len(files) / (time.perf_counter() - t0)


def make_encoder(name: str, out: Path, **override: int) -> Path:
    """An exported encoder (random weights: speed does not depend on training)."""
    import torch

    from catchment_mae.config import TrainConfig
    from catchment_mae.export.onnx import export_encoder
    from catchment_mae.io import atomic_torch_save, atomic_write_text
    from catchment_mae.model import build_model

    stem = out / (name + "".join(f"-{k}{v}" for k, v in override.items()))
    cfg = TrainConfig.from_dict(dict(
        vit_model_name=name, image_size=224, in_chans=1, norm="per-raster",
        scale="ground", slope_channel=True, slope_stats=True, max_epochs=1,
        model_output_path=str(stem) + ".pth", **override,
    ))  # fmt: skip
    torch.manual_seed(0)
    atomic_torch_save(
        {"model": build_model(cfg).state_dict(), "config": cfg.to_dict()},
        cfg.weights_path,
    )
    atomic_write_text(cfg.config_path, cfg.to_json())
    onnx = Path(str(stem) + ".onnx")
    export_encoder(cfg.weights_path, onnx, validate=False, overwrite=True)
    return onnx


def bare_rate(onnx: Path, batch: int, device: str, repeats: int = 5) -> float:
    """(a): onnxruntime alone (all cores, or the GPU), on ready tensors."""
    from catchment_mae.runtime import create_session, run_encoder

    sess = create_session(onnx, device, threads=cores())
    rng = np.random.default_rng(0)
    shapes = {i.name: i.shape for i in sess.get_inputs()}  # channels, scale length
    chans, k = shapes["image"][1], shapes["scale"][1]
    image = rng.standard_normal((batch, chans, 224, 224)).astype(np.float32)
    scale = np.log(rng.uniform(64, 1024, (batch, k))).astype(np.float32)
    valid = np.ones((batch, 1, 224, 224), np.float32)
    run_encoder(sess, image, scale, valid)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_encoder(sess, image, scale, valid)
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def embed_rate(
    root: Path, onnx: Path, out: Path, batch: int, device: str
) -> tuple[float, Any]:
    """(b): embed_dir() in this process, start to finish: images/s, and where
    its time went (the run's summary)."""
    from catchment_mae.batch.runner import embed_dir

    t0 = time.perf_counter()
    s = embed_dir(root, onnx, out, batch_size=batch, overwrite=True, device=device)
    return s.embedded / (time.perf_counter() - t0), s


def command_rate(root: Path, onnx: Path, out: Path, batch: int, device: str) -> float:
    """(b) as a user runs it: the command's wall time (interpreter start too)."""
    cmd = [*CMAE, "-q", "embed-dir", str(root), "--model", str(onnx), "--out",
           str(out), "--batch-size", str(batch), "--json", "--overwrite",
           "--device", device]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"cmae embed-dir failed: {r.stderr[-500:]}")
    return json.loads(r.stdout)["embedded"] / seconds


def bench_embed(root: Path, files: list[Path], tmp: Path, args) -> None:  # noqa: ANN001
    models = {}
    if "negligible" in args.embed_models.split(","):
        models["negligible (depth 1, width 32)"] = make_encoder(
            "vit_tiny_patch16_224", tmp, depth=1, embed_dim=32, num_heads=2
        )
    if "vit_small" in args.embed_models.split(","):
        models["vit_small_patch16_224"] = make_encoder("vit_small_patch16_224", tmp)
    busy = GpuBusy.start() if args.device == "cuda" else None
    readers = cores()  # embed_dir's default
    for label, onnx in models.items():
        runs = []
        for _ in range(args.repeats):  # interleaved: this VM's speed drifts by 20 %
            # a beside each run too: measured once, before 600 files of vit_small,
            # it stood 15 % above the same calls inside the runs a minute later.
            a = bare_rate(onnx, args.batch_size, args.device)
            d = read_rate(files, _pixels_only)
            dp = read_rate(files, _pixels_and_row)
            t0 = time.monotonic()
            b, summary = embed_rate(
                root, onnx, tmp / "b.parquet", args.batch_size, args.device
            )
            gpu = busy.mean(t0, time.monotonic()) if busy else None
            in_ort = summary.inference_seconds / summary.seconds
            busy_readers = summary.read_seconds / (summary.seconds * readers)
            print(f"      (b) {summary.seconds:.2f} s: model loaded in "
                  f"{summary.session_seconds:.2f} s (waited for "
                  f"{summary.session_wait_seconds:.2f} s), first batch read at "
                  f"{summary.first_batch_seconds:.2f} s, waiting for the readers "
                  f"{summary.wait_seconds:.2f} s, onnxruntime's calls "
                  f"{summary.inference_seconds:.2f} s, rows and the table "
                  f"{summary.write_seconds:.2f} s; readers reading "
                  f"{busy_readers:.0%} of (b)")  # fmt: skip
            c = command_rate(
                root, onnx, tmp / "c.parquet", args.batch_size, args.device
            )
            limit = 1 / (1 / a + 1 / d)
            in_calls = summary.embedded / summary.inference_seconds / a
            runs.append((d, dp, b, c, b / d, b / dp, b / limit, c / limit, in_ort,
                         a, in_calls, gpu))  # fmt: skip
        med = [statistics.median(r[k] for r in runs) for k in range(11)]
        d, dp, b, c, bd, bdp, bl, cl, in_ort, a, in_calls = med
        print(f"{label} ({len(files)} files, {args.device}, medians of "
              f"{args.repeats} runs):")  # fmt: skip
        print(f"  (a) bare onnxruntime {a:.1f} img/s; (d) readers {d:.1f}/s, "
              f"(d+) with footprints {dp:.1f}/s; L = 1/(1/a + 1/d)")  # fmt: skip
        print(f"  (b) embed_dir() {b:.1f} img/s: b/d {bd:.2f}, b/d+ {bdp:.2f}, "
              f"b/L {bl:.2f}; the command {c:.1f} img/s (its /L {cl:.2f})")  # fmt: skip
        print("      per run b/d: " + " ".join(f"{r[4]:.2f}" for r in runs)
              + "; b/L: " + " ".join(f"{r[6]:.2f}" for r in runs))  # fmt: skip
        print(f"      in onnxruntime's calls: {in_ort:.0%} of (b), at {in_calls:.2f} "
              "of (a)'s rate" + (
            "; GPU busy during (b) (NVML): "
            + " ".join(f"{r[11]:.0%}" for r in runs if r[11] is not None)
            if busy else ""))  # fmt: skip
        if args.original:
            o = original_rate(onnx.with_suffix(".pth"), files[: args.original])
            print(f"  (c) the original tool's way (load the .pth per image, torch): "
                  f"{o:.2f} img/s; b/c {b / o:.1f}")  # fmt: skip


class GpuBusy:
    """NVML's GPU utilisation (the share of its last sample period in which a
    kernel ran), polled every 50 ms with the time, so that any window of the
    run can be averaged afterwards."""

    def __init__(self, nvml, handle) -> None:  # noqa: ANN001
        self.nvml, self.handle = nvml, handle
        self.samples: list[tuple[float, int]] = []
        threading.Thread(target=self._poll, daemon=True).start()

    @classmethod
    def start(cls) -> GpuBusy | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            pynvml.nvmlDeviceGetUtilizationRates(handle)
        except Exception as e:  # no nvidia-ml-py, no driver, not supported
            print(f"(GPU busy not measured: NVML {type(e).__name__}: {e})")
            return None
        return cls(pynvml, handle)

    def _poll(self) -> None:
        while True:
            util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
            self.samples.append((time.monotonic(), util))
            time.sleep(0.05)

    def mean(self, t0: float, t1: float) -> float | None:
        """Mean utilisation (0..1) of the samples taken between t0 and t1."""
        inside = [u for t, u in self.samples if t0 <= t <= t1]
        return statistics.fmean(inside) / 100 if inside else None


def original_rate(pth: Path, files: list[Path]) -> float:
    """(c): what the original /embed did for every image."""
    import torch

    from catchment_mae.model import load_model

    t0 = time.perf_counter()
    for path in files:
        model, cfg = load_model(pth)
        sample = load_sample(path, cfg.preprocess_spec())
        with torch.inference_mode():
            model.embed(
                torch.from_numpy(sample.image[None]),
                torch.from_numpy(sample.scale[None]),
                torch.from_numpy(sample.valid[None]),
            )
    return len(files) / (time.perf_counter() - t0)


def _fmt(xs: list[float]) -> str:
    return "/".join(f"{x:.0f}" for x in xs)


def bench_memory(root: Path, files: list[Path], tmp: Path, n: int) -> None:
    """Peak RSS for n files, and for the same files linked 10 and 20 times over:
    the first step shows the processes warming up (their allocators reaching the
    largest raster's working set), the second that nothing grows with the count."""
    onnx = make_encoder("vit_tiny_patch16_224", tmp, depth=1, embed_dim=32, num_heads=2)
    rss = []
    for copies in (1, 10, 20):
        where = tmp / f"rss_{copies}"
        for k in range(copies):
            (where / f"{k}").mkdir(parents=True)
            for p in files[:n]:
                os.link(p, where / f"{k}" / p.name)
        out = tmp / f"rss_{copies}.parquet"
        rss.append(
            peak_rss_mb(
                [
                    *CMAE,
                    "-q",
                    "embed-dir",
                    str(where),
                    "--model",
                    str(onnx),
                    "--out",
                    str(out),
                ]
            )  # fmt: skip
        )
    print(
        f"peak RSS of cmae embed-dir (negligible model, process tree): {n} files "
        f"{rss[0]:.0f} MB, {10 * n} files {rss[1]:.0f} MB, {20 * n} files "
        f"{rss[2]:.0f} MB -> {10 * n}/{n}: {rss[1] / rss[0]:.3f} (target <= 1.1), "
        f"{20 * n}/{10 * n}: {rss[2] / rss[1]:.3f}"
    )


def peak_rss_mb(cmd: list[str]) -> float:
    """Peak RSS of ``cmd``'s process tree: the sum of each process's high-water
    mark (Linux VmHWM, exact, unlike sampling RSS), polled until each exits."""
    import psutil

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


# ------------------------------------------------------------------- training
def step_rate(cfg, steps: int = 1, repeats: int = 5, busy=None) -> float:  # noqa: ANN001
    """(s): train steps on one batch already in memory (on the device), images/s:
    the median of ``repeats`` blocks of ``steps`` steps. With ``busy`` (GpuBusy),
    also prints how busy these steps keep the GPU: the ceiling of the epochs'."""
    import torch

    from catchment_mae.epochs import autocast_context
    from catchment_mae.model import build_model
    from catchment_mae.trainer import make_optimizer

    device = torch.device(cfg.device)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    opt = make_optimizer(model, cfg)
    b, s = cfg.batch_size, cfg.preprocess.image_size
    chans = 1 + int(bool(cfg.preprocess.slope_channel))
    images = torch.randn(b, chans, s, s, device=device)
    valid = torch.ones(b, 1, s, s, device=device)
    scale = torch.log(torch.full((b, cfg.scale_dim), 300.0, device=device))
    model.train()
    autocast = autocast_context(device, cfg.precision)

    def step() -> None:
        with autocast:
            loss, _, _ = model(images, valid, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def block() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    block()
    t0 = time.monotonic()
    times = [block() for _ in range(repeats)]
    share = busy.mean(t0, time.monotonic()) if busy else None
    if share is not None:
        print(f"      GPU busy during the in-memory steps (NVML): {share:.0%}")
    return b * steps / statistics.median(times)


def bench_train(root: Path, files: list[Path], tmp: Path, args) -> None:  # noqa: ANN001
    from catchment_mae.config import TrainConfig
    from catchment_mae.trainer import train

    data = tmp / "train_dems"
    data.mkdir()
    for p in files[: args.train_files]:
        os.link(p, data / p.name)
    gpu = args.device == "cuda"
    workers = (
        args.workers if args.workers is not None else (cores() - 1 if gpu else cores())
    )
    base = dict(
        input_dir=str(data), vit_model_name=args.train_model, image_size=224,
        norm="per-raster", batch_size=args.train_batch, val_fraction=0.0,
        num_workers=workers, device=args.device, max_epochs=args.epochs,
        warmup_epochs=1.0, precision=args.precision,
        cache_on_gpu={"auto": None, "on": True, "off": False}[args.cache_on_gpu],
    )  # fmt: skip
    steps = 20 if gpu else 1  # a GPU step is queued, not waited for: time blocks
    busy = GpuBusy.start() if gpu else None
    print(f"training {args.train_model} @ 224, {args.precision}, batch "
          f"{args.train_batch}, {args.train_files} DEMs, {workers} loader "
          f"workers, {args.device}, {args.epochs} epochs a run:")  # fmt: skip
    for rep in range(args.repeats):  # the step rate is measured beside each pair
        d = read_rate(files[: args.train_files], _pixels_only)
        s = step_rate(TrainConfig.from_dict(dict(**base, in_chans=1)), steps, busy=busy)
        runs = {}
        for label, extra in (
            ("no cache", {"cache": False}),
            ("cache", {"cache_dir": str(tmp / f"cache{rep}")}),
            ("pass first", {"cache_dir": str(tmp / f"cache{rep}-first")}),
        ):
            if label not in args.train_runs.split(","):
                continue
            cfg = TrainConfig.from_dict(
                dict(**base, **extra, model_output_path=str(tmp / f"{label}.pth"))
            )
            ends: list[float] = []  # each epoch's end (after its checkpoint)
            start = time.monotonic()
            with _pass_first(label == "pass first"):
                result = train(
                    cfg, overwrite=True, progress=False,
                    on_epoch_end=lambda _, ends=ends: ends.append(time.monotonic()),
                )  # fmt: skip
            first = result.history[0]
            # The first pass (reading every raster, into the cache) and epoch 1,
            # one after the other or (per-raster norm, cache) side by side: from
            # train()'s call to epoch 1's checkpoint, model set-up included.
            seconds = ends[0] - start
            # Each later epoch runs from the previous one's end for its seconds.
            windows = [
                (t, t + h["seconds"])
                for t, h in zip(ends, result.history[1:], strict=False)
            ]
            runs[label] = (first["images"] / seconds, result.history, windows)
        s = (s + step_rate(TrainConfig.from_dict(dict(**base, in_chans=1)), steps)) / 2
        limit = 1 / (1 / s + 1 / d)
        print(f"  run {rep + 1}: (s) in-memory step {s:.1f} img/s, (d) readers "
              f"{d:.1f}/s")  # fmt: skip
        if "no cache" in runs:
            plain = statistics.median(
                h["images_per_s"] for h in runs["no cache"][1][1:]
            )
            print(f"    uncached epoch {plain:.1f} ({plain / s:.2f} s)")
        for label, how in (("cache", "trained while read in"),
                           ("pass first", "read in, then trained")):  # fmt: skip
            if label not in runs:
                continue
            first = runs[label][0]
            cached = statistics.median(h["images_per_s"] for h in runs[label][1][1:])
            print(f"    first epoch with the cache ({how}) "
                  f"{first:.1f} ({first / min(d, s):.2f} min(d, s), "
                  f"{first / limit:.2f} 1/(1/s + 1/d)); cached epoch {cached:.1f} "
                  f"({cached / s:.2f} s, target >= 0.9)")  # fmt: skip
        if busy is not None:
            for label, (_, _, windows) in runs.items():
                shares = [busy.mean(t0, t1) for t0, t1 in windows]
                print(f"      GPU busy in the later epochs, {label} (NVML): "
                      + " ".join(f"{x:.0%}" for x in shares if x is not None)
                      + " (target >= 80 % from the cache)")  # fmt: skip


@contextlib.contextmanager
def _pass_first(on: bool) -> Iterator[None]:
    """Training with its first pass before the first step while ``on``: every
    raster read into the cache first, whatever the normalisation."""
    import catchment_mae.train_data as train_data

    streams = train_data.streams
    if on:
        train_data.streams = lambda *_: False
    try:
        yield
    finally:
        train_data.streams = streams


# ----------------------------------------------------------------------- main
def _generate_part(job: tuple[Path, int, int, int]) -> None:
    root, part, parts, n = job
    count = len(range(part, n, parts))
    generate_dems(root, count, min_size=64, max_size=1024, seed=3 + part,
                  prefix=f"dem{part:02d}")  # fmt: skip


def generate(root: Path, n: int) -> None:
    """``n`` DEMs, 64-1024 px, written by one process per core."""
    parts = min(cores(), n)
    with start_context().Pool(parts) as pool:
        pool.map(_generate_part, [(root, k, parts, n) for k in range(parts)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="embed,memory,train")
    ap.add_argument("--files", type=int, default=1000, help="embed-dir's archive")
    ap.add_argument("--rss-files", type=int, default=200, help="x1 and x10")
    ap.add_argument("--train-files", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--original", type=int, default=0, help="files for (c), the original way"
    )
    ap.add_argument("--data", type=Path, help="reuse (or create) DEMs here")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--train-model", default="vit_tiny_patch16_224")
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--epochs", type=int, default=3, help="a training run's")
    ap.add_argument("--workers", type=int, help="loader workers (default: a core each)")
    ap.add_argument(
        "--embed-models", default="negligible,vit_small", help="comma-separated"
    )
    ap.add_argument(
        "--train-runs", default="no cache,cache,pass first", help="comma-separated"
    )
    ap.add_argument(
        "--cache-on-gpu", choices=["auto", "on", "off"], default="auto",
        help="off: the loader workers feed the GPU (cmae train --no-cache-on-gpu)",
    )  # fmt: skip
    args = ap.parse_args()
    import onnxruntime
    import torch

    print(
        f"machine: {platform.machine()}, {cores()} cores; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}"
    )
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = args.data or tmp / "dems"
        if not root.exists() or len(list(root.glob("*.tif"))) < args.files:
            t0 = time.perf_counter()
            generate(root, args.files)
            print(f"generated {args.files} DEMs in {time.perf_counter() - t0:.0f} s")
        files = sorted(root.glob("*.tif"))[: args.files]
        archive = tmp / "archive"
        archive.mkdir()
        for p in files:
            os.link(p, archive / p.name)
        mb = sum(p.stat().st_size for p in files) / 1e6
        print(f"data: {len(files)} DEM GeoTIFFs, 64-1024 px, {mb:.0f} MB compressed")
        parts = args.parts.split(",")
        if "embed" in parts:
            bench_embed(archive, files, tmp, args)
        if "memory" in parts:
            bench_memory(archive, files, tmp, args.rss_files)
        if "train" in parts:
            bench_train(archive, files, tmp, args)


if __name__ == "__main__":
    main()
