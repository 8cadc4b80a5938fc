"""``cmae serve``'s JSON API and the original POST /embed, with every refusal."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from catchment_mae.preprocess import load_sample
from catchment_mae.runtime import create_session, read_metadata, spec_from_metadata
from catchment_mae.web.app import create_app
from tests.conftest import DATA

HOST = "localhost"  # the Flask test client's
SAME_ORIGIN = {"Origin": f"http://{HOST}"}


@pytest.fixture(scope="module")
def roots(tmp_path_factory, dem_dir, trained, onnx_model):
    """A data root with DEMs, a model root with a trained .pth and its .onnx."""
    base = tmp_path_factory.mktemp("serve")
    data, models = base / "data", base / "models"
    shutil.copytree(dem_dir, data / "dems")
    models.mkdir()
    for suffix in (".pth", ".json"):
        shutil.copy(
            Path(trained.weights_path).with_suffix(suffix), models / f"m{suffix}"
        )
    shutil.copy(onnx_model, models / "m.onnx")
    (base / "secret.tif").write_bytes(
        (data / "dems" / "catchment_0000.tif").read_bytes()
    )
    return data, models


@pytest.fixture
def client(roots):
    data, models = roots
    app = create_app(data, models, allowed_hosts={"127.0.0.1", "localhost", "::1"})
    with app.test_client() as c:
        yield c


def _post(client, path, **kw):
    headers = {**SAME_ORIGIN, **kw.pop("headers", {})}
    return client.post(path, headers=headers, **kw)


def _reference(model_path, tif):
    sess = create_session(model_path)
    s = load_sample(tif, spec_from_metadata(read_metadata(sess)))
    feed = {"image": s.image[None], "scale": s.scale[None], "valid": s.valid[None]}
    return sess.run(["embedding"], feed)[0][0]


# ------------------------------------------------------------- original /embed
@pytest.mark.parametrize("model", ["m.onnx", "m.pth"])
def test_original_embed__contract(client, roots, model):
    data, models = roots
    r = _post(
        client, "/embed",
        data={"model_path": model, "image_path": "dems/catchment_0003.tif"},
    )  # fmt: skip
    assert r.status_code == 200, r.json
    seed = json.loads((DATA / "seed_embed_response.json").read_text())
    assert list(r.json) == list(seed)  # the original keys, in the original order
    assert r.get_data(as_text=True).startswith('{"status":"success","embedding":[')
    assert r.json["status"] == "success" and r.json["shape"] == [40]
    ref = _reference(models / "m.onnx", data / "dems" / "catchment_0003.tif")
    np.testing.assert_allclose(r.json["embedding"], ref, atol=1e-4)


def test_original_embed__absolute_paths_inside_the_roots(client, roots):
    data, models = roots
    r = _post(
        client, "/embed",
        data={"model_path": str(models / "m.onnx"),
              "image_path": str(data / "dems" / "catchment_0001.tif")},
    )  # fmt: skip
    assert r.status_code == 200 and r.json["shape"] == [40]


@pytest.mark.parametrize(
    ("fields", "status", "words"),
    [
        ({"model_path": "m.onnx", "image_path": "../secret.tif"}, 400, "outside"),
        ({"model_path": "m.onnx", "image_path": "/etc/passwd"}, 400, "outside"),
        (
            {"model_path": "../m.onnx", "image_path": "dems/catchment_0000.tif"},
            400,
            "outside",
        ),  # fmt: skip
        ({"model_path": "m.onnx", "image_path": "link/secret.tif"}, 400, "symlink"),
        (
            {"model_path": "m.onnx", "image_path": "dems/nope.tif"},
            404,
            "does not exist",
        ),
        ({"model_path": "m.onnx"}, 400, "image_path: a path is required"),
        (
            {"model_path": "m.json", "image_path": "dems/catchment_0000.tif"},
            400,
            "expected a .onnx or .pth",
        ),  # fmt: skip
        ({"model_path": "m.onnx", "image_path": "dems"}, 400, "not a file"),
        ({"model_path": "m.onnx", "image_path": "notes.tif"}, 400, "not a TIFF"),
    ],
)
def test_original_embed__refusals(client, roots, fields, status, words):
    data, _ = roots
    link = data / "link"
    if not link.exists():
        link.symlink_to(data.parent, target_is_directory=True)
    (data / "notes.tif").write_text("hello")
    r = _post(client, "/embed", data=fields)
    assert r.status_code == status, r.json
    assert r.json["status"] == "error" and words in r.json["message"], r.json
    assert "Traceback" not in r.get_data(as_text=True)


# -------------------------------------------------------------- guards
def test_guards__host_origin_and_token(roots):
    data, models = roots
    app = create_app(data, models, allowed_hosts={"127.0.0.1", "localhost"})
    c = app.test_client()
    # DNS rebinding: a foreign Host header on a loopback server.
    r = c.get("/api/health", headers={"Host": "evil.example:5000"})
    assert r.status_code == 400 and "not served here" in r.json["message"]
    assert c.get("/api/health", headers={"Host": "localhost:5000"}).status_code == 200
    # Cross-site requests that change state.
    fields = {"model_path": "m.onnx", "image_path": "dems/catchment_0000.tif"}
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
    ):
        r = c.post("/embed", data=fields, headers={"Host": HOST, **headers})
        assert r.status_code == 403 and "cross-site" in r.json["message"], headers
    # Scripts (no Origin) keep working, as the original tool's clients did.
    assert c.post("/embed", data=fields, headers={"Host": HOST}).status_code == 200
    # A token: required everywhere, accepted as a header, bearer, query or cookie.
    app = create_app(data, models, token="s3cret")
    c = app.test_client()
    r = c.get("/api/health")
    assert r.status_code == 401 and "access token" in r.json["message"]
    assert (
        c.get("/api/health", headers={"Authorization": "Bearer nope"}).status_code
        == 401
    )
    assert (
        c.get("/api/health", headers={"Authorization": "Bearer s3cret"}).status_code
        == 200
    )
    assert c.get("/api/health", headers={"X-Cmae-Token": "s3cret"}).status_code == 200
    assert c.get("/api/health?token=s3cret").status_code == 401  # not in API URLs
    page = c.get("/?token=s3cret&x=1")
    # The printed URL: a cookie, then the same page without the token in the URL.
    assert page.status_code == 303 and page.headers["Location"] == "/?x=1"
    assert "cmae_token=s3cret" in page.headers["Set-Cookie"]
    assert "SameSite=Strict" in page.headers["Set-Cookie"]
    assert c.get("/").status_code == 200
    assert c.get("/api/models").status_code == 200  # the cookie now
    assert c.get("/?token=wrong").status_code == 401


def test_guards__roots_must_exist(tmp_path):
    with pytest.raises(Exception, match="--data-root .*not a directory"):
        create_app(tmp_path / "nope", tmp_path)


# --------------------------------------------------------------- /api/embed
def test_api_embed__upload_with_preview(client, roots):
    data, models = roots
    tif = data / "dems" / "catchment_0005.tif"
    r = _post(
        client, "/api/embed",
        data={"model_path": "m.onnx", "image": (io.BytesIO(tif.read_bytes()), "x.tif")},
        content_type="multipart/form-data",
    )  # fmt: skip
    assert r.status_code == 200, r.json
    np.testing.assert_allclose(r.json["embedding"], _reference(models / "m.onnx", tif),
                               atol=1e-5)  # fmt: skip
    assert r.json["preview"].startswith("data:image/png;base64,")
    import base64

    import imagecodecs

    png = imagecodecs.png_decode(base64.b64decode(r.json["preview"].split(",", 1)[1]))
    assert png.shape[2] == 4 and png.shape[0] >= 128
    assert (png[..., 3] == 0).any() and (png[..., 3] == 255).any()  # nodata clear


def test_api_embed__bad_uploads(client, roots):
    data, _ = roots
    cases = [
        (b"not a tiff at all", "image: x.tif: not a TIFF file"),
        (b"II*\x00" + b"\x00" * 20, "x.tif:"),  # a TIFF header, then garbage
    ]
    for body, words in cases:
        r = _post(
            client, "/api/embed",
            data={"model_path": "m.onnx", "image": (io.BytesIO(body), "x.tif")},
            content_type="multipart/form-data",
        )  # fmt: skip
        assert r.status_code == 400 and words in r.json["message"], r.json
    small = create_app(data, roots[1], max_upload_mb=1)
    c = small.test_client()
    r = c.post(
        "/api/embed",
        data={"model_path": "m.onnx", "image": (io.BytesIO(b"\0" * 2**21), "big.tif")},
        content_type="multipart/form-data",
    )
    assert r.status_code == 413 and "larger than 1 MB" in r.json["message"]


# ------------------------------------------------------------------ training
def test_api_train__bad_values_name_the_field(client):
    base = {"dataset": "dems", "name": "t", "vit_model_name": "vit_tiny_patch16_224"}
    cases = [
        ({"max_epochs": "-1"}, "max_epochs", "must be 1 to 10000"),
        ({"image_size": "100000"}, "image_size", "must be 8 to 1024"),
        ({"embed_dim": "65536"}, "embed_dim", "must be 8 to 2048"),
        ({"depth": "500"}, "depth", "must be 1 to 48"),
        ({"batch_size": "100000"}, "batch_size", "must be 1 to 1024"),
        ({"num_workers": "1000"}, "num_workers", "must be 0 to"),
        ({"max_epochs": "two"}, "max_epochs", "whole number"),
        ({"mask_ratio": "1.5"}, "mask_ratio", "(0, 1)"),
        ({"mask_ratio": "0"}, "mask_ratio", "(0, 1)"),
        ({"norm": "median"}, "norm", "must be one of fixed, per-raster"),
        ({"vit_model_name": "resnet50"}, "vit_model_name", "needs a timm Vision"),
        ({"vit_model_name": "vit_nonsense_1"}, "vit_model_name", "unknown timm"),
        ({"dataset": "../"}, "dataset", "outside"),
        ({"dataset": "dems/catchment_0000.tif"}, "dataset", "not a directory"),
        ({"name": "../escape"}, "name", "no folders"),
        ({"name": "x\n.pth"}, "name", "no folders"),
        ({"norm_mean": "a,b"}, "norm_mean", "comma-separated"),
        ({"norm_mean": "1", "norm_std": "0"}, "norm_std", "> 0"),
        ({"name": "m"}, "name", "already exists"),
    ]
    for extra, field, words in cases:
        r = _post(client, "/api/train", json={**base, **extra})
        assert r.status_code in (400, 409), (extra, r.json)
        assert r.json["field"] == field and words in r.json["message"], (extra, r.json)
    assert client.get("/api/jobs").json["jobs"] == []


TINY_FORM = {
    "dataset": "dems",
    "vit_model_name": "vit_tiny_patch16_224",
    "image_size": "32",
    "patch_size": "8",
    "embed_dim": "32",
    "depth": "1",
    "num_heads": "2",
    "decoder_dim": "32",
    "decoder_depth": "1",
    "decoder_num_heads": "2",
    "norm": "per-raster",
    "max_epochs": "2",
    "batch_size": "4",
    "num_workers": "0",
}


def _wait(client, job_id, until=("done", "failed", "cancelled"), timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        j = client.get(f"/api/jobs/{job_id}").json
        if j["status"] in until:
            return j
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {j['status']}")


def test_api_train__job_export_embed_dir_download(client, roots):
    data, models = roots
    # Two loader workers: started from a forkserver, as the job is off the main
    # thread of a threaded server.
    r = _post(
        client, "/api/train", json={**TINY_FORM, "name": "web1", "num_workers": 2}
    )
    assert r.status_code == 202, r.json
    job_id = r.json["job"]
    # One training at a time.
    again = _post(client, "/api/train", json={**TINY_FORM, "name": "web2"})
    if client.get(f"/api/jobs/{job_id}").json["status"] in ("queued", "running"):
        assert again.status_code == 409 and job_id in again.json["message"]
    j = _wait(client, job_id)
    assert j["status"] == "done", j
    assert len(j["history"]) == 2 and j["progress"]["epoch"] == 2
    assert j["curve"] and all(len(p) == 2 for p in j["curve"])
    assert j["result"]["weights"] == "web1.pth" and (models / "web1.json").is_file()
    listed = {m["path"]: m for m in client.get("/api/models").json["models"]}
    assert listed["web1.pth"]["config"]["image_size"] == 32
    assert listed["web1.pth"]["onnx"] is None
    # Export with the button's request, then download the .onnx.
    r = _post(client, "/api/export", json={"model_path": "web1.pth"})
    assert r.status_code == 200, r.json
    assert r.json["onnx"] == "web1.onnx" and r.json["min_cos"] > 0.99999
    dl = client.get(r.json["download"])
    assert dl.status_code == 200 and dl.data == (models / "web1.onnx").read_bytes()
    assert (
        client.get(
            "/api/models/download?path=../data/dems/catchment_0000.tif"
        ).status_code
        == 400
    )
    # Embed the directory with it, and download the table.
    job = {"dataset": "dems", "model_path": "web1.onnx", "name": "t1"}
    r = _post(client, "/api/embed-dir", json=job)
    assert r.status_code == 202, r.json
    j = _wait(client, r.json["job"])
    assert j["status"] == "done" and j["result"]["embedded"] == 12, j
    table = client.get(j["download"])
    assert table.status_code == 200 and table.data[:4] == b"PAR1"


def test_api_train__cancel(client):
    form = {**TINY_FORM, "name": "web_cancel", "max_epochs": "200"}
    r = _post(client, "/api/train", json=form)
    assert r.status_code == 202, r.json
    job_id = r.json["job"]
    _wait(client, job_id, until=("running",))
    c = _post(client, f"/api/jobs/{job_id}/cancel", json={})
    assert c.status_code == 200
    j = _wait(client, job_id)
    assert j["status"] == "cancelled" and "interrupted" in j["error"], j
    assert client.get("/api/jobs/nope").status_code == 404


def test_pages_render(client):
    page = client.get("/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    for form in ("train-form", "embed-form", "embed-dir-form"):
        assert f'id="{form}"' in html
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/jobs/nope").status_code == 404


def test_serve__help_and_missing_roots(runner, tmp_path):
    from catchment_mae.cli.main import cli

    r = runner.invoke(cli, ["serve", "--help"])
    assert r.exit_code == 0 and "--data-root" in r.stdout and "token" in r.stdout
    r = runner.invoke(cli, ["serve", "--data-root", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "does not exist" in r.stderr
    assert os.environ.get("CMAE_TOKEN") is None


def test_jobs__one_training_per_machine(tmp_path):
    """Two servers on one machine share the training lock; it is released when
    the job ends, whatever its end."""
    import threading

    from catchment_mae.web.jobs import Busy, JobManager

    lock = tmp_path / "train.lock"
    a, b = JobManager(lock_path=lock), JobManager(lock_path=lock)
    release = threading.Event()
    job = a.start("train", {}, lambda job: release.wait(10) and {"ok": True})
    with pytest.raises(Busy, match="another cmae serve on this machine"):
        b.start("train", {}, lambda job: {})
    assert b.start("embed-dir", {}, lambda job: {}).kind == "embed-dir"  # not locked
    release.set()
    a.wait(job.id, 10)
    assert a.get(job.id).status == "done"

    def boom(job):
        raise RuntimeError("out of memory\nmore")

    failed = b.start("train", {}, boom)
    b.wait(failed.id, 10)
    assert failed.status == "failed" and failed.error == "RuntimeError: out of memory"
    again = a.start("train", {}, lambda job: {})
    a.wait(again.id, 10)
    assert again.status == "done"


def test_jobs__stop_cancels_running_jobs_and_waits(tmp_path):
    """A server stopping cancels its jobs and waits for them; one that will
    not end in time is named."""
    import threading

    from catchment_mae.web.jobs import JobManager, check_cancel

    manager = JobManager(lock_path=tmp_path / "train.lock")

    def polite(job):  # a training: checks for a cancel between batches
        while True:
            check_cancel(job)
            time.sleep(0.01)

    release = threading.Event()
    a = manager.start("train", {}, polite)
    b = manager.start("embed-dir", {}, lambda job: release.wait(10) and {})
    assert manager.stop(timeout=0.5) == [b.id]
    assert a.status == "cancelled" and a.error == "cancelled"
    release.set()
    assert manager.stop(timeout=5) == []
    assert manager.start("train", {}, lambda job: {})  # the lock was released


# ------------------------------------------------------------------ hardening
@pytest.fixture
def fenced(tmp_path, dem_dir, onnx_model):
    """Roots with links that lead out of them, and a file outside them."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(sorted(dem_dir.glob("*.tif"))[0], outside / "x.tif")
    (outside / "secret.txt").write_text("SECRET")
    data, models = tmp_path / "data", tmp_path / "models"
    shutil.copytree(dem_dir, data / "dems")
    (data / "dems" / "link.tif").symlink_to(outside / "x.tif")
    (data / "dems" / "fake.tif").symlink_to(outside / "secret.txt")
    (data / "dems" / "linkdir").symlink_to(outside)
    (data / "dems" / "inside.tif").symlink_to(data / "dems" / "catchment_0001.tif")
    models.mkdir()
    shutil.copy(onnx_model, models / "m.onnx")
    app = create_app(data, models)
    with app.test_client() as c:
        yield c, data, models, outside


