"""What every route of the web UI shares: its state, request parsing, confinement."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import Response, current_app, jsonify, request

from catchment_mae.web.jobs import JobManager
from catchment_mae.web.security import Refused, confine

# A model or table name: no folders, no leading dot, nothing after it.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
JSON_LIMIT = 1 << 20  # bytes of a JSON body (uploads have --max-upload-mb)
FORM_FIELD_LIMIT = 64 << 10  # bytes of one form field that is not a file
FORM_PARTS_LIMIT = 100  # parts of a multipart body
# Nesting of a JSON body: a body nested 100,000 deep made the parser recurse out.
JSON_DEPTH_LIMIT = 32
# A field's text and list lengths: job records keep the fields, and GET /api/jobs
# answers them all (strings of 0.9 MB each once made it answer 46 MB).
FIELD_TEXT_LIMIT = 4096
FIELD_LIST_LIMIT = 256


@dataclass
class Settings:
    """What ``cmae serve`` was started with."""

    data_root: Path
    model_root: Path
    token: str | None = None
    allowed_hosts: set[str] | None = None  # None: any Host header
    max_upload_mb: int = 256
    device: str = "auto"
    upload_dir: Path = field(default_factory=Path)


class State:
    """The app's settings, jobs and loaded models (one per app)."""

    def __init__(self, settings: Settings) -> None:
        from catchment_mae.web.models import ModelCache

        self.settings = settings
        self.jobs = JobManager()
        self.models = ModelCache(settings.device)


def state() -> State:
    return current_app.extensions["cmae"]


def settings() -> Settings:
    return state().settings


# ----------------------------------------------------------------- requests
def params(known: tuple[str, ...]) -> dict[str, Any]:
    """The request's fields among ``known`` (a JSON object or a form); others
    are ignored, never stored."""
    if request.is_json:
        if (request.content_length or 0) > JSON_LIMIT:
            raise Refused(413, f"JSON body larger than {JSON_LIMIT >> 10} kB")
        raw = request.get_data(cache=True)
        if len(raw) > JSON_LIMIT:
            raise Refused(413, f"JSON body larger than {JSON_LIMIT >> 10} kB")
        if _depth(raw) > JSON_DEPTH_LIMIT:
            raise Refused(400, f"JSON body nested deeper than {JSON_DEPTH_LIMIT}")
        try:
            body = json.loads(raw or b"{}")
        except ValueError as e:
            raise Refused(400, f"body is not valid JSON ({e})") from e
        if not isinstance(body, dict):
            raise Refused(400, "JSON body must be an object of fields")
    else:
        if (
            not request.mimetype.startswith("multipart/")
            and (request.content_length or 0) > JSON_LIMIT
        ):  # the urlencoded parser holds the whole body, then more
            raise Refused(413, f"form larger than {JSON_LIMIT >> 10} kB")
        body = request.form
    values = {k: body[k] for k in known if k in body}
    for key, value in values.items():
        _check_field(key, value)
    return values


def _check_field(key: str, value: Any) -> None:
    """Refuses text that is no text (a lone surrogate, which JSON can carry and
    no file name can hold) and fields longer than a form ever needs."""
    if isinstance(value, list):
        if len(value) > FIELD_LIST_LIMIT:
            raise Refused(
                400, f"{key}: {len(value)} items, at most {FIELD_LIST_LIMIT}", key
            )
        for item in value:
            _check_field(key, item)
    elif isinstance(value, dict):
        raise Refused(400, f"{key}: a value, not an object", key)
    elif isinstance(value, str):
        if len(value) > FIELD_TEXT_LIMIT:
            raise Refused(
                400,
                f"{key}: {len(value)} characters, at most {FIELD_TEXT_LIMIT}",
                key,
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise Refused(
                400, f"{key}: not valid text (a lone surrogate)", key
            ) from None


def _depth(raw: bytes) -> int:
    """The deepest nesting of brackets in a JSON text (strings skipped)."""
    depth = most = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            most = max(most, depth)
            if most > JSON_DEPTH_LIMIT:
                return most
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return most


def error(message: str, status: int, field: str | None = None) -> tuple[Response, int]:
    body: dict[str, Any] = {"status": "error", "message": message}
    if field:
        body["field"] = field
    return jsonify(body), status


def name(values: dict[str, Any], key: str) -> str:
    value = str(values.get(key) or "").strip()
    if value.lower().endswith((".pth", ".parquet", ".onnx")):
        value = value.rsplit(".", 1)[0]
    if not NAME_RE.fullmatch(value):
        raise Refused(
            400,
            f"{key}: use letters, digits, '.', '_' or '-' (no folders), got {value!r}",
            key,
        )
    return value


def dataset(values: dict[str, Any]) -> Path:
    s = settings()
    path = confine(s.data_root, values.get("dataset"), "dataset", "--data-root")
    if not path.is_dir():
        raise Refused(400, "dataset: not a directory", "dataset")
    return path


def model_path(values: dict[str, Any], suffixes: set[str]) -> Path:
    return file_of(values, "model_path", suffixes, models=True)


def file_of(
    values: dict[str, Any], field: str, suffixes: set[str], models: bool = False
) -> Path:
    """The file ``values[field]`` names inside --data-root (``models``: inside
    --model-root), one of ``suffixes``; 400 otherwise."""
    s = settings()
    root, flag = (
        (s.model_root, "--model-root") if models else (s.data_root, "--data-root")
    )
    path = confine(root, values.get(field), field, flag)
    if path.suffix.lower() not in suffixes or not path.is_file():
        raise Refused(
            400,
            f"{field}: expected a {' or '.join(sorted(suffixes))} file, got "
            f"{values.get(field)!r}",
            field,
        )
    return path


def output(path: Path, field: str, folder: bool = False) -> Path:
    """``path``, which the server is about to write, checked to stay under
    --model-root: its folder resolves inside it, and ``path`` itself, if there,
    is not a symlink (a planted link would be written through); a ``folder``
    must itself resolve inside it."""
    root = settings().model_root
    try:
        inside = path.parent.resolve().is_relative_to(root)
        if folder:
            inside = inside and path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a loop, a name too long
        inside = False
    if not inside or (path.is_symlink() and not folder):
        raise Refused(
            400,
            f"{field}: {path.relative_to(root).as_posix()} would be written "
            "outside --model-root (a symlink there)",
            field,
        )
    return path


def flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value or "").strip().lower() in ("1", "true", "on", "yes")
