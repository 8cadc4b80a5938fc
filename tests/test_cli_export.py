"""``cmae export`` through the CLI."""

from __future__ import annotations

import json
import shutil

from catchment_mae.cli.main import cli


def test_export__cli_json_and_human(runner, trained, tmp_path):
    out = tmp_path / "enc.onnx"
    result = runner.invoke(
        cli, ["export", str(trained.weights_path), "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["inputs"] == ["image", "scale", "valid"]
    assert report["embedding_dim"] == 40 and report["pool"] == "cls"
    assert len(report["parity"]) >= 4 and out.exists()
    assert result.stderr == ""  # no exporter chatter or warnings without -v
    again = runner.invoke(cli, ["export", str(trained.weights_path), "--out", str(out)])
    assert again.exit_code == 1 and "already exists (use --overwrite" in again.stderr
    human = runner.invoke(
        cli,
        ["export", str(trained.weights_path), "--out", str(out), "--overwrite",
         "--no-validate", "--quantize", "int8"],
    )  # fmt: skip
    assert human.exit_code == 0, human.output
    assert "wrote" in human.stderr and "not validated" in human.stderr
    assert (tmp_path / "enc.int8.onnx").exists()


def test_export__cli_errors_are_one_line(runner, trained, tmp_path):
    lonely = tmp_path / "m.pth"
    shutil.copy(trained.weights_path, lonely)
    result = runner.invoke(
        cli, ["export", str(lonely), "--out", str(tmp_path / "x.onnx")]
    )
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"cmae: error: {tmp_path / 'm.json'}: missing; cmae needs the NAME.json "
        "written beside NAME.pth"
    ]
    result = runner.invoke(cli, ["export", str(trained.weights_path)])
    assert result.exit_code == 2 and "--out" in result.stderr
