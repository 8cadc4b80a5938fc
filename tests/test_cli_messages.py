"""What a new user meets: one line each, naming the file and what to do."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import pytest

from catchment_mae.cli.main import cli


def _one_line(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) >= 1 and lines[-1].startswith("cmae: error: "), result.stderr
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[-1], lines[-1]
    return lines[-1]


def test_an_onnx_where_a_checkpoint_is_needed(runner, onnx_model, tmp_path, dem_dir):
    r = runner.invoke(cli, ["export", str(onnx_model), "--out", str(tmp_path / "x")])
    _one_line(r, "tiny.json: missing")  # export wants the NAME.json beside it
    # With a NAME.json there, the file itself is what is wrong.
    shutil.copy(onnx_model, tmp_path / "m.onnx")
    (tmp_path / "m.json").write_text("{}")
    r = runner.invoke(
        cli, ["export", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "o.onnx")]
    )
    _one_line(r, "m.onnx: not a PyTorch checkpoint but an ONNX encoder")
    r = runner.invoke(
        cli,
        ["train", str(dem_dir), "--out", str(tmp_path / "t.pth"), "--resume",
         str(onnx_model)],
    )  # fmt: skip
    _one_line(r, "not a PyTorch checkpoint but an ONNX encoder")


def test_a_checkpoint_where_an_onnx_is_needed(runner, trained, dem_dir, tmp_path):
    pth = str(trained.weights_path)
    tif = str(sorted(dem_dir.glob("*.tif"))[0])
    for args in (
        ["embed", tif, "--model", pth],
        ["embed-dir", str(dem_dir), "--model", pth, "--out", str(tmp_path / "e.pq")],
    ):
        r = runner.invoke(cli, args)
        _one_line(r, "a PyTorch checkpoint, not an ONNX encoder", "cmae export")
    assert not list(tmp_path.iterdir())


def test_a_binary_config(runner, tmp_path, dem_dir):
    bad = tmp_path / "c.json"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    r = runner.invoke(cli, ["train", str(dem_dir), "--config", str(bad)])
    _one_line(r, "c.json: not a text file")


def test_embed_errors_look_like_every_other(runner, onnx_model, tmp_path):
    empty = tmp_path / "e.tif"
    empty.write_bytes(b"")
    r = runner.invoke(cli, ["embed", str(empty), "--model", str(onnx_model)])
    _one_line(r, "no file could be embedded")
    assert "Error:" not in r.stderr


def test_info_says_nodata_once(runner, onnx_model):
    r = runner.invoke(cli, ["info", str(onnx_model)])
    assert r.exit_code == 0 and "nodata:     nodata:" not in r.stdout
    assert "nodata:     GDAL_NODATA" in r.stdout


def test_a_finished_table_run_again_writes_nothing(
    runner, onnx_model, tmp_path, dem_dir
):
    out = tmp_path / "e.parquet"
    args = ["embed-dir", str(dem_dir), "--model", str(onnx_model), "--out", str(out)]
    assert runner.invoke(cli, args).exit_code == 0
    stale = tmp_path / ".e.parquet.k9xyz.tmp"  # what a kill -9 mid-merge left
    stale.write_bytes(b"half a table")
    again = runner.invoke(cli, args)
    assert again.exit_code == 0
    assert "nothing new" in again.stderr and "wrote" not in again.stderr
    assert not stale.exists()


def test_serve_on_a_port_in_use(tmp_path):
    pytest.importorskip("waitress")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "catchment_mae.cli.main", "serve", "--port",
             str(port), "--data-root", str(tmp_path), "--model-root", str(tmp_path)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"cmae: error: cannot listen on 127.0.0.1:{port}")
    assert "--port" in last and "Traceback" not in r.stderr
