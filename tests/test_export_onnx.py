"""Export: graph, metadata, dynamic batch, parity, pooling, variants, bad inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import tifffile
import torch

from catchment_mae.errors import ExportError, ModelLoadError, OutputExistsError
from catchment_mae.export.onnx import MAX_ABS_TOL, MIN_COS_TOL, export_encoder
from catchment_mae.model import embedder, load_model
from catchment_mae.preprocess import load_sample
from catchment_mae.runtime import (
    ModelFileError,
    create_session,
    read_metadata,
    spec_from_metadata,
)


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory):
    """The tiny trained model exported with both variants (fp32 validated)."""
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    report = export_encoder(trained.weights_path, out, fp16=True, quantize="int8")
    return out, report


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# The tiny model of the ``trained`` fixture, on synthetic DEMs: one band and its
# slope channel, a scale vector of 2 extents + valid share + mean, std, log std
# + the log slope's mean and std.
CHANNELS, SCALE_DIM, WIDTH = 2, 8, 32


def _feed(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random model inputs of the tiny model's shapes."""
    rng = np.random.default_rng(seed)
    scale = np.concatenate(
        [
            np.log(rng.uniform(10, 4000, (batch, 2))),
            rng.normal(size=(batch, SCALE_DIM - 2)),
        ],
        1,
    )
    return {
        "image": rng.standard_normal((batch, CHANNELS, 32, 32)).astype(np.float32),
        "scale": scale.astype(np.float32),
        "valid": (rng.random((batch, 1, 32, 32)) > 0.2).astype(np.float32),
    }


