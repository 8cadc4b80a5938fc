"""``cmae serve``: the original tool's web UI (train, export, embed) made safe.

A Flask app over the library: training is ``trainer.train``, export is
``export.onnx.export_encoder``, embedding is the shared ``load_sample`` plus
onnxruntime (or the torch model for a ``.pth``), embed-dir is
``batch.runner.embed_dir``. Nothing is implemented twice here.

Every answer of the API is JSON; errors are ``{"status": "error", "message":
..., "field": ...}`` with a 4xx code (5xx only for our own bugs), never a
traceback. See ``security.py`` for what is refused and why.
"""

from __future__ import annotations

import atexit
import base64
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flask import Flask, Response, jsonify, render_template, request, send_file
from werkzeug.exceptions import HTTPException

from catchment_mae import __version__
from catchment_mae.errors import BadRasterError, CmaeError
from catchment_mae.raster import check_file, is_tiff_name
from catchment_mae.web.jobs import Busy, Job, JobManager, check_cancel
from catchment_mae.web.security import (
    Refused,
    check_host,
    check_same_origin,
    check_token,
    confine,
)

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
TOKEN_COOKIE = "cmae_token"


@dataclass
class Settings:
    """What ``cmae serve`` was started with."""

    data_root: Path
    model_root: Path
    token: str | None = None
    allowed_hosts: set[str] | None = None  # None: any Host header
    max_upload_mb: int = 256
    device: str = "auto"
    upload_dir: Path = field(default_factory=lambda: _temp_dir())


