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

Usage:
    python benchmarks/feed_pass.py                      # 4,000 files, 16 readers
    python benchmarks/feed_pass.py --files 4000 --no-cache
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

from feed import fresh_run  # benchmarks/, the script's own folder

from catchment_mae.cache import Entry, write_row
from catchment_mae.preprocess import PreprocessSpec, load_resampled

SPEC = PreprocessSpec(image_size=224, in_chans=1, norm="per-raster")
_template = None


def fake_build(path, key, spec, target):  # noqa: ANN001, ANN201
    """A reader's task without the decoding: ``CMAE_FEED_READ_MS`` of sleep, then
    a real DEM's preprocessed arrays written into the shard row."""
    global _template
    time.sleep(float(os.environ["CMAE_FEED_READ_MS"]) / 1000)
    if _template is None:
        _template = load_resampled(os.environ["CMAE_FEED_DEM"], spec)
    crc = write_row(target, _template) if target is not None else 0
    return Entry.of(key, _template), crc, None


def one_pass(root: Path, readers: int, cache: bool) -> dict:
    """``prepare`` over ``root``'s (empty) files with fake reads."""
    import catchment_mae.prepare as prepare
    from catchment_mae.workers import ReaderPool

    prepare.build_one = fake_build  # _build submits this module global
    # The forkserver up and its modules imported, as after pipeline.py's (d):
    # prestart() only launches it (its imports then take 0.4 s more).
    with ReaderPool(1) as pool:
        pool.submit(int).result()
    files = sorted(root.glob("*.tif"))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--readers", type=int, default=16)
    ap.add_argument("--read-ms", type=float, default=14.0, help="one read's time")
    ap.add_argument("--files", type=int, default=4000)
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # ROOT
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
