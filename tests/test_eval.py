"""``cmae eval`` and its benchmark data: metrics on inputs whose answer is known."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from catchment_mae import evaluate as ev
from catchment_mae.cli.main import cli
from catchment_mae.errors import CmaeError
from tests.conftest import rewrite_embeddings, write_table

pytest.importorskip("sklearn", reason="cmae eval needs the eval extra (scikit-learn)")


def write_labels(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _separable(n_per_class=30, classes=3, dim=16, seed=0):
    """Each class a tight cluster around its own direction; a numeric label that
    is a linear function of the embedding; groups of two rows each."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 5
    y = np.repeat(np.arange(classes), n_per_class)
    x = centres[y] + rng.normal(scale=0.1, size=(len(y), dim))
    w = rng.normal(size=dim)
    return x.astype(np.float32), y, x @ w


def _joined(x, y, numeric=None, groups=None):
    labels = {"cls": np.array([f"c{v}" for v in y], dtype=object)}
    kinds = {"cls": "categorical"}
    if numeric is not None:
        labels["num"], kinds["num"] = numeric, "numeric"
    counts = {"used": len(y)}
    return ev.Joined(x, labels, kinds, groups, counts=counts)


def test_eval__separable_embeddings_score_one():
    x, y, num = _separable()
    r = ev.evaluate(_joined(x, y, num), k=5)
    cls = r["labels"]["cls"]
    assert cls["knn_accuracy"] == 1.0 and cls["linear_accuracy"] == 1.0
    assert cls["chance"] == pytest.approx(1 / 3, abs=1e-3)
    assert np.trace(np.array(cls["confusion"])) == len(y)
    assert r["labels"]["num"]["r2"] > 0.99


def test_eval__shuffled_labels_score_about_chance():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    y = rng.integers(0, 3, 300)
    r = ev.evaluate(_joined(x, y, rng.normal(size=300)), k=20)
    cls = r["labels"]["cls"]
    assert abs(cls["knn_accuracy"] - cls["chance"]) < 0.12
    assert abs(cls["linear_accuracy"] - cls["chance"]) < 0.12
    assert r["labels"]["num"]["r2"] < 0.05  # noise explains nothing out of fold


def test_eval__group_folds_never_split_a_group():
    x, y, _ = _separable(n_per_class=20)
    groups = np.array([f"g{i // 4}" for i in range(len(y))])
    for train, test in ev._splits(y, groups, 5, 0, stratify=True):
        assert not set(groups[train]) & set(groups[test])
    # A group whose members are copies: retrieval finds them, chance is low.
    twins = np.repeat(np.random.default_rng(2).normal(size=(30, 8)), 2, axis=0)
    g = np.repeat([f"g{i}" for i in range(30)], 2)
    r = ev.retrieval(twins + 1e-3, g)
    assert r["top1_same_group"] == 1.0 and r["rows"] == 60
    assert r["chance"] == pytest.approx(1 / 59, abs=1e-4)
    shuffled = ev.retrieval(twins, np.random.default_rng(3).permutation(g))
    assert shuffled["top1_same_group"] < 0.2


def test_eval__rows_left_out_are_counted_and_named(tmp_path):
    x, y, num = _separable(n_per_class=10, classes=2)
    paths = [f"d/{i}.tif" for i in range(len(y))]
    errors = [None] * len(y)
    errors[0] = "d/0.tif: cannot decode TIFF"
    table = write_table(tmp_path / "t.parquet", paths, x, errors)
    rows = [
        {"path": p, "kind": f"k{v}", "value": float(n), "group": f"g{i // 2}"}
        for i, (p, v, n) in enumerate(zip(paths, y, num, strict=True))
        if i != 1  # row 1: in the table, not labelled
    ]
    rows.append({"path": "d/elsewhere.tif", "kind": "k0", "value": 1.0, "group": "z"})
    labels = write_labels(tmp_path / "labels.csv", rows)
    joined = ev.join(ev.read_embeddings(table), ev.read_labels(labels))
    assert joined.kinds == {"kind": "categorical", "value": "numeric"}
    assert joined.counts == {
        "table_rows": 20, "failed": 1, "unlabelled": 1, "used": 18,
        "labels": 20, "labels_without_row": 2,
    }  # fmt: skip
    assert joined.labels_without_row == ["d/0.tif", "d/elsewhere.tif"]
    r = ev.evaluate(joined, k=3, folds=3)
    assert r["labels"]["kind"]["rows"] == 18 and r["settings"]["split"] == "group"
    rows[2]["group"] = rows[4]["group"] = ""  # no group: each a group of its own
    labels = write_labels(tmp_path / "labels.csv", rows)
    joined = ev.join(ev.read_embeddings(table), ev.read_labels(labels))
    assert len(set(joined.groups.tolist())) == 9 + 2  # g1-g9, two of their own


