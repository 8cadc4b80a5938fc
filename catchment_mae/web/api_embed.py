"""Routes that embed: one raster (the original POST /embed and POST /api/embed)
and a whole directory into a Parquet table (a background job)."""

from __future__ import annotations

import base64
import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from flask import Blueprint, Response, jsonify, request

from catchment_mae.errors import BadRasterError, CmaeError
from catchment_mae.raster import check_file
from catchment_mae.web import common
from catchment_mae.web.common import settings, state
from catchment_mae.web.jobs import Job, check_cancel
from catchment_mae.web.security import Refused, as_named, confine, held

bp = Blueprint("embed", __name__)
EMBED_FIELDS = ("model_path", "image_path")
EMBED_DIR_FIELDS = ("dataset", "model_path", "name", "overwrite")


@bp.post("/embed")
def original_embed() -> Response:
    """The original tool's contract: form fields model_path and image_path."""
    vector, _, _ = _embed_request()
    return jsonify(
        status="success", embedding=[float(v) for v in vector], shape=[len(vector)]
    )


@bp.post("/api/embed")
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
        preview=preview_png(sample),
    )


@bp.post("/api/embed-dir")
def start_embed_dir() -> tuple[Response, int]:
    values = common.params(EMBED_DIR_FIELDS)
    data_root = settings().data_root
    src = common.dataset(values)
    model = common.model_path(values, {".onnx"})
    out = table_output(common.name(values, "name"))
    overwrite = common.flag(values.get("overwrite"))

    def run(target: Path, on_item: Any) -> Any:
        from catchment_mae.batch.runner import embed_dir

        return embed_dir(src, model, target, overwrite=overwrite,
                         within=data_root, on_item=on_item)  # fmt: skip

    job = state().jobs.start("embed-dir", values, table_work(out, run))
    return jsonify(status="started", job=job.id, url=f"/jobs/{job.id}"), 202


def table_output(name: str) -> Path:
    """Where a job's table ``name`` goes: ``embeddings/NAME.parquet`` under
    --model-root, its parts and lock beside it, all checked to stay inside."""
    s = settings()
    folder = common.output(s.model_root / "embeddings", "name", folder=True)
    try:
        folder.mkdir(exist_ok=True)
    except OSError as e:
        raise Refused(
            400, f"name: cannot make {folder.name}: {e.strerror}", "name"
        ) from e
    out = common.output(folder / f"{name}.parquet", "name")
    for extra in (
        out.with_name(out.name + ".parts"),
        out.with_name(f".{out.name}.lock"),
    ):
        common.output(extra, "name")
    return out


def _embed_request() -> tuple[np.ndarray, Any, str]:
    """The embedding of the request's image with its model (shared by both
    /embed routes)."""
    from catchment_mae.preprocess import load_sample

    values = common.params(EMBED_FIELDS)
    s = settings()
    model_path = common.model_path(values, {".pth", ".onnx"})
    upload = request.files.get("image")
    tmp_dir = None
    stack = contextlib.ExitStack()
    try:
        if upload is not None and upload.filename:
            tmp_dir = Path(tempfile.mkdtemp(dir=s.upload_dir))
            image = tmp_dir / "upload.tif"
            upload.save(image)
            label = upload.filename
        else:
            image = confine(s.data_root, values.get("image_path"), "image_path",
                            "--data-root")  # fmt: skip
            if not image.is_file():
                raise Refused(400, "image_path: not a file", "image_path")
            label = str(values.get("image_path"))
            # What was checked is what is read: through its descriptor.
            image = stack.enter_context(held(s.data_root, image, "image_path"))
        field = "image" if tmp_dir else "image_path"
        try:
            check_file(image)  # not a TIFF: refused before any model is loaded
        except BadRasterError as e:
            raise Refused(400, f"{field}: {label}: {e.reason}", field) from e
        kind, model, spec = state().models.get(s.model_root, model_path)
        try:
            sample = load_sample(image, spec)
        except BadRasterError as e:
            raise Refused(400, f"{label}: {e.reason}", field) from e
        vector = _run(kind, model, sample)
    finally:
        stack.close()
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
            model(
                torch.from_numpy(sample.image[None]),
                torch.from_numpy(sample.scale[None]),
                torch.from_numpy(sample.valid[None]),
            )[0]
            .float()
            .numpy()
        )


def preview_png(sample: Any, size: int = 160) -> str:
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


def table_work(out: Path, run: Any) -> Any:
    """A job that writes the table ``out`` by ``run(target, on_item)`` (a run
    of batch.runner), its progress kept on the job."""
    s = settings()

    def work(job: Job) -> dict[str, Any]:
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

        # The table, its parts and its lock are written into the folder held
        # here, whatever its name leads to later (a link that leads out).
        with contextlib.ExitStack() as stack:
            try:
                folder = stack.enter_context(
                    held(s.model_root, out.parent, "name", directory=True)
                )
            except Refused as e:  # a job's failure is a library error's line
                raise CmaeError(e.message) from e
            try:
                summary = run(folder / out.name, on_item)
            except CmaeError as e:
                where = out.parent.relative_to(s.model_root).as_posix()
                raise CmaeError(as_named(str(e), {folder: where})) from e
        return {
            "out": out.relative_to(s.model_root).as_posix(),
            "summary": summary.line(),
            "embedded": summary.embedded,
            "failed": summary.failed,
            "rows": summary.rows,
        }

    return work
