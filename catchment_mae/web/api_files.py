"""Routes that list and serve files: the data root, the models, downloads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, jsonify, request, send_file

from catchment_mae.raster import is_tiff_name
from catchment_mae.version import __version__
from catchment_mae.web.common import settings
from catchment_mae.web.security import Refused, confine, open_inside

bp = Blueprint("files", __name__)
SERVED = (".onnx", ".pth", ".json", ".png", ".parquet")


@bp.get("/api/health")
def health() -> Response:
    return jsonify(status="ok", version=__version__)


@bp.get("/api/data")
def data() -> Response:
    return jsonify(list_data(settings().data_root))


@bp.get("/api/models")
def models() -> Response:
    return jsonify(models=list_models(settings().model_root))


@bp.get("/api/models/download")
def download_model() -> Response:
    s = settings()
    path = confine(s.model_root, request.args.get("path"), "path", "--model-root")
    if path.suffix.lower() not in SERVED or not path.is_file():
        raise Refused(400, "path: only model files are served", "path")
    return send_inside(s.model_root, path, "path")


def send_inside(root: Path, path: Path, field: str) -> Response:
    """``path`` (inside ``root``) as a download, sent from the descriptor it
    was opened by (security.open_inside), so a swap after the check sends
    nothing from elsewhere."""
    fd = open_inside(root, path, field)
    return send_file(
        os.fdopen(fd, "rb"), as_attachment=True, download_name=path.name,
        last_modified=os.fstat(fd).st_mtime,
    )  # fmt: skip


def list_data(root: Path, limit: int = 500) -> dict[str, Any]:
    """Folders, TIFFs and zones files under ``root`` (not following symlinks,
    no dot-folders)."""
    from catchment_mae.web.api_zones import ZONE_SUFFIXES

    dirs, tiffs, zones = ["."], [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        dirs += [(rel / d).as_posix() for d in dirnames]
        tiffs += [(rel / f).as_posix() for f in sorted(filenames) if is_tiff_name(f)]
        zones += [
            (rel / f).as_posix()
            for f in sorted(filenames)
            if f.lower().endswith(ZONE_SUFFIXES)
        ]
        if len(dirs) + len(tiffs) + len(zones) > limit:
            break
    return {
        "root": str(root),
        "dirs": dirs[:limit],
        "tiffs": tiffs[:limit],
        "zones": zones[:limit],
    }


def list_models(root: Path, limit: int = 500) -> list[dict[str, Any]]:
    """The .pth and .onnx files under ``root`` (not following symlinks, no
    dot-folders such as the cache), with a few keys of each .pth's config."""
    out: list[dict[str, Any]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            suffix = path.suffix.lower()
            if suffix not in (".pth", ".onnx") or filename.endswith(".ckpt.pth"):
                continue
            if path.is_symlink() or len(out) >= limit:
                continue
            out.append(_describe(path, root))
    return sorted(out, key=lambda e: e["path"])


def _describe(path: Path, root: Path) -> dict[str, Any]:
    rel = path.relative_to(root).as_posix()
    st = path.stat()
    entry: dict[str, Any] = {
        "path": rel,
        "kind": path.suffix.lower()[1:],
        "size": st.st_size,
        "modified": st.st_mtime,
        "download": f"/api/models/download?path={rel}",
    }
    cfg_path = path.with_suffix(".json")
    if entry["kind"] == "pth" and cfg_path.is_file() and not cfg_path.is_symlink():
        try:  # opened without following a link that took its place
            with os.fdopen(open_inside(root, cfg_path, "path"), "rb") as f:
                cfg = json.loads(f.read(1 << 20))
        except (Refused, OSError, ValueError):
            cfg = {}
        if not isinstance(cfg, dict):
            cfg = {}
        keys = ("vit_model_name", "image_size", "in_chans", "max_epochs", "norm",
                "bands", "embed_dim", "depth")  # fmt: skip
        entry["config"] = {k: cfg.get(k) for k in keys}
        onnx = path.with_suffix(".onnx")
        entry["onnx"] = onnx.relative_to(root).as_posix() if onnx.exists() else None
    return entry
