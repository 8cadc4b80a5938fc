"""Training under torchrun: two CPU processes (gloo) against one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from catchment_mae.data import EpochSampler
from tests.conftest import python_out, start_cmae, wait_for


def test_sampler__ranks_share_each_global_batch():
    """Rank r takes the r-th part of every global batch one process would see;
    every rank takes the same number of steps (the last batch filled up)."""
    n, batch, world = 11, 3, 2
    alone = EpochSampler(n, seed=5, shuffle=True)
    parts = [EpochSampler(n, 5, True, rank=r, world=world, batch=batch) for r in (0, 1)]
    for s in (alone, *parts):
        s.set_epoch(4)
    order = list(alone)
    got = [list(p) for p in parts]
    assert len(got[0]) == len(got[1]) == len(parts[0]) == 6  # 2 steps of 3
    size = batch * world
    padded = (order + order)[: 2 * size]
    for step in range(2):
        together = (
            got[0][step * batch : (step + 1) * batch]
            + got[1][step * batch : (step + 1) * batch]
        )
        assert together == padded[step * size : (step + 1) * size]
    assert set(got[0]) | set(got[1]) == set(range(n))


@pytest.fixture(scope="module")
def dems(tmp_path_factory):
    """16 DEMs: 12 to train on in 3 global batches of 4 (none padded), 4 to
    validate on."""
    from catchment_mae.synth import generate_dems

    out = tmp_path_factory.mktemp("ddp") / "dems"
    generate_dems(out, 16, min_size=40, max_size=96, seed=3)
    return out


def test_stop__a_leaving_rank_drops_the_forwarded_signal(tmp_path):
    """torchrun forwards to each rank the Ctrl-C it already had: once a rank
    leaves the group a second one must not cut the shutdown short (a group left
    half-destroyed aborts the rank at exit)."""
    code = f"""
import os, signal, time
import torch.distributed as dist
from catchment_mae.distributed import stop
from catchment_mae.ranks import Ranks
dist.init_process_group("gloo", init_method="file://{tmp_path / "store"}",
                        rank=0, world_size=1)
stop(Ranks(rank=0, world=2, local_rank=0))
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.1)
print(dist.is_initialized(), signal.getsignal(signal.SIGTERM) is signal.SIG_IGN)
"""
    assert python_out(code) == "False True"  # left, and not interrupted


def _train(tmp_path, dem_dir, name, nproc, extra=()):
    out = tmp_path / name / "m.pth"
    cfg = tmp_path / "dec.json"
    cfg.write_text(json.dumps({"decoder_dim": 32, "decoder_depth": 1,
                               "decoder_num_heads": 2}))  # fmt: skip
    args = [
        "train", str(dem_dir), "--out", str(out), "--model", "vit_tiny_patch16_224",
        "--image-size", "32", "--patch-size", "8", "--embed-dim", "32", "--depth",
        "1", "--num-heads", "2", "--batch-size", "4", "--num-workers", "0",
        "--val-fraction", "0.25", "--epochs", "3", "--lr", "1e-3", "--device",
        "cpu", "--cache", str(tmp_path / "cache"), "--config", str(cfg), "--json",
        "--overwrite",
    ]  # fmt: skip
    args += extra
    if nproc > 1:  # what `torchrun --nproc_per_node N -m catchment_mae.cli.main` runs
        args += ["--nproc", str(nproc)]
    p = subprocess.run(
        [sys.executable, "-m", "catchment_mae.cli.main", *args],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch built without gloo")
def test_train__two_processes_match_one(tmp_path, dems):
    one, _ = _train(tmp_path, dems, "one", 1)
    two, p = _train(tmp_path, dems, "two", 2)
    # Rank 0 alone reports and writes: one JSON line, one set of outputs.
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0])["weights"] == str(two)
    names = sorted(x.name for x in two.parent.iterdir())
    assert names == sorted(x.name for x in one.parent.iterdir())
    assert not [x for x in names if "tmp" in x]
    a = [
        json.loads(ln)
        for ln in (one.parent / "m.metrics.jsonl").read_text().splitlines()
    ]
    b = [
        json.loads(ln)
        for ln in (two.parent / "m.metrics.jsonl").read_text().splitlines()
    ]
    assert len(a) == len(b) == 3
    assert [x["images"] for x in b] == [x["images"] for x in a] == [12] * 3
    # The same global batches and weights; only the random masks differ (each
    # process draws its own), so the training losses agree within 5 % and the
    # validation loss (fixed masks) within 2 %.
    for x, y in zip(a, b, strict=True):
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=0.05)
        assert y["val_loss"] == pytest.approx(x["val_loss"], rel=0.02)
    assert b[-1]["train_loss"] < b[0]["train_loss"]  # it learns
    # A checkpoint of 2 processes resumes in 1 (and the other way round).
    ckpt = str(two.with_suffix(".ckpt.pth"))
    _, p = _train(tmp_path, dems, "two", 1, ["--epochs", "4", "--resume", ckpt])
    assert json.loads(p.stdout)["epochs_run"] == 1
    _train(tmp_path, dems, "two", 2, ["--epochs", "5", "--resume", ckpt])
    history = (two.parent / "m.metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in history] == [1, 2, 3, 4, 5]


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch built without gloo")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_train__a_signal_stops_every_rank(tmp_path, dems, sig):
    """Ctrl-C in a terminal (or ``timeout``) signals the launcher and both ranks:
    one line from rank 0, exit 130, a usable checkpoint, no process left."""
    import psutil

    out = tmp_path / "s" / "m.pth"
    cfg = tmp_path / "dec.json"
    cfg.write_text(json.dumps({"decoder_dim": 32, "decoder_depth": 1,
                               "decoder_num_heads": 2}))  # fmt: skip
    proc = start_cmae(
        "train", dems, "--out", out, "--model", "vit_tiny_patch16_224",
        "--image-size", "32", "--patch-size", "8", "--embed-dim", "32", "--depth",
        "1", "--num-heads", "2", "--batch-size", "4", "--num-workers", "0",
        "--epochs", "100000", "--device", "cpu", "--config", cfg,
        "--cache", tmp_path / "cache", "--nproc", "2", start_new_session=True,
    )  # fmt: skip
    ckpt = out.with_suffix(".ckpt.pth")
    wait_for(proc, ckpt.exists, 180, "an epoch checkpoint")
    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(True)]
    os.killpg(proc.pid, sig)
    t0 = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 130, stderr
    said = [ln for ln in stderr.strip().splitlines() if ln.startswith("cmae")]
    assert "Traceback" not in stderr and len(said) == 1, stderr  # rank 0's line
    assert said[0].startswith("cmae: error: interrupted after ")
    plan = [ln for ln in stderr.splitlines() if ln.startswith("training ")]
    assert len(plan) == 1 and "1 thread(s)" in plan[0], stderr  # rank 0's, its share
    assert torch.load(ckpt, weights_only=True)["epoch"] >= 0  # whole, plain data
    time.sleep(1)
    assert not [p for p in family if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]  # fmt: skip
