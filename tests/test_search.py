"""``cmae search``: the nearest rows of an embeddings table, exactly as numpy
ranks them, filtered, from a row or a TIFF embedded with the table's model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catchment_mae.cli.main import cli
from tests.conftest import rewrite_embeddings, write_table


def _vectors(n: int = 50, dim: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def _cosine_order(vectors: np.ndarray, q: np.ndarray) -> np.ndarray:
    sims = vectors @ q / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(q))
    return np.argsort(-sims, kind="stable"), sims


def _search(runner, *args):
    return runner.invoke(cli, ["search", *map(str, args)])


def test_search__like_row_ranks_as_numpy_does(runner, tmp_path, monkeypatch):
    import catchment_mae.search as search_module

    monkeypatch.setattr(search_module, "BATCH_ROWS", 7)  # many batches, merged
    vectors = _vectors()
    paths = [f"r{i:02d}.tif" for i in range(len(vectors))]
    table = write_table(tmp_path / "t.parquet", paths, vectors)
    r = _search(runner, table, "--like-row", 3, "-k", 5, "--json")
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout)
    order, sims = _cosine_order(vectors, vectors[3])
    want = [int(i) for i in order if i != 3][:5]
    assert [h["row"] for h in hits] == want
    assert [h["path"] for h in hits] == [paths[i] for i in want]
    np.testing.assert_allclose([h["similarity"] for h in hits], sims[want], atol=1e-5)
    assert "embedding" not in hits[0] and "geometry" not in hits[0]
    by_id = _search(runner, table, "--like", "r03.tif", "-k", 5, "--json")
    assert json.loads(by_id.stdout) == hits
    human = _search(runner, table, "--like", "r03.tif", "-k", 2)
    lines = human.stdout.splitlines()
    assert len(lines) == 2 and lines[0].split()[-1] == paths[want[0]]


def test_search__failed_rows_and_filters(runner, tmp_path):
    vectors = _vectors(20)
    paths = [f"r{i:02d}.tif" for i in range(20)]
    errors = [None] * 20
    errors[5] = "cannot decode TIFF"
    table = write_table(tmp_path / "t.parquet", paths, vectors, errors)
    t = pq.read_table(table)
    boxes = [
        {"xmin": float(i), "ymin": 0.0, "xmax": i + 0.5, "ymax": 1.0} for i in range(20)
    ]
    boxes[11] = None  # no footprint: never inside a box
    t = t.set_column(t.schema.get_field_index("bbox"), "bbox",
                     pa.array(boxes, t.schema.field("bbox").type))  # fmt: skip
    pq.write_table(t, table)
    everything = json.loads(_search(runner, table, "--like-row", 0, "-k", 50,
                                    "--json").stdout)  # fmt: skip
    assert 5 not in [h["row"] for h in everything] and len(everything) == 18
    boxed = _search(runner, table, "--like-row", 0, "-k", 50, "--bbox",
                    "9.9,0,12.2,0.5", "--json")  # fmt: skip
    assert sorted(h["row"] for h in json.loads(boxed.stdout)) == [10, 12]
    pytest.importorskip("duckdb", reason="--where needs the search extra (DuckDB)")
    where = _search(runner, table, "--like-row", 0, "-k", 50, "--where",
                    "path >= 'r15.tif'", "--json")  # fmt: skip
    assert sorted(h["row"] for h in json.loads(where.stdout)) == [15, 16, 17, 18, 19]
    bad = _search(runner, table, "--like-row", 0, "--where", "no_such_column > 1")
    assert bad.exit_code == 1 and "--where" in bad.stderr
    assert "Traceback" not in bad.output
    failed = _search(runner, table, "--like-row", 5)
    assert failed.exit_code == 1 and "row 5 has no embedding" in failed.stderr


def test_search__like_file_with_the_tables_own_model(
    runner, dem_dir, onnx_model, trained, tmp_path
):
    from catchment_mae.export.onnx import export_encoder

    data = tmp_path / "dems"
    shutil.copytree(dem_dir, data)
    model = tmp_path / "m.onnx"
    shutil.copy(onnx_model, model)
    table = tmp_path / "t.parquet"
    r = runner.invoke(cli, ["embed-dir", str(data), "--model", str(model),
                            "--out", str(table)])  # fmt: skip
    assert r.exit_code == 0, r.output
    one = sorted(data.glob("*.tif"))[4]
    from_file = _search(runner, table, "--like-file", one, "-k", 3, "--json")
    assert from_file.exit_code == 0, from_file.output
    hits = json.loads(from_file.stdout)
    # The file is in the table: its own row first, as alike as a vector can be.
    assert hits[0]["path"] == one.name and hits[0]["similarity"] == pytest.approx(1.0)
    other = tmp_path / "other.onnx"
    export_encoder(trained.weights_path, other, pool="mean", validate=False)
    refused = _search(runner, table, "--like-file", one, "--model", other)
    assert refused.exit_code == 1 and "is not the model" in refused.stderr


def test_search__usage(runner, tmp_path):
    table = write_table(tmp_path / "t.parquet", ["a.tif", "b.tif"], _vectors(2))
    assert _search(runner, table).exit_code == 2  # no query
    assert _search(runner, table, "--like-row", 0, "--like", "a.tif").exit_code == 2
    assert _search(runner, table, "--like-row", 0, "--bbox", "1,2,3").exit_code == 2
    missing = _search(runner, tmp_path / "none.parquet", "--like-row", 0)
    assert missing.exit_code == 1 and "no such file" in missing.stderr
    nobody = _search(runner, table, "--like", "c.tif")
    assert nobody.exit_code == 1 and "no row has path 'c.tif'" in nobody.stderr


def test_search__an_index_beside_a_large_table(runner, tmp_path, monkeypatch):
    """Above INDEX_ROWS the search goes through an index built once beside the
    table, built again when the table changes, and answers as the exact search
    does where the index finds every neighbour (a small table)."""
    pytest.importorskip("usearch", reason="the index needs the search extra")
    import os

    import catchment_mae.search as search_module

    monkeypatch.setattr(search_module, "INDEX_ROWS", 10)
    vectors = _vectors(200, 16, seed=3)
    paths = [f"r{i:03d}.tif" for i in range(200)]
    table = write_table(tmp_path / "t.parquet", paths, vectors)
    exact = json.loads(_search(runner, table, "--like-row", 5, "-k", 8, "--exact",
                               "--json").stdout)  # fmt: skip
    r = _search(runner, table, "--like-row", 5, "-k", 8, "--json")
    assert r.exit_code == 0, r.output
    index = tmp_path / "t.parquet.usearch"
    assert index.is_file() and "building an index of 200 rows" in r.stderr
    # The index holds float16 vectors: rows whose similarities differ by less
    # than that precision may trade places; none farther than that is taken.
    _, sims = _cosine_order(vectors, vectors[5])
    got = json.loads(r.stdout)
    assert len(got) == 8 and 5 not in [h["row"] for h in got]
    assert min(sims[h["row"]] for h in got) >= exact[-1]["similarity"] - 2e-3
    np.testing.assert_allclose([h["similarity"] for h in got],
                               [sims[h["row"]] for h in got], atol=2e-3)  # fmt: skip
    built = index.stat().st_mtime_ns
    again = _search(runner, table, "--like-row", 5, "-k", 8, "--json")
    assert "building" not in again.stderr and index.stat().st_mtime_ns == built
    # Filters after the index; too few pass: the exact search answers.
    boxed = _search(runner, table, "--like-row", 5, "-k", 3, "--where",
                    "path = 'r007.tif'", "--json") if _duckdb() else None  # fmt: skip
    if boxed is not None:
        assert [h["row"] for h in json.loads(boxed.stdout)] == [7]
    # The table changes: the index is built again.
    write_table(table, paths, _vectors(200, 16, seed=4))
    os.utime(table, ns=(built + 10**9, built + 10**9))
    changed = _search(runner, table, "--like-row", 5, "-k", 8, "--json")
    assert "building an index" in changed.stderr
    new = _vectors(200, 16, seed=4)
    order, sims = _cosine_order(new, new[5])
    eighth = sims[[int(i) for i in order if i != 5][7]]
    got = [h["row"] for h in json.loads(changed.stdout)]
    assert len(got) == 8 and min(sims[got]) >= eighth - 2e-3  # the new vectors'


def _duckdb() -> bool:
    try:
        import duckdb  # noqa: F401
    except ImportError:
        return False
    return True


def test_search__a_table_written_again_by_another_tool(runner, tmp_path):
    """Lists without a fixed size (pandas, DuckDB) rank as the table embed-dir
    wrote; lists of two lengths are refused in one line."""
    vectors = _vectors(30)
    paths = [f"r{i:02d}.tif" for i in range(30)]
    errors = [None] * 30
    errors[0] = "cannot decode TIFF"  # the first row holds no embedding
    table = write_table(tmp_path / "t.parquet", paths, vectors, errors)
    again = rewrite_embeddings(table, tmp_path / "again.parquet")
    want = _search(runner, table, "--like-row", 4, "-k", 5, "--json")
    got = _search(runner, again, "--like-row", 4, "-k", 5, "--json")
    assert got.exit_code == 0, got.output
    assert json.loads(got.stdout) == json.loads(want.stdout)
    cut = [8] * 29 + [6]  # the last row's embedding two values short
    mixed = rewrite_embeddings(table, tmp_path / "mixed.parquet", lengths=cut)
    r = _search(runner, mixed, "--like-row", 4)
    assert r.exit_code == 1
    assert r.stderr.strip() == (
        f"cmae: error: {mixed}: its embeddings differ in length (6, 8): not one model's"
    )
    text = tmp_path / "text.parquet"
    t = pq.read_table(table)
    words = pa.array(["a"] * 30)
    pq.write_table(t.set_column(t.schema.get_field_index("embedding"),
                                "embedding", words), text)  # fmt: skip
    r = _search(runner, text, "--like-row", 4)
    assert r.exit_code == 1
    assert "its embedding column holds string, not vectors" in r.stderr
