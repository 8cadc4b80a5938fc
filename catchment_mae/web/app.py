"""``cmae serve``: the original tool's web UI (train, export, embed) made safe.

A Flask app over the library: training is ``trainer.train``, export is
``export.onnx.export_encoder``, embedding is the shared ``load_sample`` plus
onnxruntime (or the torch model for a ``.pth``), embed-dir is
``batch.runner.embed_dir``. Nothing is implemented twice here. The routes live
in one blueprint per concern: ``pages`` (/, /jobs/ID), ``api_files`` (lists and
downloads), ``api_train`` (train, export), ``api_embed`` (/embed, /api/embed,
/api/embed-dir), ``api_jobs`` (watch, cancel, collect); this module builds the
app and guards every request.

Every answer of the API is JSON; errors are ``{"status": "error", "message":
..., "field": ...}`` with a 4xx code (5xx only for our own bugs), never a
traceback. See ``security.py`` for what is refused and why.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlencode

from flask import Flask, Response, redirect, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from catchment_mae.errors import CmaeError
from catchment_mae.web import (
    api_embed,
    api_files,
    api_jobs,
    api_train,
    api_zones,
    pages,
)
from catchment_mae.web.common import (
    FORM_FIELD_LIMIT,
    FORM_PARTS_LIMIT,
    Settings,
    State,
    error,
    settings,
)
from catchment_mae.web.jobs import Busy, LockUnavailable
from catchment_mae.web.security import (
    Refused,
    check_host,
    check_same_origin,
    check_token,
)

log = logging.getLogger(__name__)

TOKEN_COOKIE = "cmae_token"
# What the pages load: our own script and style only.
CSP = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


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
    for flag, root in (("--data-root", data_root), ("--model-root", model_root)):
        if not Path(root).is_dir():
            raise CmaeError(f"{flag} {root}: not a directory")
    settings = Settings(
        data_root=Path(data_root).resolve(),
        model_root=Path(model_root).resolve(),
        token=token,
        allowed_hosts=allowed_hosts,
        max_upload_mb=max_upload_mb,
        device=device,
        upload_dir=_temp_dir(),
    )
    app = Flask(__name__)
    app.json.sort_keys = False  # keys in the original tool's order: status first
    app.config["MAX_CONTENT_LENGTH"] = max_upload_mb * 2**20
    app.config["MAX_FORM_MEMORY_SIZE"] = FORM_FIELD_LIMIT
    app.config["MAX_FORM_PARTS"] = FORM_PARTS_LIMIT
    app.url_map.merge_slashes = False  # '//x' is a 404, not an HTML redirect
    app.extensions["cmae"] = State(settings)
    blueprints = (pages.bp, api_files.bp, api_train.bp, api_embed.bp, api_zones.bp,
                  api_jobs.bp)  # fmt: skip
    for blueprint in blueprints:
        app.register_blueprint(blueprint)
    app.before_request(_guard)
    app.after_request(_headers)
    _error_handlers(app)
    return app


def _temp_dir() -> Path:
    """Uploads land here, one folder per request, removed after use and at exit."""
    path = Path(tempfile.mkdtemp(prefix="cmae-uploads-"))
    atexit.register(shutil.rmtree, path, True)
    return path


# ------------------------------------------------------------------ guards
def _guard() -> Response | None:
    s = settings()
    check_host(request.host, s.allowed_hosts)
    from_url = request.args.get("token")
    if s.token and from_url is not None and _is_page():
        # The printed URL, opened once: keep the token in a cookie, and take it
        # out of the address bar (histories, proxies and logs keep URLs).
        check_token(s.token, from_url)
        rest = {k: v for k, v in request.args.items() if k != "token"}
        target = request.path + (f"?{urlencode(rest)}" if rest else "")
        response = redirect(target, code=303)
        response.set_cookie(TOKEN_COOKIE, s.token, httponly=True, samesite="Strict")
        return response
    given = (
        _bearer(request.headers.get("Authorization"))
        or request.headers.get("X-Cmae-Token")
        or request.cookies.get(TOKEN_COOKIE)
    )
    check_token(s.token, given)
    check_same_origin(
        request.method,
        request.headers.get("Origin"),
        request.headers.get("Sec-Fetch-Site"),
        request.host,
    )
    return None


def _is_page() -> bool:
    return request.method == "GET" and not request.path.startswith(("/api/", "/embed"))


def _headers(response: Response) -> Response:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("Content-Security-Policy", CSP)
    if not request.path.startswith("/static/"):
        # Downloads too (send_file says no-cache: kept, but revalidated).
        response.headers["Cache-Control"] = "no-store"
    return response


def _bearer(header: str | None) -> str | None:
    if header and header.lower().startswith("bearer "):
        return header[7:].strip()
    return None


# ------------------------------------------------------------------ errors
def _error_handlers(app: Flask) -> None:
    @app.errorhandler(Refused)
    def refused(e: Refused) -> tuple[Response, int]:
        return error(e.message, e.status, e.field)

    @app.errorhandler(Busy)
    def busy(e: Busy) -> tuple[Response, int]:
        return error(str(e), 409)

    @app.errorhandler(LockUnavailable)
    def no_lock(e: LockUnavailable) -> tuple[Response, int]:
        return error(str(e), 503)

    @app.errorhandler(CmaeError)
    def library_error(e: CmaeError) -> tuple[Response, int]:
        return error(str(e), 400)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(e: RequestEntityTooLarge) -> tuple[Response, int]:
        s = settings()
        if (request.content_length or 0) > s.max_upload_mb * 2**20:
            return error(
                f"upload larger than {s.max_upload_mb} MB (--max-upload-mb)", 413
            )
        return error(
            f"form refused: more than {FORM_PARTS_LIMIT} parts, or a field "
            f"other than a file larger than {FORM_FIELD_LIMIT >> 10} kB",
            413,
        )

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> tuple[Response, int]:
        return error(f"{e.name}: {e.description}", e.code or 500)

    @app.errorhandler(RecursionError)
    def too_deep(e: RecursionError) -> tuple[Response, int]:
        return error("request nested too deeply", 400)

    @app.errorhandler(Exception)
    def internal(e: Exception) -> tuple[Response, int]:
        first = (str(e).strip().splitlines() or [""])[0]
        message = f"internal error: {type(e).__name__}: {first}"
        log.error("%s %s: %s (details with -v)", request.method, request.path, message)
        log.debug("traceback", exc_info=True)
        return error(message, 500)