def test_embed_dir__walks_never_leave_the_data_root(fenced):
    import pyarrow.parquet as pq

    client, data, models, _ = fenced
    r = _post(client, "/api/embed-dir",
              json={"dataset": ".", "model_path": "m.onnx", "name": "t"})  # fmt: skip
    assert r.status_code == 202, r.json
    assert _wait(client, r.json["job"])["status"] == "done"
    table = pq.read_table(models / "embeddings" / "t.parquet").to_pylist()
    paths = {row["path"] for row in table}
    assert "dems/inside.tif" in paths  # a link that stays inside is fine
    assert not {p for p in paths if "link" in p or "fake" in p}
    assert not any("SECRET" in str(row["error"]) for row in table)


def test_outputs__never_written_through_a_symlink(fenced):
    client, data, models, outside = fenced
    (models / "embeddings").symlink_to(outside)
    fields = {"dataset": "dems", "model_path": "m.onnx", "name": "t"}
    r = _post(client, "/api/embed-dir", json=fields)
    assert r.status_code == 400 and "outside --model-root" in r.json["message"]
    (models / "embeddings").unlink()
    (models / "t.pth").symlink_to(outside / "planted.pth")
    r = _post(client, "/api/train", json={**TINY_FORM, "name": "t", "overwrite": "1"})
    assert r.status_code == 400 and "outside --model-root" in r.json["message"]
    (models / "t.pth").unlink()
    (models / ".cache").symlink_to(outside)
    r = _post(client, "/api/train", json={**TINY_FORM, "name": "t"})
    assert r.status_code == 400 and r.json["field"] == "name"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt", "x.tif"]


