"""Mapper stage: the onnxruntime session that turns ring slots into embeddings.

It owns the session and what the model says about itself (its preprocessing,
input names, embedding width, the table's metadata), and embeds a batch of the
reader's ring as it lies there (a view: no copy on the CPU). No torch here.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from catchment_mae.batch import schema as table
from catchment_mae.batch.ring import SlotRing
from catchment_mae.io import sha256_file
from catchment_mae.preprocess import VALID_LEVELS
from catchment_mae.runtime import (
    CUDA,
    ONNX_FORMAT_VERSION,
    MetaKey,
    create_session,
    read_metadata,
    run_encoder,
    session_providers,
    spec_from_metadata,
)
from catchment_mae.spec import PreprocessSpec
from catchment_mae.version import __version__
from catchment_mae.workers import failure_reason

log = logging.getLogger(__name__)


class Mapper:
    """An exported encoder, ready to embed batches.

    A CUDA session loads in a thread: onnxruntime's CUDA provider, cuBLAS, cuDNN
    and the CUDA context take long to load, and the readers need only what the
    model says about itself, which a CPU session of the file built without graph
    optimisation gives at once. The caller plans and reads meanwhile; the first
    batch waits for the session (an interrupted run also waits for it before
    the process ends). A CPU session is built here, at once. If CUDA's provider
    then does not load ("auto"), ``gpu`` turns False and a warning says so.

    Args:
        model: an ``.onnx`` written by ``cmae export``.
        device: "auto", "cpu" or "cuda".
        threads: onnxruntime's intra-op threads.
        background: load the session in a thread (default: for CUDA).
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        device: str,
        threads: int | None,
        background: bool | None = None,
    ) -> None:
        # Where the session will run, decided before it exists; "auto" still
        # falls back to the CPU if the CUDA provider then fails to load.
        self.gpu = session_providers(device)[0] == CUDA
        if background is None:
            background = self.gpu
        self._background = background
        # Told CUDA (the caller logs it before the session exists): if it then
        # does not load, wait() says so.
        self._told = not (background and self.gpu)
        self.session_seconds = 0.0  # building the session (in its thread or here)
        self._session: Future = Future()
        # On the CPU the readers need the cores between runs: no spinning.
        load = (model, device, threads, False)
        if background:
            probe = create_session(model, "cpu", threads=1, optimise=False)
        else:
            self._load(*load)
            probe = self._session.result()
        meta = read_metadata(probe, model)
        self.spec: PreprocessSpec = spec_from_metadata(meta)
        self.names = [i.name for i in probe.get_inputs()]
        del probe
        self.dim = int(meta[MetaKey.EMBEDDING_DIM])
        self.metadata = {
            table.CMAE_VERSION: __version__,
            table.FORMAT_VERSION: str(ONNX_FORMAT_VERSION),
            table.MODEL: Path(model).name,
            table.MODEL_SHA256: sha256_file(model),
            table.MODEL_METADATA: meta,
            table.CREATED: datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self.inference_seconds = 0.0
        self.wait_seconds = 0.0  # the caller's time waiting for the session
        if background:  # a cmae encoder, all read: load it for real
            threading.Thread(target=self._load, args=load, name="cmae-session").start()

    def _load(self, *args: Any) -> None:
        t0 = time.perf_counter()
        try:
            session = create_session(*args)
        except BaseException as e:  # said where the session is first needed
            self.session_seconds = time.perf_counter() - t0
            self._session.set_exception(e)
        else:
            self.session_seconds = time.perf_counter() - t0
            # "auto" without CUDA after all: the CPU's schedule from now on (the
            # caller was told CUDA; wait() corrects that where it is needed).
            self.gpu = self.gpu and session.get_providers()[0] == CUDA
            self._session.set_result(session)

    def wait(self) -> None:
        """Waits for the session to be loaded.

        Raises:
            ModelFileError, CmaeError: it could not be loaded.
        """
        if not self._session.done():
            t0 = time.perf_counter()
            try:
                self._session.result()
            finally:
                self.wait_seconds += time.perf_counter() - t0
        self._session.result()
        if not self.gpu and not self._told:
            log.warning("the CUDA provider did not load; embedding on the CPU")
            self._told = True

    @property
    def session(self) -> Any:
        """The onnxruntime session (waits for it, as :meth:`wait`)."""
        return self._session.result()

    @property
    def provider(self) -> str:
        """The provider that runs the session (waits for it)."""
        return str(self.session.get_providers()[0])

    @property
    def sha256(self) -> str:
        """The model file's sha256: rows of another model are never mixed in."""
        return str(self.metadata[table.MODEL_SHA256])

    @property
    def device_name(self) -> str:
        return "CUDA" if self.gpu else "the CPU"

    def embed_slots(
        self, ring: SlotRing, rows: slice
    ) -> tuple[np.ndarray | None, str | None]:
        """(the (n, D) embeddings of ring slots ``rows``, None), or (None, the
        reason) where onnxruntime fails on them. A session that failed to load
        raises (it ends the run)."""
        self.wait()
        t0 = time.perf_counter()
        try:
            return self.embed(ring, rows), None
        except Exception as e:  # onnxruntime's error types vary; record them
            return None, f"onnxruntime failed: {failure_reason(e)}"
        finally:
            self.inference_seconds += time.perf_counter() - t0

    def embed(self, ring: SlotRing, rows: slice) -> np.ndarray:
        """(n, D) embeddings of ring slots ``rows``, fed as views of the ring."""
        return self.encode(ring.image[rows], ring.scale[rows], ring.valid[rows])

    def encode(
        self, image: np.ndarray, scale: np.ndarray, valid_levels: np.ndarray
    ) -> np.ndarray:
        """(n, D) embeddings of model inputs (``valid_levels`` as uint8)."""
        valid = None
        if "valid" in self.names:  # pool mean, or an encoder that sees validity
            valid = valid_levels.astype(np.float32) / VALID_LEVELS
        return run_encoder(self.session, image, scale, valid)
