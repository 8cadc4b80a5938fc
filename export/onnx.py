"""Export the encoder with its scale input to one self-describing, validated .onnx.

The graph is :class:`catchment_mae.model.Embedder`: inputs ``image``
[batch, C, S, S] (the bands, then the slope channel where the model has one) and
``scale`` [batch, K] (plus ``valid`` [batch, 1, S, S] for ``pool="mean"`` or an
encoder that sees the validity), output ``embedding`` [batch, D] (D = the width,
plus K where the standardised scale vector follows); no masking, no decoder.
The metadata says what each input holds (``channels``, ``scale_definition``,
``scale_mean``/``scale_std``) and how the embedding is laid out
(``embedding_layout``).

Exporter: ``torch.onnx.export(..., dynamo=True)``, the torch.export-based exporter
that torch >= 2.9 uses by default. We pass it explicitly because the default has
changed across versions, and because the TorchScript exporter (``dynamo=False``)
is deprecated and warns on every call. It needs ``onnxscript`` (in the ``train``
extra). ``external_data=False`` keeps the weights inside the one file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from catchment_mae.config import TrainConfig
from catchment_mae.errors import BadRasterError, ExportError
from catchment_mae.io import atomic_output, check_writable, sha256_file
from catchment_mae.model import Embedder, ScaleAwareMAE, embedder, load_model
from catchment_mae.preprocess import NODATA_POLICY, load_sample
from catchment_mae.raster import find_tiffs
from catchment_mae.runtime import ONNX_FORMAT_VERSION, MetaKey, create_session
from catchment_mae.spec import PreprocessSpec
from catchment_mae.version import __version__

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
MAX_ABS_TOL = 1e-4  # fp32 parity: max |torch - onnxruntime|
MIN_COS_TOL = 0.99999  # and minimum cosine similarity
VALIDATION_BATCHES = (1, 8)
SCALE_DEFINITIONS = {
    "pixels": "log(H + eps), log(W + eps) of the original raster, H and W in pixels",
    "ground": "log(H + eps), log(W + eps) of the original raster, H and W in "
    "metres on the ground",
    "none": "0, 0 for every raster (trained without the scale input)",
}
STATS_DEFINITION = (
    "; then log(max(valid share, eps)) of the raster (after trimming), and per band "
    "its valid mean, then per band its valid std, then per band log(std + eps)"
)


@dataclass
class Parity:
    """torch vs onnxruntime on the same inputs."""

    inputs: str  # "random" or "rasters"
    batch_size: int
    max_abs: float
    min_cos: float


@dataclass
class ExportReport:
    """What ``export_encoder`` wrote and measured."""

    path: str
    pool: str
    embedding_dim: int
    opset: int
    inputs: list[str]
    parity: list[Parity] = field(default_factory=list)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    ms_per_sample: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------- public
def export_encoder(
    weights_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    pool: str | None = None,
    fp16: bool = False,
    quantize: str | None = None,
    validate: bool = True,
    rasters: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    config_path: str | os.PathLike[str] | None = None,
) -> ExportReport:
    """Exports ``NAME.pth`` (+ ``NAME.json``) to ``out`` and validates it.

    Args:
        weights_path: the trained ``NAME.pth``; ``NAME.json`` must lie beside it.
        out: the ``.onnx`` to write; variants go beside it (``.fp16.onnx``,
            ``.int8.onnx``).
        opset: ONNX opset.
        pool: "cls" (the original tool's embedding) or "mean"; None: the
            config's.
        fp16: also write an fp16 variant (for GPUs); its cosine to fp32 is reported.
        quantize: "int8" also writes a dynamically quantised variant (for CPUs).
        validate: compare torch and onnxruntime (random inputs and real rasters).
        rasters: directory of TIFFs for validation (default: the config's
            input_dir, else synthetic DEMs).
        overwrite: replace existing outputs.
        config_path: the ``NAME.json`` where it is not beside the weights.

    Raises:
        ModelLoadError, ExportError, OutputExistsError, OutputError.
    """
    if quantize not in (None, "int8"):
        raise ExportError(f"quantize must be int8, got {quantize!r}")
    out = Path(out)
    targets = [out] + ([variant_path(out, "fp16")] if fp16 else [])
    targets += [variant_path(out, "int8")] if quantize else []
    check_writable(targets, overwrite=overwrite)
    model, cfg = load_model(weights_path, config_path)
    sha = sha256_file(weights_path)
    return export_model(
        model, cfg, out, opset=opset, pool=pool, fp16=fp16, quantize=quantize,
        validate=validate, rasters=rasters, weights_sha256=sha,
    )  # fmt: skip


def export_model(
    model: ScaleAwareMAE,
    cfg: TrainConfig,
    out: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    pool: str | None = None,
    fp16: bool = False,
    quantize: str | None = None,
    validate: bool = True,
    rasters: str | os.PathLike[str] | None = None,
    weights_sha256: str = "",
) -> ExportReport:
    """Exports an in-memory model (see :func:`export_encoder`)."""
    import onnx

    out = Path(out)
    graph = embedder(model, cfg, pool).cpu()
    pool = graph.pool
    spec = cfg.preprocess_spec()
    inputs = ["image", "scale"] + (["valid"] if graph.needs_valid else [])
    proto = _trace(graph, spec, inputs, opset)
    dim = model.embed_dim + (int(spec.scale_dim or 0) if graph.with_scale else 0)
    meta = build_metadata(cfg, spec, pool, dim, inputs, weights_sha256)
    _set_metadata(proto, {**meta, MetaKey.PRECISION: "fp32"})
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{out}: the exported graph fails onnx.checker: {e}") from e
    report = ExportReport(
        path=str(out), pool=pool, embedding_dim=dim, opset=opset, inputs=inputs
    )

    with tempfile.TemporaryDirectory(
        dir=out.parent if out.parent.exists() else None
    ) as tmp:
        fp32_tmp = Path(tmp) / "fp32.onnx"
        onnx.save(proto, fp32_tmp)
        batches = _validation_inputs(spec, cfg, rasters, inputs) if validate else []
        if validate:
            report.parity, report.ms_per_sample = _check_parity(
                graph, fp32_tmp, batches
            )
        variants: dict[str, Path] = {}
        if fp16:
            variants["fp16"] = _to_fp16(proto, Path(tmp) / "fp16.onnx", meta)
        if quantize:
            variants["int8"] = _to_int8(fp32_tmp, Path(tmp) / "int8.onnx", meta)
        for name, path in variants.items():
            report.variants[name] = {"path": str(variant_path(out, name))}
            if validate:
                report.variants[name].update(_compare_variant(fp32_tmp, path, batches))
        # Everything validated: move into place (each rename is atomic).
        _install(fp32_tmp, out)
        for name, path in variants.items():
            _install(path, variant_path(out, name))
    return report


def variant_path(out: Path, name: str) -> Path:
    """``encoder.onnx`` -> ``encoder.fp16.onnx`` / ``encoder.int8.onnx``."""
    return out.with_name(f"{out.stem}.{name}{out.suffix or '.onnx'}")


def build_metadata(
    cfg: TrainConfig,
    spec: PreprocessSpec,
    pool: str,
    embedding_dim: int,
    inputs: list[str],
    weights_sha256: str,
) -> dict[str, str]:
    """The ``metadata_props`` that make the file self-describing (all strings)."""
    dumps = json.dumps
    return {
        MetaKey.FORMAT_VERSION: str(ONNX_FORMAT_VERSION),
        MetaKey.CMAE_VERSION: __version__,
        MetaKey.VIT_MODEL_NAME: cfg.vit_model_name,
        MetaKey.IMAGE_SIZE: str(spec.image_size),
        MetaKey.IN_CHANS: str(spec.in_chans),
        MetaKey.BANDS: dumps(list(spec.bands) if spec.bands else None),
        MetaKey.NORM: spec.norm,
        MetaKey.NORM_MEAN: dumps(list(spec.norm_mean) if spec.norm_mean else None),
        MetaKey.NORM_STD: dumps(list(spec.norm_std) if spec.norm_std else None),
        MetaKey.RESIZE: spec.resize,
        MetaKey.SCALE: spec.scale,
        MetaKey.SCALE_DEFINITION: SCALE_DEFINITIONS[spec.scale]
        + (STATS_DEFINITION if spec.scale_stats else ""),
        MetaKey.SCALE_EPS: repr(spec.scale_eps),
        MetaKey.SCALE_DIM: str(spec.scale_dim),
        MetaKey.SCALE_MEAN: dumps(cfg.scale_mean),
        MetaKey.SCALE_STD: dumps(cfg.scale_std),
        MetaKey.CHANNELS: dumps(channel_names(spec)),
        MetaKey.EMBEDDING_LAYOUT: embedding_layout(cfg, pool, embedding_dim),
        MetaKey.NODATA: dumps(spec.nodata),
        MetaKey.NODATA_POLICY: NODATA_POLICY,
        MetaKey.POOL: pool,
        MetaKey.INPUTS: dumps(inputs),
        MetaKey.EMBEDDING_DIM: str(embedding_dim),
        MetaKey.WEIGHTS_SHA256: weights_sha256,
        MetaKey.PREPROCESS: dumps(spec.to_dict()),
        MetaKey.CONFIG: dumps(cfg.to_dict()),
    }


def channel_names(spec: PreprocessSpec) -> list[str]:
    """What each channel of the ``image`` input holds."""
    bands = list(spec.bands) if spec.bands else range(1, int(spec.in_chans or 0) + 1)
    names = [f"band {b}, normalised ({spec.norm})" for b in bands]
    if spec.slope_channel:
        names.append(
            "ground slope of the first band: (log10(max(slope m/m, 1e-4)) + 1) / 0.7"
        )
    return names


def embedding_layout(cfg: TrainConfig, pool: str, dim: int) -> str:
    """How the ``embedding`` output is laid out, in words."""
    what = (
        "the class token"
        if pool == "cls"
        else "the valid-weighted mean of the patch tokens"
    )
    spec = cfg.preprocess
    if not spec.scale_stats:
        return f"{dim} values: {what} after the final norm"
    k = cfg.scale_dim
    slope = ", the mean and std of its log10 slope" if spec.slope_stats else ""
    return (
        f"{dim - k} values: {what} after the final norm; then {k} values: the scale "
        "input, standardised by scale_mean/scale_std (the raster's extent, valid "
        f"share, levels and spreads{slope}, as the encoder was given them)"
    )


# ------------------------------------------------------------------- tracing
def _example(
    spec: PreprocessSpec, batch: int, inputs: list[str]
) -> tuple[torch.Tensor, ...]:
    s = spec.image_size
    args = [
        torch.randn(batch, int(spec.channels or 1), s, s),
        torch.randn(batch, int(spec.scale_dim or 2)) + 5.0,
    ]
    if "valid" in inputs:
        args.append(torch.ones(batch, 1, s, s))
    return tuple(args)


def _trace(
    embedder: Embedder, spec: PreprocessSpec, inputs: list[str], opset: int
) -> Any:
    """torch.onnx.export (dynamo) with a dynamic batch axis; returns the ModelProto."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    dynamic = tuple({0: batch} for _ in inputs)
    chatter = io.StringIO()
    with (
        warnings.catch_warnings(record=True) as caught,
        contextlib.redirect_stdout(chatter),
    ):
        warnings.simplefilter("always")
        try:
            program = torch.onnx.export(
                embedder,
                _example(spec, 2, inputs),
                None,
                input_names=inputs,
                output_names=["embedding"],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=dynamic,
                external_data=False,
                verbose=False,
            )
        except Exception as e:  # the exporter raises many types; keep the reason
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ExportError(f"torch.onnx.export failed: {first}") from e
    # The exporter's progress lines and warnings (e.g. that both inputs share the
    # batch axis) are for developers: shown with -v only.
    for w in caught:
        log.debug("exporter: %s: %s", w.category.__name__, w.message)
    for line in chatter.getvalue().splitlines():
        log.debug("exporter: %s", line)
    return program.model_proto


def _set_metadata(proto: Any, meta: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def _install(tmp: Path, target: Path) -> None:
    with atomic_output(target, "wb") as f, open(tmp, "rb") as src:
        while chunk := src.read(1 << 20):
            f.write(chunk)


# ---------------------------------------------------------------- validation
def _validation_inputs(
    spec: PreprocessSpec, cfg: TrainConfig, rasters: Any, inputs: list[str]
) -> list[tuple[str, dict[str, np.ndarray]]]:
    """Random batches and batches of real rasters through the shared preprocessing."""
    rng = np.random.default_rng(0)
    s, c, k = spec.image_size, int(spec.channels or 1), int(spec.scale_dim or 2)
    centre = np.asarray(cfg.scale_mean or [5.0] * k, np.float32)
    spread = np.asarray(cfg.scale_std or [1.5] * k, np.float32)
    batches = []
    for b in VALIDATION_BATCHES:
        feed = {
            "image": rng.standard_normal((b, c, s, s)).astype(np.float32),
            "scale": (centre + spread * rng.standard_normal((b, k))).astype(np.float32),
        }
        if "valid" in inputs:
            feed["valid"] = (rng.random((b, 1, s, s)) > 0.3).astype(np.float32)
        batches.append(("random", feed))
    samples = _real_samples(spec, cfg, rasters, max(VALIDATION_BATCHES))
    for b in VALIDATION_BATCHES:
        chosen = samples[:b]
        if len(chosen) < b:
            continue
        feed = {
            "image": np.stack([x.image for x in chosen]),
            "scale": np.stack([x.scale for x in chosen]),
        }
        if "valid" in inputs:
            feed["valid"] = np.stack([x.valid for x in chosen])
        batches.append(("rasters", feed))
    return batches


def _real_samples(
    spec: PreprocessSpec, cfg: TrainConfig, rasters: Any, n: int
) -> list[Any]:
    """Up to n preprocessed rasters from ``rasters``/input_dir, else synthetic DEMs."""
    source = (
        Path(rasters) if rasters else Path(cfg.input_dir) if cfg.input_dir else None
    )
    samples: list[Any] = []
    if source is not None and source.is_dir():
        for path in find_tiffs(source, recursive=cfg.recursive):
            try:
                samples.append(load_sample(path, spec))
            except BadRasterError:
                continue
            if len(samples) == n:
                return samples
    if rasters:
        raise ExportError(f"{rasters}: fewer than {n} usable rasters for validation")
    if len(samples) < n:  # synthetic rasters with the bands the model reads
        from catchment_mae.synth import generate_multiband

        bands = max(spec.bands) if spec.bands else spec.in_chans
        with tempfile.TemporaryDirectory() as tmp:
            for path in generate_multiband(tmp, n - len(samples), bands, seed=1):
                samples.append(load_sample(path, spec))
    return samples[:n]


def _check_parity(
    embedder: Embedder,
    onnx_path: Path,
    batches: list[tuple[str, dict[str, np.ndarray]]],
) -> tuple[list[Parity], dict[str, float]]:
    sess = create_session(onnx_path, "cpu")
    if batches:  # warm both up so the timings below are steady-state
        with torch.inference_mode():
            embedder(*(torch.from_numpy(v) for v in batches[0][1].values()))
        sess.run(["embedding"], batches[0][1])
    results, t_torch, t_ort, n = [], 0.0, 0.0, 0
    for kind, feed in batches:
        t0 = time.perf_counter()
        with torch.inference_mode():
            ref = embedder(*(torch.from_numpy(v) for v in feed.values())).numpy()
        t1 = time.perf_counter()
        got = sess.run(["embedding"], feed)[0]
        t2 = time.perf_counter()
        t_torch, t_ort, n = t_torch + t1 - t0, t_ort + t2 - t1, n + len(ref)
        p = Parity(kind, len(ref), float(np.abs(ref - got).max()), _min_cos(ref, got))
        results.append(p)
        if p.max_abs > MAX_ABS_TOL or p.min_cos < MIN_COS_TOL:
            raise ExportError(
                f"validation failed on {kind} inputs, batch {p.batch_size}: max abs "
                f"difference {p.max_abs:.3g} (limit {MAX_ABS_TOL}), min cosine "
                f"{p.min_cos:.7f} (limit {MIN_COS_TOL})"
            )
    ms = {"torch": 1000 * t_torch / max(n, 1), "onnxruntime": 1000 * t_ort / max(n, 1)}
    results += _check_cuda(embedder, onnx_path, batches)
    return results, ms


def _check_cuda(
    embedder: Embedder,
    onnx_path: Path,
    batches: list[tuple[str, dict[str, np.ndarray]]],
) -> list[Parity]:
    """The same parity check on onnxruntime's CUDA provider, where it loads."""
    sess = create_session(onnx_path, "auto")
    if sess.get_providers()[0] != "CUDAExecutionProvider":
        return []
    out = []
    for kind, feed in batches:
        with torch.inference_mode():
            ref = embedder(*(torch.from_numpy(v) for v in feed.values())).numpy()
        got = sess.run(["embedding"], feed)[0]
        p = Parity(
            f"{kind}/cuda", len(ref), float(np.abs(ref - got).max()), _min_cos(ref, got)
        )
        # GPU kernels (TF32, fused attention) differ more than CPU ones: report,
        # and fail only on a clear mismatch.
        if p.min_cos < 0.999:
            raise ExportError(f"validation failed on the CUDA provider: {p}")
        out.append(p)
    return out


def _compare_variant(
    fp32_path: Path, path: Path, batches: list[tuple[str, dict[str, np.ndarray]]]
) -> dict[str, Any]:
    """A variant's cosine to fp32 (reported, not enforced)."""
    ref_sess, sess = create_session(fp32_path, "cpu"), create_session(path, "cpu")
    cos, max_abs = [], []
    for _, feed in batches:
        ref = ref_sess.run(["embedding"], feed)[0]
        got = sess.run(["embedding"], feed)[0].astype(np.float32)
        cos.append(_min_cos(ref, got))
        max_abs.append(float(np.abs(ref - got).max()))
    return {"min_cos_to_fp32": min(cos), "max_abs_to_fp32": max(max_abs)}


def _min_cos(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(axis=1)
    den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return float((num / np.maximum(den, 1e-30)).min())


# ------------------------------------------------------------------ variants
def _to_fp16(proto: Any, path: Path, meta: dict[str, str]) -> Path:
    """fp16 weights and compute, float32 inputs and outputs (keep_io_types)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        half = convert_float_to_float16(proto, keep_io_types=True)
    _set_metadata(half, {**meta, MetaKey.PRECISION: "fp16"})
    onnx.save(half, path)
    return path


def _to_int8(fp32_path: Path, path: Path, meta: dict[str, str]) -> Path:
    """Dynamic int8 quantisation of the MatMul weights (for CPUs)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The exporter's value_info records the shapes it traced with (batch 2), which
    # the quantiser's strict shape inference then contradicts; let it infer anew.
    plain = onnx.load(fp32_path)
    del plain.graph.value_info[:]
    src = path.with_name("fp32_for_int8.onnx")
    onnx.save(plain, src)
    with _quiet():
        quantize_dynamic(src, path, weight_type=QuantType.QInt8)
    q = onnx.load(path)
    _set_metadata(q, {**meta, MetaKey.PRECISION: "int8"})
    onnx.save(q, path)
    return path


@contextlib.contextmanager
def _quiet() -> Any:
    """onnxruntime's converters log advice and warn; keep it for -v."""
    chatter = io.StringIO()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(record=True) as caught,
            contextlib.redirect_stdout(chatter),
        ):
            warnings.simplefilter("always")
            yield
    finally:
        root.setLevel(level)
    for w in caught:
        log.debug("converter: %s: %s", w.category.__name__, w.message)