def test_training_lock__a_planted_directory_or_link_is_a_clear_503(
    fenced, tmp_path, monkeypatch
):
    import catchment_mae.web.jobs as jobs

    client, _, models, outside = fenced
    for planted in ("dir", "link"):
        lock = tmp_path / f"lock-{planted}"
        if planted == "dir":
            lock.mkdir()
        else:
            lock.symlink_to(outside / "secret.txt")
        manager = jobs.JobManager(lock_path=lock)
        with pytest.raises(jobs.LockUnavailable, match="cannot take the machine"):
            manager.start("train", {}, lambda job: {})
        assert (outside / "secret.txt").read_text() == "SECRET"
    monkeypatch.setattr(jobs, "default_train_lock", lambda: tmp_path / "lock-dir")
    app = create_app(models.parent / "data", models)
    r = _post(app.test_client(), "/api/train", json={**TINY_FORM, "name": "u"})
    assert r.status_code == 503 and "training lock" in r.json["message"]


def test_jobs__only_known_fields_kept_and_history_bounded(fenced):
    import catchment_mae.web.jobs as jobs

    client, *_ = fenced
    junk = "x" * (30 << 10)
    r = _post(client, "/api/embed-dir", json={
        "dataset": "dems", "model_path": "m.onnx", "name": "j", "junk": junk,
    })  # fmt: skip
    assert r.status_code == 202
    job = _wait(client, r.json["job"])
    assert "junk" not in job["params"] and job["params"]["name"] == "j"
    big = _post(client, "/api/embed-dir", data=json.dumps({"junk": "x" * (2 << 20)}),
                content_type="application/json")  # fmt: skip
    assert big.status_code == 413 and "JSON body larger than" in big.json["message"]
    manager = jobs.JobManager()
    for _ in range(jobs.MAX_FINISHED + 20):
        j = manager.start("embed-dir", {}, lambda job: {})
        manager.wait(j.id)
    assert len(manager.all()) <= jobs.MAX_FINISHED + 1


