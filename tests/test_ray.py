"""``cmae embed-dir --ray``: the same table as the plain run, on a local Ray."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from catchment_mae.cli.main import cli
from tests.conftest import NO_TORCH, start_cmae, wait_for

pytest.importorskip("ray.data", reason="embed-dir --ray needs the ray extra")

# The driver runs as NO_TORCH: it imports no torch (Ray's workers run cmae's
# reader and onnxruntime).


def test_embed_dir_ray__same_table_as_the_plain_run(
    runner,
    archive,
    onnx_model,
    tmp_path,
):
    plain = tmp_path / "plain.parquet"
    r = runner.invoke(cli, ["embed-dir", str(archive), "--model", str(onnx_model),
                            "--out", str(plain)])  # fmt: skip
    assert r.exit_code == 0, r.output
    out = tmp_path / "ray.parquet"
    args = ["embed-dir", archive, "--model", onnx_model, "--out", out, "--ray",
            "--num-workers", "2", "--batch-size", "4", "--json"]  # fmt: skip
    p = subprocess.run([sys.executable, "-c", NO_TORCH, *map(str, args)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout)
    assert summary["embedded"] == 13 and summary["failed"] == 4
    assert p.stderr.count("\n") <= 5, p.stderr  # failures named, no Ray chatter
    a, b = pq.read_table(plain), pq.read_table(out)
    assert a.schema == b.schema
    assert b.num_rows == len(set(b["path"].to_pylist())) == a.num_rows  # one each
    assert set(a.schema.metadata) == set(b.schema.metadata)
    assert a.schema.metadata[b"geo"] == b.schema.metadata[b"geo"]  # same footprints
    rows_a = {r["path"]: r for r in a.to_pylist()}
    for row in b.to_pylist():
        ref = rows_a[row["path"]]
        assert row["error"] == ref["error"]
        assert row["geometry"] == ref["geometry"] and row["height"] == ref["height"]
        if ref["embedding"] is None:
            assert row["embedding"] is None
        else:
            np.testing.assert_allclose(row["embedding"], ref["embedding"], atol=1e-5)
    # A second run finds everything done (resume is the plain runner's plan).
    p = subprocess.run([sys.executable, "-c", NO_TORCH, *map(str, args)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    again = json.loads(p.stdout)
    assert again["embedded"] == 0 and again["already_done"] == 13
    # Chips: the same rows as the plain runner's, each raster's together.
    chips_plain, chips_ray = tmp_path / "cp.parquet", tmp_path / "cr.parquet"
    tile = ["--tile", "40", "--stride", "30", "--max-nodata", "0.9"]
    r = runner.invoke(cli, ["embed-dir", str(archive), "--model", str(onnx_model),
                            "--out", str(chips_plain), "--json", *tile])  # fmt: skip
    assert r.exit_code == 0, r.output
    args = [*args[:5], chips_ray, *args[6:], *tile]
    p = subprocess.run([sys.executable, "-c", NO_TORCH, *map(str, args)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    summary, ref = json.loads(p.stdout), json.loads(r.stdout)
    for key in ("embedded", "failed", "chips_skipped"):
        assert summary[key] == ref[key], key
    assert summary["embedded"] > 13  # some rasters are cut into several chips
    a, b = pq.read_table(chips_plain), pq.read_table(chips_ray)
    assert a.schema == b.schema
    key = ("path", "tile_row", "tile_col")
    a_rows = {tuple(r[k] for k in key): r for r in a.to_pylist()}
    b_rows = {tuple(r[k] for k in key): r for r in b.to_pylist()}
    assert a_rows.keys() == b_rows.keys() and b.num_rows == len(b_rows)
    for k, row in b_rows.items():
        assert (row["x0"], row["y0"], row["error"]) == (
            a_rows[k]["x0"], a_rows[k]["y0"], a_rows[k]["error"])  # fmt: skip
        if row["embedding"] is not None:
            np.testing.assert_allclose(
                row["embedding"], a_rows[k]["embedding"], atol=1e-5
            )


def test_embed_dir_ray__sigterm_saves_the_rows_as_ctrl_c_does(
    big_archive,  # noqa: F811
    onnx_model,
    tmp_path,
):
    """ray.init puts its own SIGTERM handler in: SIGTERM ended a Ray run with
    exit 15 and a C++ stack on stderr, not the rows saved, one line and 130."""
    import signal

    out = tmp_path / "r.parquet"
    args = ["embed-dir", big_archive, "--model", onnx_model, "--out", out, "--ray",
            "--num-workers", "2", "--rows-per-part", "4"]  # fmt: skip
    p = start_cmae(*args, entry=NO_TORCH)
    parts = out.with_name(out.name + ".parts")
    wait_for(p, lambda: bool(list(parts.glob("part-*.parquet"))), 120, "a part")
    p.send_signal(signal.SIGTERM)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].endswith("run the same command to continue")
    assert "SIGTERM received" not in stderr


def never_returns(root, rel, spec, chip=None):
    """A read that hangs (a decoder stuck in C, as far as the pool can tell)."""
    import time

    time.sleep(600)


def test_ray_read__a_file_past_its_time_budget_is_a_row(monkeypatch, onnx_model):
    import pickle

    import catchment_mae.batch.ray_runner as ray_runner
    from catchment_mae.runtime import create_session, read_metadata, spec_from_metadata

    spec = spec_from_metadata(read_metadata(create_session(onnx_model)))
    monkeypatch.setattr(ray_runner, "read_one", never_returns)
    monkeypatch.setattr(ray_runner, "_pools", {})
    out = ray_runner._read({"path": "a/x.tif", "chip": b""}, "/data", spec, 0.5)
    row = pickle.loads(out["row"])
    assert not out["ok"] and row.path == "a/x.tif"
    assert row.error == "timed out after 0.5 s (the reader was stopped)"
    for pool in ray_runner._pools.values():
        pool.close(kill=True)


def test_embed_dir_ray__timeout_is_passed_on(runner, monkeypatch, tmp_path, onnx_model):
    import catchment_mae.batch.ray_runner as ray_runner

    seen = {}

    def fake(*args, **kw):
        seen.update(kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(ray_runner, "embed_dir_ray", fake)
    r = runner.invoke(cli, ["embed-dir", str(tmp_path), "--model", str(onnx_model),
                            "--out", str(tmp_path / "t.parquet"), "--ray",
                            "--timeout", "7"])  # fmt: skip
    assert seen["timeout"] == 7.0, r.output