def _torch(embedder, feed: dict[str, np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
        return embedder(*(torch.from_numpy(feed[k]) for k in feed)).numpy()


def test_export__graph_inputs_outputs_and_checker(exported):
    out, report = exported
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert not out.with_name(out.name + ".data").exists()  # one self-contained file
    ins = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    }
    outs = {
        o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
        for o in model.graph.output
    }
    assert list(ins) == ["image", "scale", "valid"]
    assert ins["image"][1:] == [CHANNELS, 32, 32] and ins["scale"][1:] == [SCALE_DIM]
    assert ins["valid"][1:] == [1, 32, 32]
    assert isinstance(ins["image"][0], str)  # dynamic batch axis
    assert list(outs) == ["embedding"]
    assert outs["embedding"][1:] == [WIDTH + SCALE_DIM]
    for i in model.graph.input:
        assert i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {
        "RandomUniform",
        "RandomNormal",
        "TopK",
    }  # no masking in the graph


def test_export__metadata_round_trip(exported, trained):
    out, report = exported
    sess = create_session(out, "cpu")
    meta = read_metadata(sess, out)
    cfg = trained.config
    assert meta["cmae_format_version"] == "3"
    assert meta["vit_model_name"] == cfg.vit_model_name
    assert int(meta["image_size"]) == 32 and int(meta["in_chans"]) == 1
    assert json.loads(meta["norm_mean"]) == list(cfg.preprocess.norm_mean)
    assert json.loads(meta["norm_std"]) == list(cfg.preprocess.norm_std)
    assert meta["pool"] == "cls" and int(meta["embedding_dim"]) == WIDTH + SCALE_DIM
    assert meta["scale"] == "ground" and float(meta["scale_eps"]) == 1e-6
    assert (
        int(meta["scale_dim"]) == SCALE_DIM
        and "log(std + eps)" in (meta["scale_definition"])
    )
    assert json.loads(meta["scale_mean"]) == cfg.scale_mean
    assert json.loads(meta["scale_std"]) == cfg.scale_std
    channels = json.loads(meta["channels"])
    assert len(channels) == CHANNELS and "slope" in channels[1]
    assert meta["embedding_layout"].startswith(f"{WIDTH} values")
    assert (
        meta["resize"] == cfg.preprocess.resize
        and "GDAL_NODATA" in meta["nodata_policy"]
    )
    from catchment_mae.io import sha256_file

    assert meta["weights_sha256"] == sha256_file(trained.weights_path)
    spec = spec_from_metadata(meta)
    assert spec.image_size == 32 and spec.norm_mean == cfg.preprocess.norm_mean
    assert spec.slope_channel and spec.scale_stats and spec.trim
    assert json.loads(meta["config"])["input_dir"] == cfg.input_dir


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_export__dynamic_batch_and_parity(exported, trained, batch):
    out, _ = exported
    model, cfg = load_model(trained.weights_path)
    feed = _feed(batch, seed=batch)
    got = create_session(out, "cpu").run(["embedding"], feed)[0]
    ref = _torch(embedder(model, cfg), feed)
    assert got.shape == (batch, WIDTH + SCALE_DIM)
    assert np.abs(got - ref).max() <= MAX_ABS_TOL
    assert _cos(got, ref).min() >= MIN_COS_TOL


def test_export__torch_path_and_onnx_path_give_the_same_embedding(
    exported, trained, dem_dir
):
    """One preprocessing path: load_sample feeds both models."""
    out, _ = exported
    model, cfg = load_model(trained.weights_path)
    sess = create_session(out, "cpu")
    spec = spec_from_metadata(read_metadata(sess))
    samples = [load_sample(p, spec) for p in sorted(dem_dir.glob("*.tif"))[:5]]
    feed = {
        "image": np.stack([s.image for s in samples]),
        "scale": np.stack([s.scale for s in samples]),
        "valid": np.stack([s.valid for s in samples]),
    }
    got = sess.run(["embedding"], feed)[0]
    ref = _torch(embedder(model, cfg), feed)
    assert (
        np.abs(got - ref).max() <= MAX_ABS_TOL and _cos(got, ref).min() >= MIN_COS_TOL
    )


def test_export__report_and_variants(exported):
    out, report = exported
    kinds = {(p.inputs, p.batch_size) for p in report.parity}
    assert kinds >= {("random", 1), ("random", 8), ("rasters", 1), ("rasters", 8)}
    assert all(
        p.max_abs <= MAX_ABS_TOL and p.min_cos >= MIN_COS_TOL for p in report.parity
    )
    assert report.ms_per_sample["onnxruntime"] > 0
    feed = _feed(3)
    ref = create_session(out).run(["embedding"], feed)[0]
    for name in ("fp16", "int8"):
        path = out.with_name(f"tiny.{name}.onnx")
        assert report.variants[name]["path"] == str(path)
        sess = create_session(path, "cpu")
        assert read_metadata(sess)["precision"] == name
        got = sess.run(["embedding"], feed)[0]
        assert got.shape == (3, WIDTH + SCALE_DIM) and got.dtype == np.float32
        assert 0.5 < _cos(got, ref).min() <= 1.0 + 1e-6
        assert 0.5 < report.variants[name]["min_cos_to_fp32"] <= 1.0 + 1e-6
    assert report.variants["fp16"]["min_cos_to_fp32"] > 0.999


def test_export__pools_weigh_patches_by_valid_fraction(trained, tmp_path):
    model, cfg = load_model(trained.weights_path)
    feed = _feed(2)
    feed["valid"][:] = 1.0
    half = feed["valid"].copy()
    half[:, :, :, 16:] = 0.0  # right half nodata: its patches weigh nothing
    out = tmp_path / "mean.onnx"
    export_encoder(trained.weights_path, out, pool="mean")
    sess = create_session(out)
    a = sess.run(None, feed)[0]
    b = sess.run(None, {**feed, "valid": half})[0]
    with torch.inference_mode():
        t = {k: torch.from_numpy(v) for k, v in feed.items()}
        full_tokens = model.encoder(t["image"], t["scale"], None, t["valid"])
        half_tokens = model.encoder(
            t["image"], t["scale"], None, torch.from_numpy(half)
        )
    # 4x4 patches of 8 px: the valid half is columns 0-1 of each patch row.
    left = half_tokens[:, 1:].reshape(2, 4, 4, 32)[:, :, :2].reshape(2, -1, 32)
    np.testing.assert_allclose(a[:, :WIDTH], full_tokens[:, 1:].mean(1), atol=1e-5)
    np.testing.assert_allclose(b[:, :WIDTH], left.mean(1), atol=1e-5)
    # The standardised scale vector follows the pooled tokens, whatever the pool.
    facts = (feed["scale"] - np.array(cfg.scale_mean)) / np.array(cfg.scale_std)
    np.testing.assert_allclose(a[:, WIDTH:], facts, atol=1e-5)
    cls = tmp_path / "cls.onnx"
    report = export_encoder(trained.weights_path, cls, pool="cls")
    assert report.pool == "cls" and report.inputs == ["image", "scale", "valid"]
    got = create_session(cls).run(None, feed)[0]
    np.testing.assert_allclose(got[:, :WIDTH], full_tokens[:, 0], atol=1e-5)


def test_export__bad_inputs(trained, tmp_path):
    # missing weights / missing json / mismatched json / not a checkpoint
    with pytest.raises(ModelLoadError, match="weights file does not exist"):
        export_encoder(tmp_path / "nope.pth", tmp_path / "x.onnx")
    lonely = tmp_path / "lonely.pth"
    shutil.copy(trained.weights_path, lonely)
    with pytest.raises(ModelLoadError, match=r"lonely\.json: missing"):
        export_encoder(lonely, tmp_path / "x.onnx")
    wrong = tmp_path / "wrong.pth"
    shutil.copy(trained.weights_path, wrong)
    cfg = json.loads(trained.config_path.read_text())
    cfg["embed_dim"] = 64
    (tmp_path / "wrong.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="weights do not fit wrong.json"):
        export_encoder(wrong, tmp_path / "x.onnx")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    shutil.copy(trained.config_path, tmp_path / "junk.json")
    with pytest.raises(ModelLoadError, match=r"junk\.pth: not a PyTorch checkpoint"):
        export_encoder(junk, tmp_path / "x.onnx")
    import torch

    torch.save({"something": "else"}, junk)  # a checkpoint, not cmae's
    with pytest.raises(ModelLoadError, match="not a cmae weights file"):
        export_encoder(junk, tmp_path / "x.onnx")
    # unwritable output, existing output
    (tmp_path / "file").write_text("x")
    from catchment_mae.errors import OutputError

    with pytest.raises(OutputError, match="cannot write there"):
        export_encoder(trained.weights_path, tmp_path / "file" / "x.onnx")
    existing = tmp_path / "exists.onnx"
    existing.write_bytes(b"old")
    with pytest.raises(OutputExistsError):
        export_encoder(trained.weights_path, existing)
    assert existing.read_bytes() == b"old"
    with pytest.raises(ExportError, match="fewer than 8 usable rasters"):
        export_encoder(trained.weights_path, tmp_path / "y.onnx", rasters=tmp_path)
    assert not (tmp_path / "y.onnx").exists()  # nothing written when validation fails


def test_runtime__refuses_foreign_and_newer_files(tmp_path, exported):
    out, _ = exported
    plain = onnx.load(out)
    del plain.metadata_props[:]
    onnx.save(plain, tmp_path / "plain.onnx")
    with pytest.raises(ModelFileError, match="not a cmae encoder"):
        read_metadata(create_session(tmp_path / "plain.onnx"))
    newer = onnx.load(out)
    for p in newer.metadata_props:
        if p.key == "cmae_format_version":
            p.value = "99"
    onnx.save(newer, tmp_path / "newer.onnx")
    with pytest.raises(ModelFileError, match="cmae_format_version 99 is newer"):
        read_metadata(create_session(tmp_path / "newer.onnx"))
    (tmp_path / "broken.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(ModelFileError, match="onnxruntime cannot load it"):
        create_session(tmp_path / "broken.onnx")


DOWNSTREAM = """
import sys
sys.modules.update(torch=None, timm=None, lightly=None)  # prove: no torch needed
import json
import logging
import numpy as np
import onnxruntime as ort
from catchment_mae.preprocess import load_sample
from catchment_mae.runtime import spec_from_metadata

# tifffile logs a line for each odd tag it meets; cmae names what matters.
logging.getLogger("tifffile").setLevel(logging.ERROR)
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
spec = spec_from_metadata(sess.get_modelmeta().custom_metadata_map)
sample = load_sample(sys.argv[2], spec)
feed = {"image": sample.image[None], "scale": sample.scale[None]}
if "valid" in [i.name for i in sess.get_inputs()]:
    feed["valid"] = sample.valid[None]
(embedding,) = sess.run(["embedding"], feed)
print(json.dumps(embedding[0].tolist()))
"""


def test_downstream__onnxruntime_without_torch_matches_torch(
    exported, trained, dem_dir, tmp_path
):
    out, _ = exported
    tif = sorted(dem_dir.glob("*.tif"))[3]
    r = subprocess.run(
        [sys.executable, "-c", DOWNSTREAM, str(out), str(tif)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    got = np.array(json.loads(r.stdout), dtype=np.float32)[None]
    model, cfg = load_model(trained.weights_path)

    s = load_sample(tif, cfg.preprocess_spec())
    ref = _torch(
        embedder(model, cfg),
        {"image": s.image[None], "scale": s.scale[None], "valid": s.valid[None]},
    )
    assert (
        np.abs(got - ref).max() <= MAX_ABS_TOL and _cos(got, ref).min() >= MIN_COS_TOL
    )
    assert r.stderr == ""
    # A nodata tag its dtype cannot hold: tifffile logs it; the app stays quiet.
    from catchment_mae.synth import DemSpec, geotiff_tags

    odd = tmp_path / "odd.tif"
    tags = geotiff_tags(DemSpec(48, 48, 30.0, 32633, (5e5, 4e6), "uint8", -9999.0, 0))
    image = (np.arange(48 * 48) % 200).astype(np.uint8).reshape(48, 48)
    tifffile.imwrite(odd, image, extratags=tags)
    r = subprocess.run([sys.executable, "-c", DOWNSTREAM, str(out), str(odd)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_downstream__readme_snippet_is_the_tested_one():
    """The README's downstream example is this test's code, so it cannot rot."""
    from tests.conftest import REPO

    readme = (REPO / "README.md").read_text()
    body = DOWNSTREAM.split("# prove: no torch needed\n", 1)[1]
    for line in body.strip().splitlines():
        if "sys.argv" in line:
            continue
        assert line in readme, line


def test_export__a_format_1_model_keeps_its_contract(tmp_path, dem_dir):
    """A NAME.json of format 1 (before the terrain inputs) trains, exports and
    embeds as those models did: image and scale alone, two extents in pixels,
    the class token."""
    from catchment_mae.batch.runner import embed_dir
    from catchment_mae.trainer import train
    from tests.conftest import TINY

    cfg = dict(
        TINY, input_dir=str(dem_dir), model_output_path=str(tmp_path / "m.pth"),
        max_epochs=1, scale="pixels", norm="fixed", format_version=1,
    )  # fmt: skip
    result = train(cfg, progress=False)
    assert not (
        result.config.preprocess.scale_stats or result.config.preprocess.slope_channel
    )
    out = tmp_path / "m.onnx"
    report = export_encoder(result.weights_path, out)
    assert report.inputs == ["image", "scale"] and report.pool == "cls"
    sess = create_session(out, "cpu")
    assert [i.shape[1:] for i in sess.get_inputs()] == [[1, 32, 32], [2]]
    spec = spec_from_metadata(read_metadata(sess))
    assert (spec.trim, spec.scale_stats, spec.slope_channel) == (False, False, False)
    summary = embed_dir(dem_dir, out, tmp_path / "e.parquet", num_workers=0)
    assert (summary.embedded, summary.failed) == (12, 0)
    s = load_sample(sorted(dem_dir.glob("*.tif"))[0], spec)
    np.testing.assert_allclose(s.scale, np.log([s.info.height, s.info.width]), 1e-6)