def test_requests__clear_answers_instead_of_500s(fenced):
    client, data, _, _ = fenced
    (data / "loop").symlink_to(data / "loop")
    cases = [
        {"model_path": "m.onnx", "image_path": "a" * 5000},
        {"model_path": "m.onnx", "image_path": "x" * 300 + ".tif"},
        {"model_path": "m.onnx", "image_path": "loop/x.tif"},
    ]
    for fields in cases:
        r = _post(client, "/embed", data=fields)
        assert r.status_code in (400, 404), (fields["image_path"][:20], r.json)
        assert r.is_json and r.json["field"] == "image_path"
    deep = "[" * 100_000 + "]" * 100_000
    r = _post(client, "/api/train", data=deep, content_type="application/json")
    assert r.status_code == 400 and "nested" in r.json["message"]
    r = client.get("//api/health")
    assert r.status_code == 404 and r.is_json
    many = {f"f{i}": "1" for i in range(300)}  # multipart: an upload among them
    r = _post(client, "/embed", data={**many, "image": (io.BytesIO(b"II*"), "x.tif")})
    assert r.status_code == 413 and "more than 100 parts" in r.json["message"]
    upload = (io.BytesIO(b"I"), "x")
    r = _post(client, "/embed", data={"x": "y" * (100 << 10), "image": upload})
    assert r.status_code == 413 and "larger than 64 kB" in r.json["message"]
    api = client.get("/api/health")
    assert api.headers["Cache-Control"] == "no-store"
    assert api.headers["Referrer-Policy"] == "no-referrer"
    assert "default-src 'self'" in client.get("/").headers["Content-Security-Policy"]


