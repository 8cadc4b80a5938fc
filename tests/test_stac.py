"""``cmae embed-dir --stac``: a STAC Item beside the table, with the Embedding
extension's fields and the MLM description of the model, read from the table."""

from __future__ import annotations

import json
import shutil

import onnxruntime as ort
import pyarrow.parquet as pq
import pytest

from catchment_mae.cli.main import cli


@pytest.mark.parametrize("chips", [False, True])
def test_embed_dir_stac__the_item_describes_the_table_and_model(
    runner, dem_dir, onnx_model, tmp_path, chips
):
    data = tmp_path / "dems"
    shutil.copytree(dem_dir, data)
    out = tmp_path / "out" / "e.parquet"
    args = ["embed-dir", str(data), "--model", str(onnx_model), "--out", str(out),
            "--stac", "--json", *(["--tile", "32"] if chips else [])]  # fmt: skip
    r = runner.invoke(cli, args)
    assert r.exit_code == 0, r.output
    path = out.with_name("e.stac.json")
    assert json.loads(r.stdout)["stac"] == str(path)
    item = json.loads(path.read_text())
    props = item["properties"]
    assert item["type"] == "Feature" and item["id"] == "e"
    assert any("/mlm/" in uri for uri in item["stac_extensions"])
    width = pq.ParquetFile(out).schema_arrow.field("embedding").type.list_size
    assert props["emb:dimensions"] == width and props["emb:type"] == "chip"
    assert props["emb:quantization"]["method"] == "none"
    assert (
        props["emb:runtime_parameters"]["rows"] == pq.ParquetFile(out).metadata.num_rows
    )
    geo = json.loads(pq.ParquetFile(out).schema_arrow.metadata[b"geo"])
    assert item["bbox"] == pytest.approx(geo["columns"]["geometry"]["bbox"])
    session = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert [i["name"] for i in props["mlm:input"]] == names
    for spec, actual in zip(props["mlm:input"], session.get_inputs(), strict=True):
        assert len(spec["input"]["shape"]) == len(actual.shape)
    assert props["mlm:output"][0]["result"]["shape"] == [-1, width]
    # The assets and links lead to the table, the model and the rasters.
    here = path.parent
    assert (here / item["assets"]["embeddings"]["href"]).resolve() == out.resolve()
    assert (here / item["assets"]["model"]["href"]).resolve() == onnx_model.resolve()
    source = next(x for x in item["links"] if x["rel"] == "emb:source-data")
    assert (here / source["href"]).resolve() == data.resolve()
    if chips:
        layout = props["emb:chip_layout"]
        assert layout == {"layout_type": "regular_grid", "chip_size": [32, 32],
                          "stride": [32, 32]}  # fmt: skip
    else:
        assert "emb:chip_layout" not in props
    # The source hash changes with the rasters the table holds.
    first = props["emb:runtime_parameters"]["source_sha256"]
    (data / sorted(p.name for p in data.glob("*.tif"))[0]).unlink()
    assert runner.invoke(cli, args).exit_code == 0
    again = json.loads(path.read_text())["properties"]["emb:runtime_parameters"]
    assert again["source_sha256"] != first
