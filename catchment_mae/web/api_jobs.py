"""Routes that watch, cancel and collect the web UI's background jobs."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from catchment_mae.web.api_files import send_inside
from catchment_mae.web.common import output, settings, state
from catchment_mae.web.jobs import Job
from catchment_mae.web.security import Refused

bp = Blueprint("jobs", __name__)


@bp.get("/api/jobs")
def jobs() -> Response:
    return jsonify(jobs=[job_dict(j) for j in state().jobs.all()])


@bp.get("/api/jobs/<job_id>")
def job(job_id: str) -> Response:
    return jsonify(job_dict(get_job(job_id)))


@bp.post("/api/jobs/<job_id>/cancel")
def cancel(job_id: str) -> Response:
    get_job(job_id)
    return jsonify(job_dict(state().jobs.cancel(job_id)))


@bp.get("/api/jobs/<job_id>/download")
def download(job_id: str) -> Response:
    j = get_job(job_id)
    if j.status != "done" or not j.result or "out" not in j.result:
        raise Refused(409, f"job {job_id} has nothing to download (yet)")
    root = settings().model_root
    path = output(root / j.result["out"], "job")
    if not path.is_file():
        raise Refused(
            404, f"job {job_id}: its table {j.result['out']} is no longer there"
        )
    return send_inside(root, path, "job")


def get_job(job_id: str) -> Job:
    j = state().jobs.get(job_id)
    if j is None:
        raise Refused(404, f"no job {job_id!r}")
    return j


def job_dict(j: Job) -> dict[str, Any]:
    d = j.to_dict()
    if j.status == "done" and j.result and "out" in j.result:
        d["download"] = f"/api/jobs/{j.id}/download"
    return d