def test_requests__lone_surrogates_and_long_fields_are_400s(fenced):
    client, *_ = fenced
    routes = [
        ("/embed", {"model_path": "m.onnx", "image_path": "\ud800"}),
        ("/api/embed", {"model_path": "\ud800", "image_path": "dems/x.tif"}),
        ("/api/embed-dir", {"dataset": "\ud800", "model_path": "m.onnx", "name": "t"}),
        ("/api/train", {**TINY_FORM, "name": "t", "dataset": "d\udfff"}),
        ("/api/export", {"model_path": "\udc80.pth"}),
    ]
    for path, fields in routes:
        body = json.dumps(fields)  # escapes the surrogate: valid JSON text
        r = _post(client, path, data=body, content_type="application/json")
        assert r.status_code == 400, (path, r.status_code, r.json)
        assert "not valid text" in r.json["message"], r.json
    long = {"dataset": "dems", "model_path": "m.onnx", "name": "t",
            "vit_model_name": "v" * 5000}  # fmt: skip
    r = _post(client, "/api/train", json=long)
    assert r.status_code == 400 and r.json["field"] == "vit_model_name", r.json
    many = {**TINY_FORM, "name": "t", "norm_mean": [1.0] * 10_000}
    r = _post(client, "/api/train", json=many)
    assert r.status_code == 400 and r.json["field"] == "norm_mean", r.json
    form = "a=" + "x" * (2 << 20)  # a form that is not multipart: capped as JSON is
    r = _post(client, "/embed", data=form,
              content_type="application/x-www-form-urlencoded")  # fmt: skip
    assert r.status_code == 413 and "form larger than" in r.json["message"], r.json


