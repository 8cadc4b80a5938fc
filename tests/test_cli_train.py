"""``cmae train`` through the CLI: the happy path and every bad input, one line each."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
import torch

from catchment_mae.cli.main import cli
from tests.conftest import (
    DATA,
    TINY_FLAGS,
    cli_train,
    decoder_config,
    python_out,
    start_cmae,
    wait_for,
)


def _assert_clean_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert all(x.startswith("cmae: ") for x in lines), result.stderr  # one line each
    assert lines[-1].startswith("cmae: error:"), result.stderr
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[-1], result.stderr


@pytest.fixture
def mixed_dir(tmp_path, dem_dir):
    """Good DEMs plus one file of each kind of bad input."""
    d = tmp_path / "mixed"
    shutil.copytree(dem_dir, d)
    (d / "empty.tif").write_bytes(b"")
    (d / "notes.tif").write_text("not a tiff")
    good = (d / "catchment_0000.tif").read_bytes()
    (d / "truncated.tif").write_bytes(good[: len(good) // 3])
    tifffile.imwrite(
        d / "allnodata.tif",
        np.full((20, 20), -9999, np.float32),
        extratags=[(42113, "s", 0, "-9999", True)],
    )
    tifffile.imwrite(d / "tiny.tif", np.ones((1, 1), np.float32))
    tifffile.imwrite(
        d / "threeband.tif",
        np.ones((3, 20, 20), np.float32),
        photometric="minisblack",
        planarconfig="separate",
    )
    nan = np.random.default_rng(0).normal(size=(30, 30)).astype(np.float32)
    nan[:5] = np.nan
    nan[5, :5] = np.inf
    tifffile.imwrite(d / "some_nan.tif", nan)
    return d


def test_train__writes_pth_and_json(runner, tmp_path, dem_dir):
    result = cli_train(runner, tmp_path, dem_dir, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["files"] == 12 and summary["skipped"] == 0
    state = torch.load(tmp_path / "m.pth", weights_only=True)
    assert "model" in state
    cfg = json.loads((tmp_path / "m.json").read_text())
    assert cfg["vit_model_name"] == "vit_tiny_patch16_224" and cfg["image_size"] == 32
    assert cfg["decoder_dim"] == 32  # from --config, flags on top


def test_train__cache_dir_and_no_cache(runner, tmp_path, dem_dir):
    cache = tmp_path / "my-cache"
    first = cli_train(runner, tmp_path, dem_dir, "--cache", str(cache), out="a.pth")
    assert first.exit_code == 0, first.output
    assert "cache: 0 of 12 raster(s) reused, 12 read now;" in first.stderr
    assert f"MB in {cache}" in first.stderr
    second = cli_train(
        runner, tmp_path, dem_dir, "--cache", str(cache), "--json", out="b.pth"
    )
    summary = json.loads(second.stdout)
    assert summary["cache"].startswith("cache: 12 of 12 raster(s) reused, 0 read now")
    # ... and as numbers, for scripts (it was the sentence alone)
    (shards,) = cache.glob("samples-*")
    size = sum(p.stat().st_size for p in shards.iterdir())
    assert (summary["cache_reused"], summary["cache_read"]) == (12, 0)
    assert summary["cache_dir"] == str(shards) and summary["cache_bytes"] == size
    before = sorted(cache.rglob("*"))
    none = cli_train(runner, tmp_path, dem_dir, "--no-cache", "--json", out="c.pth")
    assert none.exit_code == 0, none.output
    assert "no-cache" in json.loads(none.stdout)["cache"]
    assert json.loads(none.stdout)["cache_dir"] is None
    assert sorted(cache.rglob("*")) == before
    cfg = json.loads((tmp_path / "c.json").read_text())
    assert cfg["cache"] is False
    help_text = runner.invoke(cli, ["train", "--help"]).output
    assert "--cache" in help_text and "~/.cache/cmae" in help_text


def test_train__bad_files_are_skipped_with_their_reason(runner, tmp_path, mixed_dir):
    result = cli_train(runner, tmp_path, mixed_dir, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["skipped"] == 6
    for name, reason in [
        ("empty.tif", "empty file (0 bytes)"),
        ("notes.tif", "not a TIFF file"),
        ("truncated.tif", "cannot decode TIFF"),
        ("allnodata.tif", "no valid pixels"),
        ("tiny.tif", "1x1 pixels, too small"),
        ("threeband.tif", "has 3 band(s) but the model takes 1"),
    ]:
        lines = [x for x in result.stderr.splitlines() if name in x]
        assert len(lines) == 1 and reason in lines[0], (name, result.stderr)
        assert lines[0].startswith("cmae: warning: skipped ")
    assert "some_nan.tif" not in result.stderr  # NaN/inf are nodata, not an error
    assert (tmp_path / "m.pth").exists()


def test_train__strict_stops_at_the_first_bad_file(runner, tmp_path, mixed_dir):
    result = cli_train(runner, tmp_path, mixed_dir, "--strict")
    _assert_clean_error(result, "(--strict)")
    assert not (tmp_path / "m.pth").exists()
    assert "skipped" not in result.stderr  # it stopped: the reason said once


@pytest.mark.parametrize(
    "case", ["missing", "empty", "no_tiffs", "all_bad", "band_mismatch"]
)
def test_train__nothing_usable_exits_1_and_writes_no_model(
    runner, tmp_path, dem_dir, case
):
    d = tmp_path / "in"
    expected = {
        "missing": "input directory does not exist",
        "empty": "no .tif/.tiff files found",
        "no_tiffs": "no .tif/.tiff files found",
        "all_bad": "none of the 2 TIFF file(s) could be used",
        "band_mismatch": "has 1 band(s) but the model takes 3",
    }[case]
    extra: list[str] = []
    if case != "missing":
        d.mkdir()
    if case == "no_tiffs":
        (d / "readme.txt").write_text("x")
    if case == "all_bad":
        (d / "a.tif").write_bytes(b"")
        (d / "b.tif").write_text("nope")
    if case == "band_mismatch":
        shutil.copytree(dem_dir, d, dirs_exist_ok=True)
        extra = ["--in-chans", "3"]
    result = cli_train(runner, tmp_path, d, *extra)
    _assert_clean_error(result, expected)
    assert not (tmp_path / "m.pth").exists() and not (tmp_path / "m.json").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--norm-mean", "2000", "--norm-std", "0"], "must be > 0"),
        (["--norm-mean", "abc", "--norm-std", "1"], "expected comma-separated numbers"),
        (["--bands", "0,1"], "band numbers start at 1"),
        (["--mask-ratio", "1.5"], "--mask-ratio"),
        (["--epochs", "-1"], "--epochs"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_train__bad_option_values_exit_2(runner, tmp_path, dem_dir, flags, message):
    result = cli_train(runner, tmp_path, dem_dir, *flags)
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output


def test_train__config_errors_name_the_key(runner, tmp_path, dem_dir):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"input_dir": str(dem_dir), "learning_rate": 0.1}))
    result = runner.invoke(cli, ["train", "--config", str(bad)])
    _assert_clean_error(result, "bad.json: Unknown config key: learning_rate")
    result = cli_train(
        runner, tmp_path, dem_dir, "--norm-mean", "1,2", "--norm-std", "1,1"
    )
    _assert_clean_error(result, "norm_mean/norm_std have 2 value")
    assert "1 band" in result.stderr or "in_chans is 1" in result.stderr


def test_train__existing_output_needs_overwrite(runner, tmp_path, dem_dir):
    assert cli_train(runner, tmp_path, dem_dir).exit_code == 0
    before = (tmp_path / "m.pth").read_bytes()
    result = cli_train(runner, tmp_path, dem_dir)
    _assert_clean_error(result, "m.pth: already exists (use --overwrite")
    assert (tmp_path / "m.pth").read_bytes() == before
    assert (
        cli_train(runner, tmp_path, dem_dir, "--overwrite", "--seed", "3").exit_code
        == 0
    )
    assert (tmp_path / "m.pth").read_bytes() != before


def test_train__output_under_a_regular_file(runner, tmp_path, dem_dir):
    (tmp_path / "afile").write_text("x")
    result = cli_train(runner, tmp_path, dem_dir, out="afile/m.pth")
    _assert_clean_error(result, "afile/m.pth", "cannot write there")


def test_train__seed_config_as_it_is(runner, tmp_path, dem_dir):
    seed = json.loads((DATA / "seed_config.json").read_text())
    seed["input_dir"] = str(dem_dir)
    seed["model_output_path"] = str(tmp_path / "catchment_foundation_model.pth")
    cfg = tmp_path / "seed.json"
    cfg.write_text(json.dumps(seed))
    small = [
        "--image-size", "32", "--patch-size", "8", "--embed-dim", "32",
        "--depth", "1", "--num-heads", "2", "--epochs", "1", "--batch-size", "4",
        "--num-workers", "0",
    ]  # fmt: skip
    result = runner.invoke(cli, ["train", "--config", str(cfg), *small, "--json"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "catchment_foundation_model.json").read_text())
    assert saved["norm_mean"] == [2000.0] and saved["mask_ratio"] == 0.75
    assert saved["max_epochs"] == 1 and saved["batch_size"] == 4  # flags override


# ------------------------------------------------------------ unprivileged user
def _unprivileged(args: list[str]) -> subprocess.CompletedProcess:
    """Runs cmae so that file permissions apply, even in CI, which runs as root.

    As root, setpriv empties the capability bounding set before exec: the process
    keeps uid 0 (so it can still run the Python under /root) but loses
    CAP_DAC_OVERRIDE, so a mode-000 file or a mode-555 directory refuse it like
    any other user. Not root: permissions apply already.
    """
    cmd = [sys.executable, "-m", "catchment_mae.cli.main", *args]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_stats__unreadable_file_is_skipped_with_its_reason(tmp_path, dem_dir):
    d = tmp_path / "in"
    shutil.copytree(dem_dir, d)
    locked = d / "locked.tif"
    shutil.copy(d / "catchment_0000.tif", locked)
    os.chmod(locked, 0o000)
    r = _unprivileged(["stats", str(d), "--json"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["failed"] == 1
    assert f"skipped {locked}: cannot open: Permission denied" in r.stderr


def test_train__unwritable_output_directory(tmp_path, dem_dir):
    out = tmp_path / "models"
    out.mkdir()
    os.chmod(out, 0o555)
    r = _unprivileged(["train", str(dem_dir), "--out", str(out / "m.pth"), *TINY_FLAGS])
    assert r.returncode == 1
    assert r.stderr.startswith("cmae: error:") and "Traceback" not in r.stderr
    assert "cannot write there: Permission denied" in r.stderr


# ------------------------------------------------------------------ interrupts
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_train__signal_leaves_a_usable_checkpoint(tmp_path, dem_dir, sig):
    out = tmp_path / "m.pth"
    ckpt = tmp_path / "m.ckpt.pth"
    flags = list(TINY_FLAGS)
    flags[flags.index("--epochs") + 1] = "500"
    config = decoder_config(tmp_path)
    args = ["train", dem_dir, "--out", out, *flags, "--config", config]
    proc = start_cmae(*args)
    wait_for(proc, ckpt.exists, 120, "an epoch checkpoint")
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert (
        last.startswith("cmae: error: interrupted after ") and "Traceback" not in stderr
    )
    assert f"resume with --resume {ckpt}" in last
    state = torch.load(ckpt, weights_only=True)  # intact, plain data
    done = state["epoch"] + 1
    assert not out.exists()  # the final model is only written at the end
    # Resuming continues from the checkpoint (one more epoch here).
    flags[flags.index("--epochs") + 1] = str(done + 1)
    resumed = start_cmae(*args[:4], *flags, *args[-2:], "--resume", ckpt, "--json")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert torch.load(out, weights_only=True)["epoch"] == done + 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_train__a_signal_to_the_whole_group_stops_quietly(tmp_path, dem_dir, sig):
    """A terminal's Ctrl-C (and ``timeout``) signals every process of the group,
    loader workers included: one line, exit 130, within seconds."""
    out = tmp_path / "g.pth"
    flags = list(TINY_FLAGS)
    flags[flags.index("--epochs") + 1] = "100000"
    flags[flags.index("--num-workers") + 1] = "2"
    config = decoder_config(tmp_path)
    proc = start_cmae("train", dem_dir, "--out", out, *flags, "--no-cache",
                      "--config", config, start_new_session=True)  # fmt: skip
    ckpt = tmp_path / "g.ckpt.pth"
    wait_for(proc, ckpt.exists, 120, "an epoch checkpoint")
    time.sleep(0.5)
    t0 = time.monotonic()
    os.killpg(proc.pid, sig)
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 10, stderr
    assert proc.returncode == 130, stderr
    lines = [ln for ln in stderr.splitlines() if not ln.startswith("epoch ")]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert lines[-1].startswith("cmae: error: interrupted after "), lines


def test_train__the_readers_forkserver_starts_before_torch_is_imported(tmp_path):
    """The first pass's readers come from a forkserver started beside torch's
    import, not after it."""
    (tmp_path / "none").mkdir()  # a folder (its paths are checked first), empty
    code = f"""
import sys
import catchment_mae.workers as workers
seen = []
workers.prestart = lambda *_: seen.append("torch" in sys.modules)
from catchment_mae.cli.main import cli
try:
    cli(["train", "{tmp_path / "none"}", "--out", "{tmp_path / "m.pth"}"],
        standalone_mode=False)
except Exception as e:  # the input's error, after the imports
    print(e)
print(seen, "torch" in sys.modules)
"""
    said, started = python_out(code).splitlines()
    assert said.endswith("none: no .tif/.tiff files found")
    assert started == "[False] True"  # prestart ran, before torch was imported


@pytest.mark.parametrize(
    "nproc, workers, env, reads",
    [
        (1, None, {}, True),
        (1, 0, {}, False),  # --num-workers 0 reads in the main process
        (2, None, {}, False),  # --nproc's launcher: its ranks read
        (2, None, {"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, True),
        (1, None, {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, False),  # waits for rank 0
    ],
)
def test_reads_here(monkeypatch, nproc, workers, env, reads):
    from catchment_mae.cli.train import reads_here

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert reads_here(nproc, workers) is reads