def test_eval__bad_labels_are_clear_errors(tmp_path):
    x, _, _ = _separable(n_per_class=2, classes=2)
    table = write_table(tmp_path / "t.parquet", [f"{i}.tif" for i in range(4)], x)
    cases = [
        ([{"file": "0.tif", "a": 1}], "labels need a 'path' column"),
        (
            [{"path": "0.tif", "a": 1}, {"path": "0.tif", "a": 2}],
            "labelled twice: 0.tif",
        ),
        ([{"path": "0.tif"}], "no label column beside 'path'"),
    ]
    for rows, message in cases:
        with pytest.raises(CmaeError, match=message):
            ev.read_labels(write_labels(tmp_path / "l.csv", rows))
    few = write_labels(tmp_path / "l.csv", [{"path": "0.tif", "a": "x"}])
    joined = ev.join(ev.read_embeddings(table), ev.read_labels(few))
    with pytest.raises(CmaeError, match="only 1 labelled row"):
        ev.evaluate(joined)
    with pytest.raises(CmaeError, match="not an embeddings table"):
        ev.read_embeddings(few)


def test_cli_eval__table_json_and_report(runner, tmp_path):
    x, y, num = _separable(n_per_class=12, classes=3)
    paths = [f"{i}.tif" for i in range(len(y))]
    table = write_table(tmp_path / "t.parquet", paths, x)
    labels = write_labels(
        tmp_path / "labels.csv",
        [
            {"path": p, "family": f"f{v}", "size": int(v), "r": n}
            for p, v, n in zip(paths, y, num, strict=True)
        ],  # fmt: skip
    )
    r = runner.invoke(
        cli,
        [
            "eval",
            str(table),
            "--labels",
            str(labels),
            "--k",
            "5",
            "--categorical",
            "size",
            "--json",
        ],  # fmt: skip
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out["labels"]) == {"family", "size", "r"}
    assert out["labels"]["size"]["kind"] == "categorical"  # forced
    fam = out["labels"]["family"]
    assert set(fam) >= {"kind", "knn_accuracy", "linear_accuracy", "chance"}
    assert out["labels"]["r"]["kind"] == "numeric" and out["labels"]["r"]["r2"] > 0.99
    assert out["rows"]["used"] == 36 and out["settings"]["split"] == "stratified"
    png = tmp_path / "t.eval.png"
    assert out["report"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = runner.invoke(cli, ["eval", str(table), "--labels", str(labels),
                               "--no-report"])  # fmt: skip
    assert (
        text.exit_code == 0 and "family" in text.stdout and "report" not in text.stdout
    )
    bad = runner.invoke(cli, ["eval", str(table), "--labels", str(labels),
                              "--categorical", "nope"])  # fmt: skip
    assert bad.exit_code == 1
    assert bad.stderr.strip() == "cmae: error: --categorical: no label column nope"


def test_cli_eval__a_table_written_again_by_another_tool(runner, tmp_path):
    """Embeddings as lists without a fixed size (pandas, DuckDB) score as the
    table embed-dir wrote; lists of two lengths are refused in one line."""
    x, y, _ = _separable(n_per_class=8, classes=3)
    paths = [f"{i}.tif" for i in range(len(y))]
    table = write_table(tmp_path / "t.parquet", paths, x)
    rows = [{"path": p, "family": f"f{v}"} for p, v in zip(paths, y, strict=True)]
    labels = write_labels(tmp_path / "labels.csv", rows)
    again = rewrite_embeddings(table, tmp_path / "again.parquet")
    args = ["--labels", str(labels), "--no-report", "--json"]
    want = runner.invoke(cli, ["eval", str(table), *args])
    got = runner.invoke(cli, ["eval", str(again), *args])
    assert got.exit_code == 0, got.output
    assert json.loads(got.stdout)["labels"] == json.loads(want.stdout)["labels"]
    cut = [x.shape[1]] * (len(y) - 1) + [2]
    mixed = rewrite_embeddings(table, tmp_path / "mixed.parquet", lengths=cut)
    r = runner.invoke(cli, ["eval", str(mixed), *args])
    assert r.exit_code == 1
    assert r.stderr.strip() == (
        f"cmae: error: {mixed}: its embeddings differ in length "
        f"(2, {x.shape[1]}): not one model's"
    )


# ------------------------------------------------------------------ the data
def test_synth_labelled__families_resolutions_and_groups(runner, tmp_path):
    from catchment_mae.preprocess import load_sample
    from catchment_mae.raster import ground_extent_m, read_raster
    from catchment_mae.spec import PreprocessSpec

    r = runner.invoke(cli, ["synth", str(tmp_path / "b"), "--labelled", "--count",
                            "8", "--max-size", "256", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    with open(tmp_path / "b" / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "family", "resolution_m", "log_extent", "group"]
    assert {row["family"] for row in rows} == {
        "alpine",
        "hills",
        "plateau",
        "floodplain",
    }
    assert len(json.loads(r.stdout)["files"]) == len(rows)
    spec = PreprocessSpec(image_size=32, in_chans=1, norm="per-raster", scale="ground")
    by_group: dict[str, list] = {}
    for row in rows:
        raster = read_raster(tmp_path / "b" / row["path"])
        assert raster.info.geo.pixel_size == (float(row["resolution_m"]),) * 2
        assert 0.05 < 1 - raster.valid.mean() < 0.8  # a catchment outline: nodata
        h, w = ground_extent_m(raster.info)
        assert 0.5 * math.log(h * w) == pytest.approx(
            float(row["log_extent"]), abs=1e-4
        )
        by_group.setdefault(row["group"], []).append((row, raster))
    assert any(len(v) > 1 for v in by_group.values())
    for members in by_group.values():  # one terrain: one family, one extent
        assert len({m[0]["family"] for m in members}) == 1
        extents = [float(m[0]["log_extent"]) for m in members]
        assert max(extents) - min(extents) < 0.05
        scales = [
            load_sample(tmp_path / "b" / m[0]["path"], spec).scale for m in members
        ]
        assert np.allclose(scales, scales[0], atol=0.05)


def test_synth_copies__scaled_georeferencing(runner, tmp_path):
    from catchment_mae.raster import ground_extent_m, read_raster
    from tests.conftest import DATA

    out = tmp_path / "c"
    r = runner.invoke(cli, ["synth", str(out), "--copies-of", str(DATA), "--json"])
    assert r.exit_code == 0, r.output
    skipped = json.loads(r.stdout)["skipped"]
    assert any("rasterio_corrupt.tif" in s for s in skipped)  # named, run goes on
    with open(out / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    dem = [row for row in rows if row["group"] == "rioxarray_small_dem_3m_merged.tif"]
    assert [int(row["factor"]) for row in dem] == [1, 2, 4]
    rasters = [read_raster(out / row["path"]) for row in dem]
    src = read_raster(DATA / "rioxarray_small_dem_3m_merged.tif")
    for k, copy in zip((1, 2, 4), rasters, strict=True):
        assert copy.info.height == src.info.height // k
        assert copy.info.geo.crs == src.info.geo.crs
        c, a, _, f, _, e = copy.info.geo.transform
        c0, a0, _, f0, _, e0 = src.info.geo.transform
        assert (c, f) == pytest.approx((c0, f0)) and (a, e) == pytest.approx(
            (a0 * k, e0 * k)
        )
        extent, extent0 = ground_extent_m(copy.info), ground_extent_m(src.info)
        assert extent == pytest.approx(extent0, rel=0.02)  # edge rows dropped at most
    with_data = rasters[2].data[0][rasters[2].valid]
    assert with_data.size and abs(with_data.mean() - src.data[0][src.valid].mean()) < 5


# ------------------------------------------------------- the whole loop, tiny
def test_eval__train_without_scale_export_embed_and_evaluate(runner, tmp_path):
    """--scale none trains, exports with its definition, and the table evaluates."""
    import onnx

    bench = tmp_path / "bench"
    assert runner.invoke(cli, ["synth", str(bench), "--labelled", "--count", "8",
                               "--max-size", "256"]).exit_code == 0  # fmt: skip
    cfg = tmp_path / "dec.json"
    cfg.write_text(json.dumps({"decoder_dim": 32, "decoder_depth": 1,
                               "decoder_num_heads": 2}))  # fmt: skip
    pth = tmp_path / "m.pth"
    r = runner.invoke(cli, [
        "train", str(bench), "--out", str(pth), "--model", "vit_tiny_patch16_224",
        "--image-size", "32", "--patch-size", "8", "--embed-dim", "32", "--depth", "1",
        "--num-heads", "2", "--batch-size", "4", "--num-workers", "0", "--epochs", "1",
        "--device", "cpu", "--scale", "none", "--norm", "per-raster", "--no-cache",
        "--config", str(cfg),
    ])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m.json").read_text())["scale"] == "none"
    onnx_path = tmp_path / "m.onnx"
    assert (
        runner.invoke(cli, ["export", str(pth), "--out", str(onnx_path)]).exit_code == 0
    )
    meta = {p.key: p.value for p in onnx.load(onnx_path).metadata_props}
    assert meta["scale"] == "none" and meta["scale_definition"].startswith("0, 0")
    table = tmp_path / "e.parquet"
    r = runner.invoke(cli, ["embed-dir", str(bench), "--model", str(onnx_path),
                            "--out", str(table), "--num-workers", "1"])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["eval", str(table), "--labels", str(bench / "labels.csv"),
                            "--k", "3", "--json", "--no-report"])  # fmt: skip
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["rows"]["used"] == out["rows"]["labels"] >= 8
    assert out["labels"]["family"]["kind"] == "categorical"
    assert out["labels"]["log_extent"]["kind"] == "numeric"
    assert out["retrieval"]["rows"] > 0
    assert 0 <= out["retrieval"]["top1_same_group"] <= 1


def test_within_r2__ranking_inside_classes_not_telling_them_apart():
    rng = np.random.default_rng(0)
    classes = np.repeat(np.array(["a", "b", "c"], dtype=object), 50)
    offset = np.repeat([0.0, 10.0, 20.0], 50)
    inner = rng.normal(size=150)
    y = offset + inner
    assert ev.within_r2(y, y, classes) == 1.0
    # Knowing only the class: a high R² overall, nothing within.
    assert ev.within_r2(y, offset, classes) == pytest.approx(0.0, abs=1e-6)
    noisy = ev.within_r2(y, offset + inner + rng.normal(scale=0.5, size=150), classes)
    assert 0.6 < noisy < 0.9
    assert ev.within_r2(offset, offset, classes) is None  # no spread in any class


def test_copy_retrieval__copies_find_their_original():
    rng = np.random.default_rng(1)
    originals = rng.normal(size=(20, 8))
    vectors = np.concatenate(
        [originals, originals[:10] + 0.01 * rng.normal(size=(10, 8))]
    )
    paths = [f"o{i}" for i in range(20)] + [f"c{i}" for i in range(10)]
    copy_of = np.array([""] * 20 + [f"o{i}" for i in range(10)], dtype=object)
    r = ev.copy_retrieval(vectors, paths, copy_of)
    assert r == {"top1_own_original": 1.0, "rows": 10, "chance": 0.05}
    wrong = np.array([""] * 20 + [f"o{(i + 1) % 20}" for i in range(10)], dtype=object)
    assert ev.copy_retrieval(vectors, paths, wrong)["top1_own_original"] == 0.0