def test_api_train__a_model_too_big_for_the_machine_is_refused(fenced):
    client, *_ = fenced
    huge = {**TINY_FORM, "name": "big", "embed_dim": "2048", "depth": "48",
            "num_heads": "32", "decoder_dim": "2048", "decoder_depth": "24",
            "decoder_num_heads": "32", "image_size": "1024", "patch_size": "16",
            "batch_size": "1024"}  # fmt: skip
    r = _post(client, "/api/train", json=huge)
    assert r.status_code == 400 and "GB" in r.json["message"], r.json
    tokens = {**TINY_FORM, "name": "big", "image_size": "1024", "patch_size": "1"}
    r = _post(client, "/api/train", json=tokens)
    assert r.status_code == 400 and "tokens" in r.json["message"], r.json
    for bad in ("nan", "inf", "-1"):
        r = _post(client, "/api/train", json={**TINY_FORM, "name": "b", "lr": bad})
        assert r.status_code == 400 and r.json["field"] == "lr", (bad, r.json)
    assert client.get("/api/jobs").json["jobs"] == []


def test_downloads__no_store_and_a_removed_table_is_a_404(fenced):
    client, _, models, _ = fenced
    fields = {"dataset": "dems", "model_path": "m.onnx", "name": "gone"}
    r = _post(client, "/api/embed-dir", json=fields)
    j = _wait(client, r.json["job"])
    ok = client.get(j["download"])
    assert ok.status_code == 200 and ok.headers["Cache-Control"] == "no-store"
    model = client.get("/api/models/download?path=m.onnx")
    assert model.headers["Cache-Control"] == "no-store"
    (models / "embeddings" / "gone.parquet").unlink()
    r = client.get(j["download"])
    assert r.status_code == 404 and "no longer" in r.json["message"], r.json


# ------------------------------------------------------------------- races
class Swapper:
    """Flips ``name`` between what it is and a symlink to ``outside``, as fast
    as it can, in a thread: every check-then-use of that name races it. A
    folder is moved aside and back (for an instant it is missing)."""

    def __init__(self, name: Path, outside: Path) -> None:
        import threading

        self.name, self.outside = name, outside
        self.keep = name.with_name(name.name + ".keep")
        self.folder = name.is_dir()
        if not self.folder:
            os.link(name, self.keep)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        link = self.name.with_name(self.name.name + ".l")
        real = self.name.with_name(self.name.name + ".r")
        while not self.stop.is_set():
            if self.folder:
                os.rename(self.name, self.keep)
                self._retry(os.symlink, self.outside, self.name)
                os.unlink(self.name)
                self._retry(os.rename, self.keep, self.name)
                continue
            os.symlink(self.outside, link)
            os.replace(link, self.name)
            os.link(self.keep, real)
            os.replace(real, self.name)

    def _retry(self, step, *args) -> None:
        """``step``, after setting aside a folder a job made again at the name
        while it was moved aside (``mkdir``)."""
        try:
            step(*args)
        except OSError:
            aside = self.name.with_name("made0")
            while aside.exists() or aside.is_symlink():  # an earlier swapper's
                aside = aside.with_name(f"made{int(aside.name[4:]) + 1}")
            os.rename(self.name, aside)
            step(*args)

    def __enter__(self) -> Swapper:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()
        if not self.folder:  # the file as it was, under its one name
            self.name.unlink()
            self.keep.rename(self.name)


