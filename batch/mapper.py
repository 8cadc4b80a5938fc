"""Mapper stage: the onnxruntime session that turns ring slots into embeddings.

It owns the session and what the model says about itself (its preprocessing,
input names, embedding width, the table's metadata), and embeds a batch of the
reader's ring as it lies there (a view: no copy on the CPU). No torch here.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from catchment_mae import __version__
from catchment_mae.batch.reader import Batch
from catchment_mae.batch.ring import SlotRing
from catchment_mae.batch.writer import Row
from catchment_mae.io import sha256_file
from catchment_mae.preprocess import VALID_LEVELS, PreprocessSpec
from catchment_mae.runtime import (
    ONNX_FORMAT_VERSION,
    create_session,
    read_metadata,
    run_encoder,
    spec_from_metadata,
)
from catchment_mae.workers import failure_reason

CUDA = "CUDAExecutionProvider"


class Mapper:
    """An exported encoder, ready to embed batches.

    Args:
        model: an ``.onnx`` written by ``cmae export``.
        device: "auto", "cpu" or "cuda".
        threads: onnxruntime's intra-op threads.
    """

    def __init__(
        self, model: str | os.PathLike[str], device: str, threads: int | None
    ) -> None:
        # On the CPU the readers need the cores between runs: no spinning.
        self.session = create_session(model, device, threads=threads, spinning=False)
        self.provider: str = self.session.get_providers()[0]
        meta = read_metadata(self.session, model)
        self.spec: PreprocessSpec = spec_from_metadata(meta)
        self.names = [i.name for i in self.session.get_inputs()]
        self.dim = int(meta["embedding_dim"])
        self.metadata = {
            "cmae_version": __version__,
            "cmae_format_version": str(ONNX_FORMAT_VERSION),
            "model": Path(model).name,
            "model_sha256": sha256_file(model),
            "model_metadata": meta,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self.inference_seconds = 0.0

    @property
    def sha256(self) -> str:
        """The model file's sha256: rows of another model are never mixed in."""
        return str(self.metadata["model_sha256"])

    @property
    def on_gpu(self) -> bool:
        return self.provider == CUDA

    @property
    def device_name(self) -> str:
        return "CUDA" if self.on_gpu else "the CPU"

    def rows(self, batch: Batch, ring: SlotRing) -> list[tuple[Row, Any]]:
        """Every file's row with its embedding (None for a failure), in order. An
        onnxruntime error fails the batch's good files with its reason."""
        embeddings: dict[int, np.ndarray] = {}
        if batch.good:
            t0 = time.perf_counter()
            try:
                out = self.embed(ring, batch.rows)
            except Exception as e:  # onnxruntime's error types vary; record them
                reason = f"onnxruntime failed: {failure_reason(e)}"
                for it in batch.good:
                    it.row.error = reason
            else:
                embeddings = {id(it): out[k] for k, it in enumerate(batch.good)}
            self.inference_seconds += time.perf_counter() - t0
        return [(it.row, embeddings.get(id(it))) for it in batch.items]

    def embed(self, ring: SlotRing, rows: slice) -> np.ndarray:
        """(n, D) embeddings of ring slots ``rows``, fed as views of the ring."""
        return self.encode(ring.image[rows], ring.scale[rows], ring.valid[rows])

    def encode(
        self, image: np.ndarray, scale: np.ndarray, valid_levels: np.ndarray
    ) -> np.ndarray:
        """(n, D) embeddings of model inputs (``valid_levels`` as uint8)."""
        valid = None
        if "valid" in self.names:  # a --pool mean encoder weighs by validity
            valid = valid_levels.astype(np.float32) / VALID_LEVELS
        return run_encoder(self.session, image, scale, valid)
