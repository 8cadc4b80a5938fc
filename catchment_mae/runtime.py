"""onnxruntime sessions and the metadata of exported encoders (no torch).

Used by ``cmae export`` to validate, by the batch runner, and by downstream apps.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from catchment_mae.errors import CmaeError
from catchment_mae.spec import PreprocessSpec

log = logging.getLogger(__name__)

# Version of the metadata layout below. Readers accept this version and older
# ones they know; a newer file is refused with a clear message.
# 2: a scale vector of any length (scale_dim), a slope channel, the validity as
# an input of any encoder that sees it, and the scale vector after the pooled
# tokens in the embedding (embedding_layout). Encoders of format 1 read as they
# were trained: their preprocessing has none of these.
# 3: the slope's statistics in the scale vector (preprocess's slope_stats);
# encoders of format 2 have none.
ONNX_FORMAT_VERSION = 3
SUPPORTED_FORMAT_VERSIONS = (1, 2, 3)
CUDA = "CUDAExecutionProvider"


class MetaKey:
    """The keys of an exported encoder's metadata (``metadata_props``, every
    value a string, JSON where it is not a plain number or word): ``cmae
    export`` writes them; embed-dir, ``cmae info`` and any app read them."""

    FORMAT_VERSION = "cmae_format_version"
    CMAE_VERSION = "cmae_version"
    VIT_MODEL_NAME = "vit_model_name"
    IMAGE_SIZE = "image_size"
    IN_CHANS = "in_chans"
    BANDS = "bands"
    NORM = "norm"
    NORM_MEAN = "norm_mean"
    NORM_STD = "norm_std"
    RESIZE = "resize"
    SCALE = "scale"
    SCALE_DEFINITION = "scale_definition"
    SCALE_EPS = "scale_eps"
    SCALE_DIM = "scale_dim"
    SCALE_MEAN = "scale_mean"
    SCALE_STD = "scale_std"
    CHANNELS = "channels"
    EMBEDDING_LAYOUT = "embedding_layout"
    NODATA = "nodata"
    NODATA_POLICY = "nodata_policy"
    POOL = "pool"
    INPUTS = "inputs"
    EMBEDDING_DIM = "embedding_dim"
    WEIGHTS_SHA256 = "weights_sha256"
    PREPROCESS = "preprocess"
    CONFIG = "config"
    PRECISION = "precision"  # of the weights: fp32, fp16 or int8 (the variants)


class ModelFileError(CmaeError):
    """An .onnx file is missing, unreadable or not a cmae encoder."""


def _reason(e: BaseException) -> str:
    """onnxruntime's message without its status prefix and repeated path:
    "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from X failed:Protobuf
    parsing failed." becomes "Protobuf parsing failed."."""
    text = (str(e).strip().splitlines() or [""])[0]
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"^Load model from .* failed:\s*", "", text)
    return text.strip() or type(e).__name__


def create_session(
    path: str | os.PathLike[str],
    device: str = "cpu",
    threads: int | None = None,
    spinning: bool = True,
    optimise: bool = True,
) -> Any:
    """An InferenceSession with explicit providers.

    Args:
        path: the .onnx file.
        device: "cpu", "cuda" (fails unless the CUDA provider loads) or "auto"
            (CUDA when it loads, else the CPU).
        threads: onnxruntime's intra-op threads (default: its own choice).
        spinning: let idle intra-op threads busy-wait for the next operator
            (onnxruntime's default). Off where other processes need the cores
            between runs: beside embed-dir's readers, the spinning threads took
            half a core-second per 1,000 images of a small model.
        optimise: onnxruntime's graph optimisations (off for a session only
            read for its metadata).

    Returns:
        The session; ``session.get_providers()[0]`` says which provider runs it.
    """
    import onnxruntime as ort

    providers = session_providers(device)
    if not Path(path).is_file():
        what = "is a directory" if Path(path).is_dir() else "no such file"
        raise ModelFileError(f"{path}: {what} (an .onnx from cmae export)")
    _check_not_torch(path)
    opts = ort.SessionOptions()
    # A CUDA provider that cannot load (no GPU, no CUDA libraries) logs an error
    # per session; we report the fallback ourselves, in one line.
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimise:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(
            os.fspath(path), sess_options=opts, providers=providers
        )
    except Exception as e:  # onnxruntime raises its own exception types
        raise ModelFileError(f"{path}: onnxruntime cannot load it: {_reason(e)}") from e
    used = sess.get_providers()
    if device == "cuda" and CUDA not in used:
        raise CmaeError(
            "device cuda: the CUDA provider did not load (no GPU, or CUDA/cuDNN "
            "libraries missing)"
        )
    if providers[0] == CUDA and CUDA not in used:
        log.debug("the CUDA provider did not load; running on the CPU")
    return sess