@pytest.fixture
def raced(tmp_path, dem_dir, onnx_model):
    """Roots, and outside them a raster of its own size and a secret model."""
    from catchment_mae.synth import write_dem
    from tests.conftest import dem_spec

    data, models, outside = tmp_path / "data", tmp_path / "models", tmp_path / "out"
    shutil.copytree(dem_dir, data / "dems")
    outside.mkdir()
    write_dem(outside / "race.tif", dem_spec(height=77, width=91, seed=5))
    (outside / "sub").mkdir()
    write_dem(outside / "sub" / "race.tif", dem_spec(height=77, width=91, seed=6))
    (data / "dems" / "race.tif").write_bytes(
        (data / "dems" / "catchment_0000.tif").read_bytes()
    )
    (data / "sub").mkdir()
    shutil.copy(data / "dems" / "race.tif", data / "sub" / "race.tif")
    models.mkdir()
    shutil.copy(onnx_model, models / "m.onnx")
    (outside / "secret.onnx").write_bytes(b"SECRET" * 100)
    app = create_app(data, models)
    with app.test_client() as c:
        yield c, data, models, outside


def test_races__reads_never_leave_the_roots(raced):
    """Each route, 100 requests against a thread that swaps the file (or a
    folder on its path) for a symlink that leads out: never the outside file's
    data in an answer; a swap seen is a clear 400."""
    client, data, models, outside = raced
    inside = client.post("/api/embed", headers=SAME_ORIGIN, json={
        "model_path": "m.onnx", "image_path": "dems/race.tif"}).json  # fmt: skip
    assert (inside["height"], inside["width"]) != (77, 91)
    out_emb = []
    for k, rel in enumerate(("race.tif", "sub/race.tif")):
        shutil.copy(outside / rel, data / f"probe{k}.tif")
        out_emb.append(
            client.post(
                "/embed",
                headers=SAME_ORIGIN,
                json={"model_path": "m.onnx", "image_path": f"probe{k}.tif"},
            ).json["embedding"]
        )
        (data / f"probe{k}.tif").unlink()
    cases = [
        (data / "dems" / "race.tif", outside / "race.tif", "dems/race.tif"),
        (data / "sub", outside / "sub", "sub/race.tif"),  # a folder on the path
    ]
    for name, target, image_path in cases:
        with Swapper(name, target):
            for _ in range(100):
                for route in ("/api/embed", "/embed"):
                    r = _post(client, route, json={
                        "model_path": "m.onnx", "image_path": image_path})  # fmt: skip
                    assert r.status_code in (200, 400, 404), r.json
                    if r.status_code != 200:
                        assert r.json["field"] == "image_path", r.json
                    elif route == "/api/embed":
                        assert (r.json["height"], r.json["width"]) == (
                            inside["height"], inside["width"])  # fmt: skip
                    else:
                        assert r.json["embedding"] not in out_emb, "LEAK"
                        assert r.json["embedding"] == inside["embedding"]
        # Unraced, the same request is answered (the route works at all).
        r = _post(client, "/embed", json={
            "model_path": "m.onnx", "image_path": image_path})  # fmt: skip
        assert r.status_code == 200 and r.json["embedding"] == inside["embedding"]
    secret = (outside / "secret.onnx").read_bytes()
    shutil.copy(models / "m.onnx", models / "dl.onnx")
    with Swapper(models / "dl.onnx", outside / "secret.onnx"):
        for _ in range(100):
            with client.get("/api/models/download?path=dl.onnx") as r:
                assert r.status_code in (200, 400), r.status_code
                assert secret not in r.data


