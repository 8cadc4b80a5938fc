"""``cmae embed-dir`` and ``cmae embed``: rows, failures, shards, no torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catchment_mae.cli.main import cli
from catchment_mae.preprocess import load_sample
from catchment_mae.runtime import create_session, read_metadata, spec_from_metadata
from tests.conftest import DATA, NO_TORCH, python_out, start_cmae, wait_for


def _run(runner, *args):
    return runner.invoke(cli, ["embed-dir", *map(str, args)])


def test_writer_warming_up__takes_pyarrows_first_call_off_the_rows_path():
    """pyarrow imports pandas at its first pa.array (a quarter of a second):
    warming_up does it in its thread, so the first flush of rows does not."""
    pytest.importorskip("pandas", reason="pyarrow imports pandas only if installed")
    code = (
        "import sys\n"
        "from catchment_mae.warmup import warming_up\n"
        "assert 'pandas' not in sys.modules\n"
        "with warming_up(): pass\n"
        "print('pandas' in sys.modules)\n"
    )
    assert python_out(code) == "True"


def test_embed_dir__rows_columns_and_values(runner, archive, onnx_model, tmp_path):
    out = tmp_path / "emb.parquet"
    result = _run(
        runner,
        archive,
        "--model",
        onnx_model,
        "--out",
        out,
        "--json",
        "--num-workers",
        "2",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["embedded"] == 13 and summary["failed"] == 4
    assert summary["provider"] == "CPUExecutionProvider"
    # Where the run's time went: loading the model, then the first batch read.
    assert 0 < summary["session_seconds"] < summary["first_batch_seconds"]
    assert summary["first_batch_seconds"] < summary["seconds"]
    # The wait for the readers includes the first batch's, within the run.
    assert 0 < summary["wait_seconds"] < summary["seconds"]
    assert not [t for t in threading.enumerate() if t.name == "cmae-warm-up"]
    table = pq.read_table(out)
    assert table.num_rows == 17
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 40)
    assert table.schema.names == [
        "path", "embedding", "height", "width", "bands", "dtype", "nodata_fraction",
        "file_size", "mtime", "crs", "pixel_size_x", "pixel_size_y", "geometry",
        "bbox", "error",
    ]  # fmt: skip
    rows = table.to_pylist()
    paths = [r["path"] for r in rows]
    assert paths == sorted(paths, key=lambda p: p.split("/"))  # the walk's order
    assert all("\\" not in p and not p.startswith("/") for p in paths)
    failed = {r["path"]: r["error"] for r in rows if r["error"] is not None}
    assert set(failed) == {"empty.tif", "b/text.TIF", "corrupt.tif", "allnodata.tif"}
    assert "empty file" in failed["empty.tif"] and "not a TIFF" in failed["b/text.TIF"]
    assert all(r["embedding"] is None for r in rows if r["error"] is not None)
    # Values: the same as onnxruntime on the shared preprocessing, file by file.
    sess = create_session(onnx_model)
    spec = spec_from_metadata(read_metadata(sess))
    for r in rows:
        if r["error"] is not None:
            continue
        s = load_sample(archive / r["path"], spec)
        feed = {"image": s.image[None], "scale": s.scale[None], "valid": s.valid[None]}
        (ref,) = sess.run(["embedding"], feed)
        np.testing.assert_allclose(r["embedding"], ref[0], atol=1e-5)
        assert (r["height"], r["width"]) == (s.info.height, s.info.width)
        assert (
            r["bands"] == 1 and r["file_size"] == (archive / r["path"]).stat().st_size
        )
        assert 0.0 <= r["nodata_fraction"] < 1.0 and r["mtime"] is not None
    meta = table.schema.metadata
    assert json.loads(meta[b"model_metadata"])["embedding_dim"] == "40"
    assert meta[b"model_sha256"].decode() == __import__(
        "catchment_mae.io"
    ).io.sha256_file(onnx_model)
    # The summary reaches the user in one line.
    human = _run(runner, archive, "--model", onnx_model, "--out", out, "--overwrite")
    assert human.exit_code == 0
    assert "13 embedded, 4 failed" in human.stderr.splitlines()[-1]


def test_embed_dir__workers_do_not_change_the_result(
    runner, archive, onnx_model, tmp_path
):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    assert (
        _run(
            runner, archive, "--model", onnx_model, "--out", a, "--num-workers", "0"
        ).exit_code
        == 0
    )
    assert (
        _run(
            runner,
            archive,
            "--model",
            onnx_model,
            "--out",
            b,
            "--num-workers",
            "2",
            "--batch-size",
            "3",
        ).exit_code
        == 0
    )
    ta, tb = pq.read_table(a), pq.read_table(b)
    assert ta.column("path").to_pylist() == tb.column("path").to_pylist()
    ea = np.array([e for e in ta.column("embedding").to_pylist() if e is not None])
    eb = np.array([e for e in tb.column("embedding").to_pylist() if e is not None])
    np.testing.assert_allclose(ea, eb, atol=1e-5)


def test_embed_dir__shards_split_the_archive(runner, archive, onnx_model, tmp_path):
    seen = []
    for k in (1, 2, 3):
        out = tmp_path / f"s{k}.parquet"
        r = _run(
            runner, archive, "--model", onnx_model, "--out", out, "--shard", f"{k}/3"
        )
        if r.exit_code == 0:
            seen += pq.read_table(out).column("path").to_pylist()
    assert sorted(seen) == sorted(set(seen))  # no raster twice
    assert len(seen) == 17  # every raster once
    bad = _run(
        runner,
        archive,
        "--model",
        onnx_model,
        "--out",
        tmp_path / "x.parquet",
        "--shard",
        "4/3",
    )
    assert bad.exit_code == 2 and "between 1 and N" in bad.stderr


def test_embed_dir__nothing_to_embed(runner, onnx_model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "e.parquet"
    r = _run(runner, empty, "--model", onnx_model, "--out", out)
    assert r.exit_code == 1 and "no .tif/.tiff files found" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".e.parquet*"))  # no temp left
    r = _run(runner, tmp_path / "missing", "--model", onnx_model, "--out", out)
    assert r.exit_code == 1 and "does not exist" in r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.tif").write_bytes(b"")
    r = _run(runner, bad, "--model", onnx_model, "--out", out)
    assert r.exit_code == 1 and "nothing embedded" in r.stderr
    assert pq.read_table(out).column("error").to_pylist() == ["empty file (0 bytes)"]
    # --json still says what the run did (it printed nothing).
    r = _run(runner, bad, "--model", onnx_model, "--out", out, "--json")
    assert r.exit_code == 1 and "nothing embedded" in r.stderr
    summary = json.loads(r.stdout)
    assert (summary["embedded"], summary["failed"]) == (0, 1)
    assert summary["failures"] == [{"path": "x.tif", "error": "empty file (0 bytes)"}]


def test_embed_dir__unreadable_earlier_output_and_bad_models(
    runner, archive, onnx_model, tmp_path
):
    out = tmp_path / "o.parquet"
    out.write_bytes(b"PAR1 torn")  # a damaged table: replaced with --overwrite
    r = _run(runner, archive, "--model", onnx_model, "--out", out)
    assert r.exit_code == 1
    assert "cannot read the earlier output to resume (a damaged Parquet file)" in (
        r.stderr
    )
    assert out.read_bytes() == b"PAR1 torn"  # untouched
    r = _run(runner, archive, "--model", onnx_model, "--out", out, "--overwrite")
    assert r.exit_code == 0
    # Not a table at all (an input raster given as --out by mistake): never
    # replaced, --overwrite or not. It was.
    raster = next(archive.rglob("*.tif"))
    kept = raster.read_bytes()
    for extra in ([], ["--overwrite"]):
        r = _run(runner, archive, "--model", onnx_model, "--out", raster, *extra)
        assert r.exit_code == 1, r.output
        assert r.stderr.strip() == (
            f"cmae: error: {raster}: exists and is not a Parquet table; it is not "
            "replaced, even with --overwrite (choose another --out)"
        )
    assert raster.read_bytes() == kept
    # An empty file (mktemp's) is nothing to lose; a FIFO is refused unread.
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    assert _run(runner, archive, "--model", onnx_model, "--out", empty).exit_code == 0
    fifo = tmp_path / "fifo.parquet"
    os.mkfifo(fifo)
    r = _run(runner, archive, "--model", onnx_model, "--out", fifo)
    assert r.exit_code == 1 and "not a regular file" in r.stderr
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(b"nope")
    r = _run(runner, archive, "--model", fake, "--out", tmp_path / "p.parquet")
    assert r.exit_code == 1 and "onnxruntime cannot load it" in r.stderr
    assert "Traceback" not in r.output and "[ONNXRuntimeError]" not in r.stderr
    gone = tmp_path / "gone.onnx"
    r = _run(runner, archive, "--model", gone, "--out", tmp_path / "p.parquet")
    assert r.exit_code == 1
    assert (
        r.stderr.strip()
        == f"cmae: error: {gone}: no such file (an .onnx from cmae export)"
    )


def _rows(out):
    return {r["path"]: r for r in pq.read_table(out).to_pylist()}


def test_embed_dir__resume_embeds_only_what_is_missing(
    runner, archive, onnx_model, tmp_path
):
    out = tmp_path / "r.parquet"
    first = _run(runner, archive, "--model", onnx_model, "--out", out, "--json")
    assert json.loads(first.stdout)["embedded"] == 13
    before = out.read_bytes()
    # A finished job: nothing new, nothing written.
    again = _run(runner, archive, "--model", onnx_model, "--out", out, "--json")
    summary = json.loads(again.stdout)
    assert (
        summary["nothing_new"] and summary["embedded"] == 0 and summary["failed"] == 4
    )
    assert out.read_bytes() == before
    said = _run(runner, archive, "--model", onnx_model, "--out", out).stderr
    assert said.splitlines()[-1].startswith(
        "nothing new: 13 raster(s) already embedded, 4 failed again for the same "
        "reasons in "
    )  # it said "all 13 raster(s)", as if none had failed
    # Change one file, delete one, add one, repair a failed one.
    changed = sorted(archive.glob("a/*.tif"))[0]
    shutil.copy(sorted(archive.glob("b/c/*.tif"))[0], changed)
    gone = sorted(archive.glob("a/*.tif"))[1]
    gone.unlink()
    shutil.copy(sorted(archive.glob("b/c/*.tif"))[1], archive / "new.tif")
    shutil.copy(sorted(archive.glob("b/c/*.tif"))[2], archive / "empty.tif")
    third = _run(runner, archive, "--model", onnx_model, "--out", out, "--json")
    summary = json.loads(third.stdout)
    # changed + new + repaired, and the 3 still-broken files are retried
    assert summary["embedded"] == 3 and summary["failed"] == 3
    assert summary["already_done"] == 11
    rows = _rows(out)
    assert len(rows) == 17 and gone.relative_to(archive).as_posix() not in rows
    assert rows["new.tif"]["error"] is None and rows["empty.tif"]["error"] is None
    full = _run(
        runner, archive, "--model", onnx_model, "--out", out, "--overwrite", "--json"
    )
    assert json.loads(full.stdout)["embedded"] == 14  # --overwrite starts over


def test_embed_dir__another_model_or_a_second_writer(
    runner, archive, onnx_model, trained, tmp_path
):
    import fcntl

    from catchment_mae.export.onnx import export_encoder

    out = tmp_path / "m.parquet"
    assert _run(runner, archive, "--model", onnx_model, "--out", out).exit_code == 0
    other = tmp_path / "other.onnx"
    export_encoder(trained.weights_path, other, pool="mean", validate=False)
    r = _run(runner, archive, "--model", other, "--out", out)
    assert r.exit_code == 1 and "was written with another model" in r.stderr
    with open(tmp_path / ".m.parquet.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = _run(runner, archive, "--model", onnx_model, "--out", out)
        # The refused run leaves the holder's lock file where it is.
        assert (tmp_path / ".m.parquet.lock").exists()
    assert r.exit_code == 1 and "another cmae embed-dir is writing it" in r.stderr


def _start(archive, model, out, *extra):
    proc = start_cmae("embed-dir", archive, "--model", model, "--out", out,
                      "--batch-size", "1", "--rows-per-part", "1", "--num-workers", "0",
                      "--json", *extra)  # fmt: skip
    parts = out.with_name(out.name + ".parts")
    wait_for(proc, lambda: len(list(parts.glob("part-*.parquet"))) >= 5, 60,
             "five parts")  # fmt: skip
    return proc


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM", "SIGTERM, --overwrite"])
def test_embed_dir__interrupted_run_resumes_with_one_row_per_raster(
    big_archive, onnx_model, tmp_path, how
):
    import signal

    out = tmp_path / "i.parquet"
    extra = ["--overwrite"] if "overwrite" in how else []
    proc = _start(big_archive, onnx_model, out, *extra)
    proc.send_signal(signal.SIGKILL if how == "kill -9" else signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    if how.startswith("SIGTERM"):
        assert proc.returncode == 130, stderr
        hint = "run the same command without --overwrite to continue"
        if not extra:
            hint = "run the same command to continue"
        assert stderr.splitlines()[-1].endswith(hint), stderr
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # nothing half-written; the parts hold the rows
    saved = sum(
        pq.read_table(p).num_rows
        for p in out.with_name("i.parquet.parts").glob("*.parquet")
    )
    assert 5 <= saved < 300
    again = subprocess.run(
        [sys.executable, "-m", "catchment_mae.cli.main", "embed-dir", str(big_archive),
         "--model", str(onnx_model), "--out", str(out), "--json"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["already_done"] == saved and summary["embedded"] == 300 - saved
    paths = pq.read_table(out).column("path").to_pylist()
    assert paths == [f"r{i:03d}.tif" for i in range(300)]  # exactly one row each
    assert not out.with_name("i.parquet.parts").exists()


def test_embed_dir__runs_without_torch(archive, onnx_model, tmp_path):
    out = tmp_path / "nt.parquet"
    args = ["embed-dir", archive, "--model", onnx_model, "--out", out, "--json"]
    r = subprocess.run(
        [sys.executable, "-c", NO_TORCH, *map(str, args)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["embedded"] == 13


def test_embed__original_json_per_file(runner, archive, onnx_model):
    expected_keys = set(json.loads((DATA / "seed_embed_response.json").read_text()))
    good = sorted(archive.glob("a/*.tif"))[0]
    r = runner.invoke(
        cli,
        ["embed", str(good), str(archive / "empty.tif"), "--model", str(onnx_model)],
    )
    assert r.exit_code == 0, r.output
    first, second = (json.loads(line) for line in r.stdout.splitlines())
    assert set(first) == expected_keys and first["status"] == "success"
    assert first["shape"] == [40] and len(first["embedding"]) == 40
    assert second == {
        "status": "error",
        "message": f"{archive / 'empty.tif'}: empty file (0 bytes)",
    }
    r = runner.invoke(
        cli, ["embed", str(archive / "empty.tif"), "--model", str(onnx_model)]
    )
    assert r.exit_code == 1 and "no file could be embedded" in r.stderr


def test_embed_dir__a_name_that_is_not_utf8_is_embedded_and_resumed(
    runner, dem_dir, onnx_model, tmp_path
):
    """Arrow holds UTF-8 only: such a name (Python's surrogates) is written with
    its bytes escaped, and the next run knows it is done. It crashed the run."""
    import os

    d = tmp_path / "names"
    d.mkdir()
    first, second = sorted(dem_dir.glob("*.tif"))[:2]
    shutil.copy(first, d / "good.tif")
    shutil.copy(second, os.fsdecode(bytes(d) + b"/bad\xff.tif"))
    out = tmp_path / "names.parquet"
    r = _run(runner, d, "--model", onnx_model, "--out", out, "--json",
             "--shard", "1/1")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["embedded"] == 2
    table = pq.read_table(out)
    assert table.column("path").to_pylist() == ["bad\\xff.tif", "good.tif"]
    assert table.column("error").null_count == 2
    again = _run(runner, d, "--model", onnx_model, "--out", out, "--json",
                 "--shard", "1/1")  # fmt: skip
    assert json.loads(again.stdout)["nothing_new"] is True


def test_embed_dir__a_table_of_another_listing_is_not_continued(
    runner, archive, onnx_model, tmp_path
):
    """A run over another folder, shard or depth would drop the rows it does
    not list: it is refused (it silently cut a table to one shard's rows)."""
    out = tmp_path / "all.parquet"
    assert _run(runner, archive, "--model", onnx_model, "--out", out).exit_code == 0
    rows = pq.read_table(out).num_rows
    root = archive.resolve()
    for extra, lists in (
        (["--shard", "2/3"], f"{root}, shard 2/3"),
        (["--no-recursive"], f"{root} (top level only)"),
    ):
        r = _run(runner, archive, "--model", onnx_model, "--out", out, *extra)
        assert r.exit_code == 1, r.output
        assert f"holds the rasters of {root}, this run lists {lists}" in r.stderr
    other = tmp_path / "other"
    shutil.copytree(archive / "a", other)
    r = _run(runner, other, "--model", onnx_model, "--out", out)
    assert r.exit_code == 1 and "use --overwrite to start over" in r.stderr
    assert pq.read_table(out).num_rows == rows  # untouched
    r = _run(runner, tmp_path / "typo", "--model", onnx_model, "--out", out)
    assert r.stderr.strip().endswith("typo: input directory does not exist")
    # The same listing, spelled another way (a link to it), continues.
    (tmp_path / "link").symlink_to(archive)
    r = _run(runner, tmp_path / "link", "--model", onnx_model, "--out", out,
             "--json")  # fmt: skip
    assert r.exit_code == 0 and json.loads(r.stdout)["nothing_new"] is True
    r = _run(runner, other, "--model", onnx_model, "--out", out, "--overwrite")
    assert r.exit_code == 0
    assert pq.read_table(out).num_rows == len(list(other.rglob("*.tif")))


def test_embed_dir__a_table_from_before_listings_were_kept_is_checked_by_its_rows(
    runner, archive, onnx_model, tmp_path
):
    """A table written before the listing was recorded: its rows tell whether it
    lists other shards, sub-folders or another folder (it was cut silently)."""
    out = tmp_path / "old.parquet"
    assert _run(runner, archive, "--model", onnx_model, "--out", out).exit_code == 0
    table = pq.read_table(out)
    meta = {k: v for k, v in table.schema.metadata.items() if k != b"listing"}
    pq.write_table(table.replace_schema_metadata(meta), out)
    rows = table.num_rows
    for extra, why in (
        (["--shard", "2/3"], "holds rasters of other shards"),
        (["--no-recursive"], "holds rasters of sub-folders"),
    ):
        r = _run(runner, archive, "--model", onnx_model, "--out", out, *extra)
        assert r.exit_code == 1 and why in r.stderr, r.output
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(next(archive.rglob("*.tif")), other / "x.tif")
    r = _run(runner, other, "--model", onnx_model, "--out", out)
    assert r.exit_code == 1 and f"holds none of the rasters under {other}" in r.stderr
    assert pq.read_table(out).num_rows == rows  # untouched
    # The same folder, a file gone since: continued, and the listing recorded.
    next(archive.rglob("*.tif")).unlink()
    r = _run(runner, archive, "--model", onnx_model, "--out", out, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["rows"] == rows - 1
    assert b"listing" in pq.read_schema(out).metadata


def test_embed_dir__warnings_never_share_the_progress_bar_s_line(
    archive, onnx_model, tmp_path
):
    """On a terminal, tqdm redraws its bar with a carriage return; every
    warning starts on a cleared line of its own (reader processes' too)."""
    import fcntl
    import os
    import pty
    import re
    import struct
    import termios

    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = start_cmae(
        "embed-dir", archive, "--model", onnx_model, "--out", tmp_path / "t.parquet",
        "--num-workers", "2", "--batch-size", "2",
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=child, text=False,
    )  # fmt: skip
    os.close(child)
    raw = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        raw += chunk
    proc.wait(timeout=120)
    os.close(main)
    text = raw.decode(errors="replace")
    assert "embedding:" in text  # a bar was drawn
    warnings = text.count("cmae: warning:")
    assert warnings >= 4, text[-2000:]  # the archive's broken files
    # What the terminal shows of each line: the text after its last \r, with
    # the clear-line sequence taken out; a warning is always at its start.
    shown = [re.sub(r"\x1b\[2K", "", line.rsplit("\r", 1)[-1]) for line in
             text.replace("\r\n", "\n").split("\n")]  # fmt: skip
    assert sum(line.startswith("cmae: warning:") for line in shown) == warnings


def test_embed_dir__the_progress_bar_s_total_is_what_this_run_reads(
    archive, onnx_model, tmp_path
):
    """A walk beside the run counts the rasters it will read (not those an
    earlier run embedded), so the bar can say how long is left."""
    import threading

    from catchment_mae.batch.runner import embed_dir

    got, seen = [], threading.Event()

    def on_total(n: int) -> None:
        got.append(n)
        seen.set()

    out = tmp_path / "t.parquet"
    first = embed_dir(archive, onnx_model, out, num_workers=0, on_total=on_total)
    assert seen.wait(30) and got == [first.embedded + first.failed]
    got.clear()
    seen.clear()
    # Again: the embedded rasters are kept; the failed ones are read again.
    again = embed_dir(archive, onnx_model, out, num_workers=0, on_total=on_total)
    assert seen.wait(30) and got == [first.failed] == [again.failed]
    assert again.already_done == first.embedded