def _temp_dir() -> Path:
    """Uploads land here, one folder per request, removed after use and at exit."""
    path = Path(tempfile.mkdtemp(prefix="cmae-uploads-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def create_app(
    data_root: str | os.PathLike[str],
    model_root: str | os.PathLike[str],
    *,
    token: str | None = None,
    allowed_hosts: set[str] | None = None,
    max_upload_mb: int = 256,
    device: str = "auto",
) -> Flask:
    """The web app. ``allowed_hosts`` (names without port) guards against DNS
    rebinding; ``token`` is required on every request when set."""
    for name, root in (("--data-root", data_root), ("--model-root", model_root)):
        if not Path(root).is_dir():
            raise CmaeError(f"{name} {root}: not a directory")
    settings = Settings(
        data_root=Path(data_root).resolve(),
        model_root=Path(model_root).resolve(),
        token=token,
        allowed_hosts=allowed_hosts,
        max_upload_mb=max_upload_mb,
        device=device,
    )
    app = Flask(__name__)
    app.json.sort_keys = False  # keys in the original tool's order: status first
    app.config["MAX_CONTENT_LENGTH"] = max_upload_mb * 2**20
    app.extensions["cmae"] = _State(settings)
    _register(app)
    return app


class _State:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.jobs = JobManager()
        self.models = _ModelCache(settings.device)


def _state() -> _State:
    from flask import current_app

    return current_app.extensions["cmae"]


# ---------------------------------------------------------------------- routes
def _register(app: Flask) -> None:
    @app.before_request
    def guard() -> None:
        s = _state().settings
        check_host(request.host, s.allowed_hosts)
        given = (
            _bearer(request.headers.get("Authorization"))
            or request.headers.get("X-Cmae-Token")
            or request.args.get("token")
            or request.cookies.get(TOKEN_COOKIE)
        )
        check_token(s.token, given)
        check_same_origin(
            request.method,
            request.headers.get("Origin"),
            request.headers.get("Sec-Fetch-Site"),
            request.host,
        )

    @app.after_request
    def remember_token(response: Response) -> Response:
        s = _state().settings
        if s.token and request.args.get("token") == s.token:
            response.set_cookie(TOKEN_COOKIE, s.token, httponly=True, samesite="Strict")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        return response

    @app.errorhandler(Refused)
    def refused(e: Refused) -> tuple[Response, int]:
        return _error(e.message, e.status, e.field)

    @app.errorhandler(Busy)
    def busy(e: Busy) -> tuple[Response, int]:
        return _error(str(e), 409)

    @app.errorhandler(CmaeError)
    def library_error(e: CmaeError) -> tuple[Response, int]:
        return _error(str(e), 400)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> tuple[Response, int]:
        if e.code == 413:
            limit = _state().settings.max_upload_mb
            return _error(f"upload larger than {limit} MB (--max-upload-mb)", 413)
        return _error(f"{e.name}: {e.description}", e.code or 500)

    @app.errorhandler(Exception)
    def internal(e: Exception) -> tuple[Response, int]:
        first = (str(e).strip().splitlines() or [""])[0]
        message = f"internal error: {type(e).__name__}: {first}"
        log.error("%s %s: %s (details with -v)", request.method, request.path, message)
        log.debug("traceback", exc_info=True)
        return _error(message, 500)

    # ------------------------------------------------------------------ pages
    @app.get("/")
    def index() -> str:
        s = _state().settings
        return render_template(
            "index.html",
            version=__version__,
            data_root=str(s.data_root),
            model_root=str(s.model_root),
        )

    @app.get("/jobs/<job_id>")
    def job_page(job_id: str) -> str:
        if _state().jobs.get(job_id) is None:
            raise Refused(404, f"no job {job_id!r}")
        return render_template("job.html", version=__version__, job_id=job_id)

    # --------------------------------------------------------------- the API
    @app.get("/api/health")
    def health() -> Response:
        return jsonify(status="ok", version=__version__)

    @app.get("/api/data")
    def data() -> Response:
        return jsonify(_list_data(_state().settings.data_root))

    @app.get("/api/models")
    def models() -> Response:
        return jsonify(models=_list_models(_state().settings.model_root))

    @app.get("/api/models/download")
    def download_model() -> Response:
        s = _state().settings
        path = confine(s.model_root, request.args.get("path"), "path", "--model-root")
        if path.suffix.lower() not in (".onnx", ".pth", ".json", ".png", ".parquet"):
            raise Refused(400, "path: only model files are served", "path")
        return send_file(path, as_attachment=True, download_name=path.name)

    @app.post("/api/train")
    def start_train() -> tuple[Response, int]:
        params = _params()
        cfg, overwrite = _train_config(params)
        job = _state().jobs.start("train", _public(params), _train_work(cfg, overwrite))
        return jsonify(status="started", job=job.id, url=f"/jobs/{job.id}"), 202

    @app.get("/api/jobs")
    def jobs() -> Response:
        return jsonify(jobs=[_job_dict(j) for j in _state().jobs.all()])

    @app.get("/api/jobs/<job_id>")
    def job(job_id: str) -> Response:
        return jsonify(_job_dict(_job(job_id)))

    @app.post("/api/jobs/<job_id>/cancel")
    def cancel(job_id: str) -> Response:
        _job(job_id)
        return jsonify(_job_dict(_state().jobs.cancel(job_id)))

    @app.get("/api/jobs/<job_id>/download")
    def job_download(job_id: str) -> Response:
        j = _job(job_id)
        if j.status != "done" or not j.result or "out" not in j.result:
            raise Refused(409, f"job {job_id} has nothing to download (yet)")
        path = _state().settings.model_root / j.result["out"]
        return send_file(path, as_attachment=True, download_name=path.name)

    @app.post("/api/export")
    def export() -> Response:
        params = _params()
        s = _state().settings
        pth = _model_path(params, {".pth"})
        pool = str(params.get("pool") or "cls")
        if pool not in ("cls", "mean"):
            raise Refused(400, f"pool: must be cls or mean, got {pool!r}", "pool")
        from catchment_mae.export.onnx import export_encoder

        out = pth.with_suffix(".onnx")
        report = export_encoder(pth, out, pool=pool, overwrite=True)
        rel = out.relative_to(s.model_root).as_posix()
        return jsonify(
            status="success",
            onnx=rel,
            download=f"/api/models/download?path={rel}",
            max_abs=max(p.max_abs for p in report.parity),
            min_cos=min(p.min_cos for p in report.parity),
        )

    @app.post("/api/embed")
    def api_embed() -> Response:
        vector, sample, model = _embed_request()
        return jsonify(
            status="success",
            embedding=[float(v) for v in vector],
            shape=[len(vector)],
            model=model,
            height=sample.info.height,
            width=sample.info.width,
            bands=sample.info.bands,
            preview=_preview_png(sample),
        )

    @app.post("/embed")
    def original_embed() -> Response:
        """The original tool's contract: form fields model_path and image_path."""
        vector, _, _ = _embed_request()
        return jsonify(
            status="success", embedding=[float(v) for v in vector], shape=[len(vector)]
        )

    @app.post("/api/embed-dir")
    def start_embed_dir() -> tuple[Response, int]:
        params = _params()
        s = _state().settings
        src = _dataset(params)
        model = _model_path(params, {".onnx"})
        name = _name(params, "name")
        out = s.model_root / "embeddings" / f"{name}.parquet"
        overwrite = _bool(params.get("overwrite"))
        job = _state().jobs.start(
            "embed-dir", _public(params), _embed_dir_work(src, model, out, overwrite)
        )
        return jsonify(status="started", job=job.id, url=f"/jobs/{job.id}"), 202


# ----------------------------------------------------------------- requests
def _params() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if isinstance(body, dict):
        return body
    return {k: v for k, v in request.form.items()}


def _public(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k != "token"}


def _bearer(header: str | None) -> str | None:
    if header and header.lower().startswith("bearer "):
        return header[7:].strip()
    return None


def _error(message: str, status: int, field: str | None = None) -> tuple[Response, int]:
    body: dict[str, Any] = {"status": "error", "message": message}
    if field:
        body["field"] = field
    return jsonify(body), status


def _job(job_id: str) -> Job:
    j = _state().jobs.get(job_id)
    if j is None:
        raise Refused(404, f"no job {job_id!r}")
    return j


def _job_dict(j: Job) -> dict[str, Any]:
    d = j.to_dict()
    if j.status == "done" and j.result and "out" in j.result:
        d["download"] = f"/api/jobs/{j.id}/download"
    return d


def _name(params: dict[str, Any], key: str) -> str:
    value = str(params.get(key) or "").strip()
    if value.lower().endswith((".pth", ".parquet", ".onnx")):
        value = value.rsplit(".", 1)[0]
    if not NAME_RE.match(value):
        raise Refused(
            400,
            f"{key}: use letters, digits, '.', '_' or '-' (no folders), got {value!r}",
            key,
        )
    return value


def _dataset(params: dict[str, Any]) -> Path:
    s = _state().settings
    path = confine(s.data_root, params.get("dataset"), "dataset", "--data-root")
    if not path.is_dir():
        raise Refused(400, "dataset: not a directory", "dataset")
    return path


def _model_path(params: dict[str, Any], suffixes: set[str]) -> Path:
    s = _state().settings
    path = confine(s.model_root, params.get("model_path"), "model_path", "--model-root")
    if path.suffix.lower() not in suffixes or not path.is_file():
        raise Refused(
            400,
            f"model_path: expected a {' or '.join(sorted(suffixes))} file, got "
            f"{params.get('model_path')!r}",
            "model_path",
        )
    return path


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value or "").strip().lower() in ("1", "true", "on", "yes")