def test_races__jobs_never_read_outside_the_data_root(raced):
    """embed-dir and training jobs walk the data root, then read each file in
    reader processes: a folder swapped for a link that leads out in between
    is refused by what each read opened, never read."""
    import pyarrow.feather as feather
    import pyarrow.parquet as pq

    from catchment_mae.synth import write_dem
    from tests.conftest import dem_spec

    client, data, models, outside = raced
    (data / "racy").mkdir()
    (outside / "racy").mkdir()
    for i in range(20):
        shutil.copy(data / "dems" / "race.tif", data / "racy" / f"r{i:02d}.tif")
        write_dem(outside / "racy" / f"r{i:02d}.tif", dem_spec(77, 91, seed=i))
    for k in range(3):
        r = _post(client, "/api/embed-dir", json={
            "dataset": "racy", "model_path": "m.onnx", "name": f"r{k}"})  # fmt: skip
        assert r.status_code == 202, r.json
        with Swapper(data / "racy", outside / "racy"):  # as the job walks and reads
            job = _wait(client, r.json["job"])
        assert job["status"] in ("done", "failed"), job
        table = models / "embeddings" / f"r{k}.parquet"
        rows = pq.read_table(table).to_pylist() if table.exists() else []
        assert not [row for row in rows if row["height"] == 77], rows
    for k in range(2):
        form = {**TINY_FORM, "dataset": "racy", "name": f"t{k}", "max_epochs": "1"}
        r = _post(client, "/api/train", json=form)
        assert r.status_code == 202, r.json
        with Swapper(data / "racy", outside / "racy"):
            job = _wait(client, r.json["job"])
        assert job["status"] in ("done", "failed"), job
    # The cache holds what training read: never an outside raster's 77 x 91.
    heights = [
        row["height"]
        for index in (models / ".cache").rglob("*.arrow")
        for row in feather.read_table(index).to_pylist()
    ]
    assert 77 not in heights, heights


def test_races__embed_dir_never_writes_outside_the_model_root(raced):
    """The embeddings folder swapped for a link that leads out while the job
    runs: the table, its parts and its lock land in the folder that was
    checked, nothing outside."""
    client, data, models, outside = raced
    (models / "embeddings").mkdir()
    (outside / "emb").mkdir()
    for k in range(5):
        r = _post(client, "/api/embed-dir", json={
            "dataset": "dems", "model_path": "m.onnx", "name": f"w{k}"})  # fmt: skip
        assert r.status_code == 202, r.json
        with Swapper(models / "embeddings", outside / "emb"):
            job = _wait(client, r.json["job"])
        if job["status"] == "failed":  # a link, or moved aside, when it began
            assert job["error"].startswith("name: embeddings: "), job
            assert job["error"].endswith(("is in its place", "does not exist")), job
        else:
            assert job["status"] == "done", job["error"]
            assert (models / "embeddings" / f"w{k}.parquet").is_file()
        assert list((outside / "emb").iterdir()) == []


def test_races__training_never_writes_its_cache_outside_the_model_root(raced):
    """The cache's folder (--model-root/.cache) swapped for a link that leads
    out while a training job starts: the cache is used inside, or the job says
    why not; nothing is written outside."""
    client, data, models, outside = raced
    (models / ".cache").mkdir()
    (outside / "cache").mkdir()
    for k in range(3):
        form = {**TINY_FORM, "name": f"c{k}", "max_epochs": "1"}
        r = _post(client, "/api/train", json=form)
        assert r.status_code == 202, r.json
        with Swapper(models / ".cache", outside / "cache"):
            job = _wait(client, r.json["job"])
        if job["status"] == "failed":  # the folder was a link, or moved aside
            assert "cannot use the cache there" in job["error"], job
        else:
            assert job["status"] == "done", job["error"]
        assert list((outside / "cache").iterdir()) == []


def test_races__export_reads_and_writes_only_what_it_checked(raced, trained):
    """The weights' NAME.json swapped for a link to an outside config, and the
    weights for a link to outside bytes: an export answers from the files it
    checked, or refuses; the outside text never shows in an answer, and
    nothing is written outside."""
    client, data, models, outside = raced
    for suffix in (".pth", ".json"):
        shutil.copy(
            Path(trained.weights_path).with_suffix(suffix), models / f"e{suffix}"
        )
    marker = "OUTSIDE-CONFIG-MARKER"
    (outside / "e.json").write_text(json.dumps({marker: 1}))
    (outside / "e.pth").write_bytes(marker.encode() * 10)
    before = sorted(p.name for p in outside.iterdir())
    for name in ("e.json", "e.pth"):
        with Swapper(models / name, outside / name):
            for _ in range(6):  # an export validates itself: seconds each
                r = _post(client, "/api/export", json={"model_path": "e.pth"})
                assert r.status_code in (200, 400, 404), r.json
                assert marker not in json.dumps(r.json), r.json
        r = _post(client, "/api/export", json={"model_path": "e.pth"})
        assert r.status_code == 200, r.json  # unraced, the export works
    assert sorted(p.name for p in outside.iterdir()) == before  # nothing written
