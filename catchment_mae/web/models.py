"""The models the web UI has loaded, one per file and modification time."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any

from catchment_mae.errors import CmaeError
from catchment_mae.web.security import Refused, as_named, confine, held


class ModelCache:
    """Loaded models by (path, mtime): an .onnx session, or a torch .pth model.
    The files are opened inside --model-root (security.held) and read through
    their descriptors, the .pth's NAME.json too."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._cache: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()

    def get(self, root: Path, path: Path) -> Any:
        with contextlib.ExitStack() as stack:
            weights = stack.enter_context(held(root, path, "model_path"))
            config = None
            if path.suffix.lower() == ".pth":
                sidecar = confine(root, str(path.with_suffix(".json")),
                                  "model_path", "--model-root")  # fmt: skip
                config = stack.enter_context(held(root, sidecar, "model_path"))
            key = (str(path), os.stat(weights).st_mtime_ns)
            with self._lock:
                if key not in self._cache:
                    self._cache = {
                        k: v for k, v in self._cache.items() if k[0] != key[0]
                    }
                    try:
                        self._cache[key] = self._load(path, weights, config)
                    except CmaeError as e:  # named as the request named it
                        names = {weights: path.name}
                        if config is not None:
                            names[config] = sidecar.name
                        text = as_named(str(e), names)
                        raise Refused(400, f"model_path: {text}", "model_path") from e
                return self._cache[key]

    def _load(self, path: Path, weights: Path, config: Path | None) -> Any:
        if path.suffix.lower() == ".onnx":
            from catchment_mae.runtime import (
                create_session,
                read_metadata,
                spec_from_metadata,
            )

            device = "cpu" if self.device == "cpu" else "auto"
            sess = create_session(weights, device)
            return ("onnx", sess, spec_from_metadata(read_metadata(sess, path)))
        try:
            from catchment_mae.model import load_model
        except ImportError as e:
            raise Refused(
                400,
                "model_path: a .pth needs torch on the server; export it to .onnx",
                "model_path",
            ) from e

        from catchment_mae.model import embedder

        model, cfg = load_model(weights, config)
        return ("torch", embedder(model, cfg), cfg.preprocess_spec())
