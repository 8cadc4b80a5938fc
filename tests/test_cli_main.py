"""The ``cmae`` group: version, help, registry, torch-free commands, error handling."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import click
import pytest

import catchment_mae
import catchment_mae.cli
from catchment_mae.cli.main import cli
from tests.conftest import NO_TORCH, python_out


def test_version(runner):
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"cmae, version {catchment_mae.__version__}"


def test_all_registered():
    """Every command module in catchment_mae/cli is wired into the group."""
    modules = {
        m.name
        for m in pkgutil.iter_modules(catchment_mae.cli.__path__)
        if m.name not in ("main", "entry", "options")
    }
    registered = set(cli.commands)
    assert {m.replace("_", "-") for m in modules} == registered


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_help_on_every_command(runner, command):
    result = runner.invoke(cli, [command, "--help"], prog_name="cmae")
    assert result.exit_code == 0
    assert "Usage: cmae" in result.stdout and "Example" in result.stdout


def test_commands_work_without_torch(tmp_path):
    """`cmae --help`, `stats` and `synth` must run where importing torch fails."""
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True
    )
    assert run("--help").returncode == 0
    for command in ("stats", "synth", "train", "demo"):
        r = run(command, "--help")
        assert r.returncode == 0, r.stderr
    r = run(
        "synth",
        str(tmp_path / "d"),
        "--count",
        "3",
        "--min-size",
        "16",
        "--max-size",
        "40",
    )
    assert r.returncode == 0, r.stderr
    r = run("stats", str(tmp_path / "d"), "--json")
    assert r.returncode == 0, r.stderr
    assert '"files": 3' in r.stdout
    # The torch-only command fails with one clear line, not a traceback.
    r = run("train", str(tmp_path / "d"), "--out", str(tmp_path / "m.pth"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "cmae: error:" in r.stderr and "torch" in r.stderr


def test_wrong_paths_are_said_before_torch_is_imported(tmp_path):
    """A wrong path is answered at once: the commands that need torch check
    their paths first (importing torch, timm and lightly took 11-38 s on a busy
    machine). Without torch, the path is still what the line names."""
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-c", NO_TORCH, *map(str, args)],
        capture_output=True, text=True,
    )  # fmt: skip
    (tmp_path / "m.pth").write_bytes(b"")
    (tmp_path / "m.json").write_text("{}")
    cases = [
        (("train", tmp_path / "nope", "--out", tmp_path / "x.pth"),
         "input directory does not exist"),
        (("train", tmp_path, "--out", tmp_path / "m.pth"), "already exists"),
        (("train", tmp_path, "--out", tmp_path / "y.pth", "--resume",
          tmp_path / "gone.ckpt.pth"), "no such checkpoint"),
        (("export", tmp_path / "nope.pth", "--out", tmp_path / "x.onnx"),
         "weights file does not exist"),
        (("eval", tmp_path / "nope.parquet", "--labels", tmp_path / "l.csv"),
         "no such file"),
    ]  # fmt: skip
    for args, words in cases:
        r = run(*args)
        assert r.returncode == 1 and words in r.stderr, (args, r.stderr)
        assert "torch" not in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_torch_free_modules_do_not_import_torch():
    code = (
        "import sys; import catchment_mae, catchment_mae.raster, "
        "catchment_mae.preprocess, "
        "catchment_mae.stats, catchment_mae.synth, catchment_mae.config, "
        "catchment_mae.cli.main; "
        "bad = [m for m in ('torch', 'timm', 'lightly') if m in sys.modules]; "
        "assert not bad, bad"
    )
    python_out(code)


def _invoke_added(runner, command: click.Command):
    """Runs ``cmae NAME`` for a command added to the CLI for one test."""
    cli.add_command(command)
    try:
        return runner.invoke(cli, [command.name])
    finally:
        cli.commands.pop(command.name)


def test_unexpected_errors_are_one_line(runner, monkeypatch):
    @click.command("boom")
    def boom() -> None:
        raise RuntimeError("something odd\nwith a second line")

    result = _invoke_added(runner, boom)
    assert result.exit_code == 2
    assert result.stderr.startswith("cmae: error: internal error: RuntimeError")
    assert "Traceback" not in result.output


def test_an_error_while_an_interrupt_unwinds_is_the_interrupt(runner):
    """A Ctrl-C that lands while a lock is taken makes its release fail on the
    way out: the run was interrupted (130, one line), not an internal error."""

    @click.command("stopped")
    def stopped() -> None:
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("cannot release un-acquired lock")

    result = _invoke_added(runner, stopped)
    assert result.exit_code == 130
    assert result.stderr.strip() == "cmae: error: interrupted"


def test_package_layout__folders_live_in_the_package_namespace():
    import importlib.util

    import catchment_mae.batch
    import catchment_mae.export

    assert catchment_mae.export.__file__.endswith("export/__init__.py")
    assert catchment_mae.batch.__file__.endswith("batch/__init__.py")
    # No generic top-level modules were installed.
    for name in ("export", "batch"):
        spec = importlib.util.find_spec(name)
        assert spec is None or "site-packages" not in (spec.origin or "")


@pytest.mark.parametrize("command", ["train", "embed-dir"])
def test_chip_options_are_bounded_alike(runner, tmp_path, command):
    """--stride and --max-nodata mean the same wherever chips are cut: a stride
    under 8 pixels and a share above 1 are usage errors (exit 2) naming the
    option, before anything is read."""
    data = tmp_path / "in"
    data.mkdir()
    out = ["--model", str(tmp_path / "m.onnx")] if command == "embed-dir" else []
    base = [command, str(data), "--out", str(tmp_path / "o"), *out, "--tile", "32"]
    for extra, option in ((["--stride", "4"], "--stride"),
                          (["--max-nodata", "1.5"], "--max-nodata")):  # fmt: skip
        result = runner.invoke(cli, [*base, *extra])
        assert result.exit_code == 2, result.output
        assert option in result.stderr
