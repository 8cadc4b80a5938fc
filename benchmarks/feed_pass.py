"""Training's first pass as on a many-core GPU machine, emulated on any machine.

On the lent H200 (16 cores) the pass that reads every raster into the cache
(``prepare``) ran at about 0.6 of its reader pool's rate (d) over 4,000 DEMs,
and a GPU machine is not always at hand to find out why. As in ``feed.py``, the
reader processes do no decoding: each sleeps ``--read-ms`` (no CPU, so 16
readers run on 2 cores as on 16) and then writes a real cache row (one DEM
preprocessed once per reader, written into its shard row with its CRC) and
returns its entry; everything else is the pass as it runs: the listing's stats,
the pool (its forkserver started and warm, as in ``pipeline.py``), the shards
and their Arrow indexes, the main process settling each file in order, the
norm statistics and the screening. ``--no-cache`` leaves the shards out.

Printed: the pass's rate against d, when the first file was settled, and the
main process's CPU time per file.

With ``--step-ms``, training's whole first epoch as on a GPU: after the pass, or
beside it (``train_data.streams``: per-raster norm), batches of ``--batch`` are
gathered from the cache as training does and each "step" holds the GIL for
``--gil-ms`` (a GPU step's kernel launches, done in Python) and then waits with
it released for the rest of ``--step-ms`` (the GPU). Printed: the first epoch's
rate against min(d, s), s = batch / step time, and the bound when the two run
one after the other, 1/(1/pass + 1/s).

Usage:
    python benchmarks/feed_pass.py                      # 4,000 files, 16 readers
    python benchmarks/feed_pass.py --files 4000 --no-cache
    python benchmarks/feed_pass.py --step-ms 10.2 --batch 128   # s = 11 d
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fake_reads import fake_build  # benchmarks/, the script's own folder
from feed import fresh_run

from catchment_mae.spec import PreprocessSpec

SPEC = PreprocessSpec(image_size=224, in_chans=1, norm="per-raster")


def _fake_reads(root: Path) -> list[Path]:
    """``root``'s (empty) files, the pass's reads faked and its forkserver warm."""
    import catchment_mae.prepare as prepare
    from catchment_mae.workers import ReaderPool

    prepare.build_one = fake_build  # _build submits this module global
    # The forkserver up and its modules imported, as after pipeline.py's (d):
    # prestart() only launches it (its imports then take 0.4 s more).
    with ReaderPool(1) as pool:
        pool.submit(int).result()
    return sorted(root.glob("*.tif"))


def one_pass(root: Path, readers: int, cache: bool) -> dict:
    """``prepare`` over ``root``'s (empty) files with fake reads."""
    import catchment_mae.prepare as prepare

    files = _fake_reads(root)
    settled: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        cpu0, t0 = time.process_time(), time.perf_counter()
        result = prepare.prepare(
            files, SPEC, cache_root=tmp if cache else None, workers=readers,
            on_file=lambda path, error: settled.append(time.perf_counter()),
        )  # fmt: skip
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        if result.cache is not None:
            result.cache.close()
    return {"seconds": seconds, "cpu": cpu, "first": settled[0] - t0,
            "files": len(result.files), "failed": len(result.failed)}  # fmt: skip


