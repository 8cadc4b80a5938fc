"""embed-dir's feeding path as on a many-core GPU machine, emulated on any machine.

On the lent H200 (16 cores), embed-dir reached about 0.55 of its reader pool's
rate (d) over 2,000 files, and a GPU machine is not always at hand to find out
why. Here the reader processes do no work: each "read" sleeps ``--read-ms``
(no CPU, so 16 readers run on 2 cores as on 16) and returns a real row, so
d = readers / read time exactly; everything else is embed-dir as it runs: the
reader pool (forkserver start included), the ring, reading ahead as with CUDA,
onnxruntime (a negligible encoder on the CPU, about 10 ms a batch of 32 with
the GIL released, standing in for vit_small on the GPU), the rows and the
Parquet table. ``--session-seconds`` adds a pause (the GIL released) to the
model's loading, as a CUDA session's takes longer. Each run is a fresh process,
as the command is.

Printed per archive size: b/d (end to end against the readers' rate), when the
first batch was ready, and b/d after it (the steady state).

Usage:
    python benchmarks/feed.py                       # 16 readers, 14 ms a read
    python benchmarks/feed.py --files 2000,20000 --session-seconds 1.5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fake_reads import fake_read  # benchmarks/, the script's own folder


class AsIfCuda:
    """A CPU session that says it is CUDA's (so the run reads ahead)."""

    def __init__(self, session) -> None:  # noqa: ANN001
        self.session = session

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.session, name)

    def get_providers(self) -> list[str]:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def one_run(onnx: Path, root: Path, readers: int, pause: float, first: bool) -> dict:
    """embed_dir() over ``root`` with fake reads, as with CUDA: reading ahead,
    the session loading in a thread (``pause`` s slower) while the readers read;
    with ``first``, loaded before they start, as before 2026-11-27."""
    import catchment_mae.batch.reader as reader
    from catchment_mae.batch import mapper, runner

    reader.read_into_slot = fake_read  # the Reader submits this module global
    real = mapper.create_session

    def slow_session(path, device="cpu", threads=None, spinning=True, optimise=True):  # noqa: ANN001, ANN202
        if not optimise:  # the probe of its metadata
            return real(path, device, threads, spinning, optimise)
        time.sleep(pause)
        return AsIfCuda(real(path, device, threads, spinning, optimise))

    mapper.create_session = slow_session
    mapper.session_providers = lambda device: [mapper.CUDA, "CPUExecutionProvider"]
    build = mapper.Mapper.__init__

    def in_order(self, *args, **kwargs):  # noqa: ANN001, ANN202
        build(self, *args, background=not first, **kwargs)

    mapper.Mapper.__init__ = in_order
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        s = runner.embed_dir(
            root, onnx, Path(tmp) / "e.parquet", overwrite=True, device="cpu",
            num_workers=readers,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
    return {**s.to_dict(), "wall": seconds, "failures": len(s.failures)}


def fresh_run(cmd: list[str], env: dict[str, str], failed: str) -> dict:
    """One run in a fresh process, as the command is: its JSON summary.

    Raises:
        SystemExit: the run failed, or some of its fake reads did (``failed``).
    """
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])
    s = json.loads(r.stdout)
    if s[failed]:
        raise SystemExit(f"{s[failed]} fake reads failed")
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--readers", type=int, default=16)
    ap.add_argument("--read-ms", type=float, default=14.0, help="one read's time")
    ap.add_argument("--files", default="2000,20000", help="archive sizes")
    ap.add_argument("--session-seconds", type=float, default=0.0)
    ap.add_argument(
        "--session-first", action="store_true",
        help="load the session before reading (as before 2026-11-27)",
    )  # fmt: skip
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # ONNX ROOT
    args = ap.parse_args()
    if args.one:
        onnx, root = map(Path, args.one)
        run = one_run(
            onnx, root, args.readers, args.session_seconds, args.session_first
        )
        print(json.dumps(run))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from pipeline import make_encoder

    d = args.readers / (args.read_ms / 1000)
    env = {**os.environ, "CMAE_FEED_READ_MS": str(args.read_ms)}
    print(f"{args.readers} readers of {args.read_ms} ms a file: d = {d:.0f} "
          f"files/s; model load + {args.session_seconds} s; {os.cpu_count()} "
          "cores here")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        onnx = make_encoder(
            "vit_tiny_patch16_224", tmp, depth=1, embed_dim=32, num_heads=2
        )
        for n in map(int, args.files.split(",")):
            root = tmp / f"in{n}"
            root.mkdir()
            for i in range(n):  # listed and stat'ed, never read
                (root / f"f{i:06d}.tif").write_bytes(b"")
            runs = []
            for _ in range(args.repeats):
                cmd = [sys.executable, __file__, "--one", str(onnx), str(root),
                       "--readers", str(args.readers),
                       "--session-seconds", str(args.session_seconds)]  # fmt: skip
                cmd += ["--session-first"] if args.session_first else []
                s = fresh_run(cmd, env, "failures")
                first = s["first_batch_seconds"]
                after = (s["embedded"] - args.batch_size) / (s["seconds"] - first)
                runs.append((s["embedded"] / s["wall"] / d, first, after / d, s))
                print(f"    {n} files: {s['wall']:.2f} s, b/d {runs[-1][0]:.2f}; model "
                      f"loaded in {s['session_seconds']:.2f} s (waited for "
                      f"{s['session_wait_seconds']:.2f} s), first batch at "
                      f"{first:.2f} s, then b/d {runs[-1][2]:.2f}; waiting for the "
                      f"readers {s['wait_seconds']:.2f} s, onnxruntime "
                      f"{s['inference_seconds']:.2f} s")  # fmt: skip
            med = [statistics.median(r[k] for r in runs) for k in range(3)]
            print(f"  {n} files (medians of {args.repeats}): b/d {med[0]:.2f}; "
                  f"first batch at {med[1]:.2f} s; after it b/d "
                  f"{med[2]:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
