"""``cmae synth`` and ``cmae demo``."""

from __future__ import annotations

import json

import torch

from catchment_mae.cli.main import cli
from catchment_mae.raster import read_raster


def test_synth__writes_dems(runner, tmp_path):
    out = tmp_path / "dems"
    result = runner.invoke(
        cli,
        [
            "synth",
            str(out),
            "--count",
            "3",
            "--min-size",
            "16",
            "--max-size",
            "64",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    files = json.loads(result.stdout)["files"]
    assert len(files) == 3
    assert all(read_raster(f).info.geo.epsg for f in files)


def test_synth__bad_sizes(runner, tmp_path):
    result = runner.invoke(
        cli, ["synth", str(tmp_path), "--min-size", "100", "--max-size", "50"]
    )
    assert result.exit_code == 2 and "larger than --max-size" in result.stderr
    (tmp_path / "file").write_text("x")
    result = runner.invoke(cli, ["synth", str(tmp_path / "file" / "d"), "--count", "1"])
    assert result.exit_code == 1 and "cannot write" in result.stderr


def test_demo__end_to_end(runner, tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(
        cli,
        ["-q", "demo", "--out", str(out), "--count", "6", "--epochs", "2", "--json"],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["files"] == 6 and summary["epochs_run"] == 2
    assert (
        torch.load(out / "demo_model.pth", weights_only=True)["config"]["norm"]
        == "per-raster"
    )
    assert (out / "demo_model.preview.png").stat().st_size > 1000
    assert summary["onnx_min_cos"] >= 0.99999 and (out / "demo_model.onnx").exists()
    again = runner.invoke(
        cli, ["demo", "--out", str(out), "--count", "6", "--epochs", "1"]
    )
    assert again.exit_code == 1 and "already exists" in again.stderr