# ----------------------------------------------------------------- training
_INT_FIELDS = {
    "image_size": 8,
    "in_chans": 1,
    "max_epochs": 1,
    "batch_size": 1,
    "num_workers": 0,
    "patch_size": 1,
    "embed_dim": 1,
    "depth": 1,
    "num_heads": 1,
    "decoder_dim": 1,
    "decoder_depth": 1,
    "decoder_num_heads": 1,
}
_FLOAT_FIELDS = ("mask_ratio", "lr")
_LIST_FIELDS = ("norm_mean", "norm_std")


def _train_config(params: dict[str, Any]) -> tuple[Any, bool]:
    from catchment_mae.config import TrainConfig
    from catchment_mae.errors import ConfigError

    s = _state().settings
    dataset = _dataset(params)
    name = _name(params, "name")
    values: dict[str, Any] = {
        "input_dir": str(dataset),
        "model_output_path": str(s.model_root / f"{name}.pth"),
        "device": s.device,
        # The decode-once cache stays inside the server's roots too.
        "cache_dir": str(s.model_root / ".cache"),
    }
    vit = str(params.get("vit_model_name") or "vit_small_patch16_224").strip()
    if not _is_timm_vit(vit):
        raise Refused(
            400,
            f"vit_model_name: {vit!r} is not a timm ViT (e.g. vit_small_patch16_224)",
            "vit_model_name",
        )
    values["vit_model_name"] = vit
    for key, minimum in _INT_FIELDS.items():
        raw = params.get(key)
        if raw is None or str(raw).strip() == "":
            continue
        try:
            number = int(str(raw).strip())
        except ValueError:
            raise Refused(
                400, f"{key}: must be a whole number, got {raw!r}", key
            ) from None
        if number < minimum:
            raise Refused(400, f"{key}: must be >= {minimum}, got {number}", key)
        values[key] = number
    for key in _FLOAT_FIELDS:
        raw = params.get(key)
        if raw is None or str(raw).strip() == "":
            continue
        try:
            values[key] = float(str(raw).strip())
        except ValueError:
            raise Refused(400, f"{key}: must be a number, got {raw!r}", key) from None
    values["norm"] = str(params.get("norm") or "fixed")
    for key in _LIST_FIELDS:
        raw = params.get(key)
        if raw is None or str(raw).strip() == "":
            continue  # compute from the data
        try:
            items = raw if isinstance(raw, list) else str(raw).split(",")
            values[key] = [float(v) for v in items if str(v).strip()]
        except ValueError:
            raise Refused(
                400, f"{key}: comma-separated numbers like 2000,1000, got {raw!r}", key
            ) from None
    try:  # TrainConfig checks the values (mask ratio, norm, ...) as for the CLI
        cfg = TrainConfig.from_dict(values)
    except ConfigError as e:  # its messages start with the key: the field
        key = re.match(r"[a-z_]*", str(e)).group()  # "norm_std[0] must be > 0"
        known = key if key in TrainConfig.__dataclass_fields__ else None
        raise Refused(400, str(e), known) from e
    return cfg, _bool(params.get("overwrite"))


