"""The web UI's HTML pages: the main page, the Catchments page and one page
per job."""

from __future__ import annotations

from flask import Blueprint, render_template

from catchment_mae.version import __version__
from catchment_mae.web.common import settings, state
from catchment_mae.web.security import Refused

bp = Blueprint("pages", __name__)


@bp.get("/")
def index() -> str:
    return _page("index.html")


@bp.get("/catchments")
def catchments() -> str:
    return _page("catchments.html")


def _page(template: str) -> str:
    """A page that names the server's roots."""
    s = settings()
    return render_template(
        template,
        version=__version__,
        data_root=str(s.data_root),
        model_root=str(s.model_root),
    )


@bp.get("/jobs/<job_id>")
def job_page(job_id: str) -> str:
    if state().jobs.get(job_id) is None:
        raise Refused(404, f"no job {job_id!r}")
    return render_template("job.html", version=__version__, job_id=job_id)