def session_providers(device: str) -> list[str]:
    """The providers a session for ``device`` asks for, best first: CUDA's
    first where onnxruntime has it and an NVIDIA driver is present (it may still
    fail to load; "auto" then runs on the CPU).

    Raises:
        ValueError: an unknown device.
        CmaeError: "cuda" where this onnxruntime or machine has no CUDA.
    """
    import onnxruntime as ort

    if device not in ("cpu", "cuda", "auto"):
        raise ValueError(f"device must be cpu, cuda or auto, got {device!r}")
    available = ort.get_available_providers()
    want_cuda = device in ("cuda", "auto") and CUDA in available
    if device == "cuda" and not want_cuda:
        raise CmaeError(
            "device cuda: this onnxruntime has no CUDAExecutionProvider "
            f"(available: {', '.join(available)}); install onnxruntime-gpu"
        )
    if want_cuda and not cuda_driver_present():
        # onnxruntime-gpu lists the CUDA provider on every machine, and trying it
        # without a driver prints two error lines; with no driver, do not try.
        if device == "cuda":
            raise CmaeError("device cuda: no NVIDIA driver (libcuda) on this machine")
        want_cuda = False
    return [CUDA, "CPUExecutionProvider"] if want_cuda else ["CPUExecutionProvider"]


def _check_not_torch(path: str | os.PathLike[str]) -> None:
    """A .pth given where an .onnx is needed: say so, and how to get one."""
    import zipfile

    if os.path.isfile(path) and zipfile.is_zipfile(path):
        stem = os.path.splitext(os.fspath(path))[0]
        raise ModelFileError(
            f"{path}: a PyTorch checkpoint, not an ONNX encoder; export it first: "
            f"cmae export {path} --out {stem}.onnx"
        )


def run_encoder(session: Any, image: Any, scale: Any, valid: Any = None) -> Any:
    """The ``embedding`` output, (B, D), of an exported encoder for one batch.

    ``image`` (B, C, S, S) and ``scale`` (B, K) go to every encoder; ``valid``
    (B, 1, S, S) only to those that need it (``--pool mean``, or an encoder that
    sees where the raster has data).
    """
    feed = {"image": image, "scale": scale, "valid": valid}
    names = [i.name for i in session.get_inputs()]
    if "valid" in names and valid is None:
        raise ValueError("this encoder needs the valid mask as input")
    (embedding,) = session.run(["embedding"], {k: feed[k] for k in names})
    return embedding


def cuda_driver_present() -> bool:
    """Whether the NVIDIA driver library loads (no GPU, no driver: False)."""
    import ctypes
    import sys

    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True


def read_metadata(session: Any, where: Any = "model") -> dict[str, str]:
    """The cmae metadata (``metadata_props``) of an exported encoder's session."""
    meta = dict(session.get_modelmeta().custom_metadata_map)
    check_format(meta, where)
    return meta


def check_format(meta: Mapping[str, str], where: Any = "model") -> None:
    """Refuses files that are not cmae encoders, or from a newer cmae."""
    if MetaKey.FORMAT_VERSION not in meta:
        raise ModelFileError(f"{where}: not a cmae encoder (no cmae_format_version)")
    try:
        version = int(meta[MetaKey.FORMAT_VERSION])
    except ValueError as e:
        raise ModelFileError(f"{where}: bad cmae_format_version") from e
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ModelFileError(
            f"{where}: cmae_format_version {version} is newer than this cmae reads "
            f"({', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}); upgrade cmae"
        )


def spec_from_metadata(meta: Mapping[str, str]) -> PreprocessSpec:
    """The preprocessing an exported encoder expects, from its metadata alone."""
    check_format(meta)
    spec = PreprocessSpec.from_mapping(json.loads(meta[MetaKey.PREPROCESS]))
    if not spec.resolved:
        raise ModelFileError(
            "model: its preprocessing leaves settings to choose (not from cmae export)"
        )
    return spec