def _is_timm_vit(name: str) -> bool:
    import timm

    return name.startswith(("vit_", "deit")) and timm.is_model(name)


def _train_work(cfg: Any, overwrite: bool):
    from catchment_mae.errors import OutputExistsError
    from catchment_mae.io import check_writable

    try:
        check_writable([cfg.weights_path, cfg.config_path], overwrite=overwrite)
    except OutputExistsError as e:
        raise Refused(409, f"name: {e}", "name") from e
    root = _state().settings.model_root

    def work(job: Job) -> dict[str, Any]:
        from catchment_mae.trainer import train

        start = time.perf_counter()
        job.progress = {"epoch": 0, "epochs": cfg.max_epochs, "step": 0}

        def on_batch(info: dict[str, Any]) -> None:
            check_cancel(job)
            done = info["epoch"] * info["steps"] + info["step"]
            total = cfg.max_epochs * info["steps"]
            elapsed = time.perf_counter() - start
            job.progress = {
                "epoch": info["epoch"] + 1,
                "epochs": cfg.max_epochs,
                "step": info["step"],
                "steps": info["steps"],
                "loss": info["loss"],
                "images_per_s": info["images_per_s"],
                "eta_s": elapsed / done * (total - done),
            }
            job.curve.append([done, info["loss"]])

        def on_epoch(stats: dict[str, Any]) -> None:
            job.history.append(stats)
            check_cancel(job)

        result = train(
            cfg, overwrite=overwrite, progress=False,
            on_batch_end=on_batch, on_epoch_end=on_epoch,
        )  # fmt: skip
        weights = Path(result.weights_path)
        return {
            "weights": weights.relative_to(root).as_posix(),
            "config": Path(result.config_path).relative_to(root).as_posix(),
            "loss_png": weights.with_suffix(".loss.png").relative_to(root).as_posix(),
            "epochs_run": result.epochs_run,
            "train_loss": result.history[-1]["train_loss"],
            "files": result.files,
            "skipped": len(result.skipped),
        }

    return work