def first_epoch(root: Path, readers: int, streamed: bool, step_ms: float,
                gil_ms: float, batch: int) -> dict:  # fmt: skip
    """The pass and the first epoch, one after the other or side by side."""
    import numpy as np

    import catchment_mae.prepare as prepare
    from catchment_mae.data import CachedDataset
    from catchment_mae.loaders import StreamedEpoch

    files = _fake_reads(root)
    order = np.random.default_rng(0).permutation(len(files)).tolist()
    steps = 0

    def step(b: dict) -> None:
        nonlocal steps
        steps += 1
        t = time.perf_counter()
        while time.perf_counter() - t < gil_ms / 1000:  # launches: the GIL held
            pass
        time.sleep(max(0.0, step_ms - gil_ms) / 1000)  # the GPU: released

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if streamed:
            stream = prepare.PassInThread(
                files, SPEC, cache_root=tmp, workers=readers, order=order
            )
            for b in StreamedEpoch(stream, set(order), SPEC, batch):
                step(b)
            result = stream.result()
            stream.close()
            passed = stream.seconds
        else:
            result = prepare.prepare(files, SPEC, cache_root=tmp, workers=readers)
            passed = time.perf_counter() - t0
            ds = CachedDataset(result.entries, SPEC, result.cache.dir)
            for lo in range(0, len(order), batch):
                step(ds.__getitems__(order[lo : lo + batch]))
            result.cache.close()
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "pass": passed, "steps": steps,
            "files": len(result.files), "failed": len(result.failed)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--readers", type=int, default=16)
    ap.add_argument("--read-ms", type=float, default=14.0, help="one read's time")
    ap.add_argument("--files", type=int, default=4000)
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--step-ms", type=float, help="emulate the first epoch too")
    ap.add_argument("--gil-ms", type=float, default=3.0, help="of each step")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # ROOT
    ap.add_argument("--streamed", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one and args.streamed is not None:
        got = first_epoch(Path(args.one), args.readers, bool(args.streamed),
                          args.step_ms, args.gil_ms, args.batch)  # fmt: skip
        print(json.dumps(got))
        return
    if args.one:
        print(json.dumps(one_pass(Path(args.one), args.readers, not args.no_cache)))
        return
    from catchment_mae.synth import generate_dems

    d = args.readers / (args.read_ms / 1000)
    print(f"{args.readers} readers of {args.read_ms} ms a file: d = {d:.0f} "
          f"files/s; {args.files} files, cache {not args.no_cache}; "
          f"{os.cpu_count()} cores here")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (dem,) = generate_dems(tmp / "dem", 1, min_size=300, max_size=300, seed=1)
        root = tmp / "in"
        root.mkdir()
        for i in range(args.files):  # listed and stat'ed, never read
            (root / f"f{i:06d}.tif").write_bytes(b"")
        env = {**os.environ, "CMAE_FEED_READ_MS": str(args.read_ms),
               "CMAE_FEED_DEM": str(dem)}  # fmt: skip
        if args.step_ms:
            epochs(args, root, env, d)
            return
        runs = []
        for _ in range(args.repeats):
            cmd = [sys.executable, __file__, "--one", str(root),
                   "--readers", str(args.readers)]  # fmt: skip
            cmd += ["--no-cache"] if args.no_cache else []
            s = fresh_run(cmd, env, "failed")
            rate = s["files"] / s["seconds"]
            runs.append(rate / d)
            print(f"    {s['seconds']:.2f} s: {rate:.0f} files/s = {rate / d:.2f} d; "
                  f"first file settled at {s['first']:.2f} s; main process "
                  f"{1000 * s['cpu'] / s['files']:.2f} ms of CPU a file")  # fmt: skip
        print(f"  pass / d (median of {args.repeats}): {statistics.median(runs):.2f}")


def epochs(args: argparse.Namespace, root: Path, env: dict, d: float) -> None:
    """The first epoch after the pass and beside it, interleaved runs."""
    s = args.batch / (args.step_ms / 1000)
    print(f"first epoch: batch {args.batch}, a step {args.step_ms} ms "
          f"({args.gil_ms} ms of it holding the GIL): s = {s:.0f} img/s = "
          f"{s / d:.1f} d")  # fmt: skip
    runs: dict[str, list[float]] = {"after the pass": [], "beside the pass": []}
    for _ in range(args.repeats):
        for label, streamed in (("after the pass", 0), ("beside the pass", 1)):
            cmd = [sys.executable, __file__, "--one", str(root), "--readers",
                   str(args.readers), "--streamed", str(streamed), "--step-ms",
                   str(args.step_ms), "--gil-ms", str(args.gil_ms), "--batch",
                   str(args.batch)]  # fmt: skip
            r = fresh_run(cmd, env, "failed")
            rate, pass_rate = r["files"] / r["seconds"], r["files"] / r["pass"]
            runs[label].append(rate / min(d, s))
            print(f"    {label}: {r['seconds']:.2f} s, {rate:.0f} img/s = "
                  f"{rate / min(d, s):.2f} min(d, s); the pass {r['pass']:.2f} s "
                  f"= {pass_rate / d:.2f} d; one after the other at best "
                  f"{1 / (1 / pass_rate + 1 / s) / min(d, s):.2f}")  # fmt: skip
    for label, got in runs.items():
        print(f"  first epoch {label} / min(d, s) (median of {args.repeats}): "
              f"{statistics.median(got):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