# ------------------------------------------------------------------ embedding
class _ModelCache:
    """Loaded models by (path, mtime): an .onnx session, or a torch .pth model."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._cache: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()

    def get(self, path: Path) -> Any:
        key = (str(path), path.stat().st_mtime_ns)
        with self._lock:
            if key not in self._cache:
                self._cache = {k: v for k, v in self._cache.items() if k[0] != key[0]}
                self._cache[key] = self._load(path)
            return self._cache[key]

    def _load(self, path: Path) -> Any:
        if path.suffix.lower() == ".onnx":
            from catchment_mae.runtime import (
                create_session,
                read_metadata,
                spec_from_metadata,
            )

            sess = create_session(path, "cpu" if self.device == "cpu" else "auto")
            return ("onnx", sess, spec_from_metadata(read_metadata(sess, path)))
        try:
            from catchment_mae.model import load_model
        except ImportError as e:
            raise Refused(
                400,
                "model_path: a .pth needs torch on the server; export it to .onnx",
                "model_path",
            ) from e

        model, cfg = load_model(path)
        return ("torch", model, cfg.preprocess_spec())


def _embed_request() -> tuple[np.ndarray, Any, str]:
    """The embedding of the request's image with its model (shared by both
    /embed routes)."""
    from catchment_mae.preprocess import load_sample

    params = _params()
    s = _state().settings
    model_path = _model_path(params, {".pth", ".onnx"})
    upload = request.files.get("image")
    tmp_dir = None
    try:
        if upload is not None and upload.filename:
            tmp_dir = Path(tempfile.mkdtemp(dir=s.upload_dir))
            image = tmp_dir / "upload.tif"
            upload.save(image)
            label = upload.filename
        else:
            image = confine(s.data_root, params.get("image_path"), "image_path",
                            "--data-root")  # fmt: skip
            if not image.is_file():
                raise Refused(400, "image_path: not a file", "image_path")
            label = str(params.get("image_path"))
        field = "image" if tmp_dir else "image_path"
        try:
            check_file(image)  # not a TIFF: refused before any model is loaded
        except BadRasterError as e:
            raise Refused(400, f"{field}: {label}: {e.reason}", field) from e
        try:
            kind, model, spec = _state().models.get(model_path)
        except CmaeError as e:
            raise Refused(400, f"model_path: {e}", "model_path") from e
        try:
            sample = load_sample(image, spec)
        except BadRasterError as e:
            raise Refused(400, f"{label}: {e.reason}", field) from e
        vector = _run(kind, model, sample)
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    rel = model_path.relative_to(s.model_root).as_posix()
    return vector, sample, rel


def _run(kind: str, model: Any, sample: Any) -> np.ndarray:
    if kind == "onnx":
        from catchment_mae.runtime import run_encoder

        return run_encoder(
            model, sample.image[None], sample.scale[None], sample.valid[None]
        )[0]
    import torch

    with torch.inference_mode():
        return (
            model.embed(
                torch.from_numpy(sample.image[None]),
                torch.from_numpy(sample.scale[None]),
            )[0]
            .float()
            .numpy()
        )


def _preview_png(sample: Any, size: int = 160) -> str:
    """The first channel as the model saw it, nodata transparent: a data URL."""
    import imagecodecs

    img = sample.image[0]
    valid = sample.valid[0] > 0.5
    values = img[valid] if valid.any() else img.reshape(-1)
    lo, hi = np.percentile(values, [2, 98]) if values.size else (0.0, 1.0)
    grey = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    rgba = np.dstack([grey, grey, grey, np.where(valid, 255, 0)]).astype(np.uint8)
    k = max(1, size // rgba.shape[0])
    rgba = np.repeat(np.repeat(rgba, k, axis=0), k, axis=1)
    png = imagecodecs.png_encode(np.ascontiguousarray(rgba))
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _embed_dir_work(src: Path, model: Path, out: Path, overwrite: bool):
    root = _state().settings.model_root

    def work(job: Job) -> dict[str, Any]:
        from catchment_mae.batch.runner import embed_dir

        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        job.progress = {"done": 0}

        def on_item(item: Any) -> None:
            check_cancel(job)
            n = job.progress["done"] + 1
            job.progress = {
                "done": n,
                "failed": job.progress.get("failed", 0) + (item.error is not None),
                "rasters_per_s": n / max(time.perf_counter() - start, 1e-9),
            }

        summary = embed_dir(src, model, out, overwrite=overwrite, on_item=on_item)
        return {
            "out": out.relative_to(root).as_posix(),
            "summary": summary.line(),
            "embedded": summary.embedded,
            "failed": summary.failed,
            "rows": summary.rows,
        }

    return work


# --------------------------------------------------------------------- lists
def _list_data(root: Path, limit: int = 500) -> dict[str, Any]:
    dirs, tiffs = ["."], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        dirs += [(rel / d).as_posix() for d in dirnames]
        tiffs += [(rel / f).as_posix() for f in sorted(filenames) if is_tiff_name(f)]
        if len(dirs) + len(tiffs) > limit:
            break
    return {"root": str(root), "dirs": dirs[:limit], "tiffs": tiffs[:limit]}


def _list_models(root: Path) -> list[dict[str, Any]]:
    import json

    out = []
    for path in sorted(root.rglob("*")):
        suffix = path.suffix.lower()
        if suffix not in (".pth", ".onnx") or path.name.endswith(".ckpt.pth"):
            continue
        rel = path.relative_to(root).as_posix()
        entry: dict[str, Any] = {
            "path": rel,
            "kind": suffix[1:],
            "size": path.stat().st_size,
            "modified": path.stat().st_mtime,
            "download": f"/api/models/download?path={rel}",
        }
        cfg_path = path.with_suffix(".json")
        if suffix == ".pth" and cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text())
            except (OSError, ValueError):
                cfg = {}
            entry["config"] = {
                k: cfg.get(k)
                for k in (
                    "vit_model_name",
                    "image_size",
                    "in_chans",
                    "max_epochs",
                    "norm",
                    "bands",
                    "embed_dim",
                    "depth",
                )  # fmt: skip
            }
            onnx = path.with_suffix(".onnx")
            entry["onnx"] = onnx.relative_to(root).as_posix() if onnx.exists() else None
        out.append(entry)
    return out
