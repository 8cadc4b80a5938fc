"""The one path from a raster to model input; training and embedding both call it.

Steps (every choice is a field of :class:`~catchment_mae.spec.PreprocessSpec`,
recorded in ``NAME.json`` and, later, in the ONNX metadata):

1. read the TIFF (:func:`catchment_mae.raster.read_raster`): bands, validity mask;
   with ``trim``, the border rows and columns without a valid pixel are cropped;
2. resample (:func:`resample`): standardise each channel by the raster's own valid
   mean/std, then resize to ``image_size x image_size`` by a valid-weighted,
   anti-aliased triangle filter, ``resize(x * valid) / resize(valid)``, so nodata
   never smears into valid pixels; the resized validity is the fraction of valid
   input under each pixel (in 1/255 steps); the values are kept as float16. With
   ``slope_channel``, one more channel: the ground slope of the first band at the
   resolution read (:func:`slope_channel`), resized the same way;
3. normalise (:func:`normalise`) per channel with ``norm_mean``/``norm_std`` (or
   the raster's own valid mean/std with ``norm="per-raster"``), an affine map of
   step 2's values; pixels with no valid input get 0, the channel mean;
4. the scale vector (:func:`scale_vector`): ``log(H + eps), log(W + eps)`` of the
   original raster, in pixels or, with ``scale="ground"``, in metres on the
   ground; with ``scale="none"`` (the ablation without the scale input) it is
   ``(0, 0)`` for every raster. With ``scale_stats``, the raster's own facts
   follow: the log of its valid share, then per band its mean, std and
   ``log(std + eps)``, so a model fed per-raster shapes still knows altitude and
   relief.

Training caches step 2's :class:`Resampled` record (decoded once) and applies
step 3 per batch; embedding runs all steps per file. Both round through the same
float16/uint8 values, so they see the same numbers.

numpy only (no torch): ``cmae embed-dir`` and downstream apps use it as it is.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numpy as np

from catchment_mae.errors import BadRasterError, band_mismatch
from catchment_mae.raster import (
    ALL_NODATA,
    MIN_PIXELS,
    Raster,
    RasterInfo,
    ground_extent_m,
    read_raster,
)
from catchment_mae.spec import PreprocessSpec

# A raster whose values lie this many of the training data's stds from its mean
# (or spread this many times wider) is not data of the kind a model knows: a
# float32 DEM whose header byte flipped holds 1e38, a mis-scaled one 1e16, an
# overview whose nodata the tag does not match -1.3e30. Training leaves such a
# raster out (one turned the loss into NaN); embedding refuses it with a reason.
OUTLIER_FACTOR = 1000.0
NODATA_POLICY = (
    "nodata: GDAL_NODATA tag, user nodata, NaN/inf, alpha=0, internal mask=0; "
    "a pixel is invalid when any selected band is; invalid pixels are excluded "
    "from resizing and filled with 0 (the channel mean) after normalising"
)


# The valid fraction under each model pixel is kept in 1/255 steps, so that it
# travels (embed-dir's shared memory) and is cached (training) as uint8 without
# changing: every path sees the same weights.
VALID_LEVELS = 255
# The slope channel: log10 of the ground slope (m/m, at least 1e-4), centred on a
# slope of 0.1 and spread so that 0.001 to 10 m/m span about -3 to +3.
SLOPE_FLOOR = 1e-4
SLOPE_CENTRE = -1.0
SLOPE_SPREAD = 0.7


@dataclass
class Resampled:
    """A raster at the model's size, before normalisation: what training caches.

    Normalising it (:func:`normalise`) is a per-channel affine map, so one cached
    record serves every normalisation.

    Attributes:
        z: float16 (C, image_size, image_size): the raster standardised by its own
            valid mean and std, then resized; 0 where no valid input lies under a
            pixel. float16 holds it without overflow: a standardised value of N
            pixels is at most sqrt(N) (1e4 at 1e8 pixels) away from 0. With the
            slope channel, (C + 1, ...): the slope channel last.
        valid: uint8 (1, image_size, image_size): the valid fraction under each
            pixel in 1/255 steps.
        mean: float64 (C,): the raster's valid mean, as read.
        std: float64 (C,): its valid (population) std; 0 for a flat raster.
        count: valid pixels, as read.
        scale: float32 (scale_dim,): the scale vector (step 4).
        info: metadata of the source raster.
    """

    z: np.ndarray
    valid: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    count: int
    scale: np.ndarray
    info: RasterInfo

    @property
    def valid_fraction(self) -> float:
        """Share of valid pixels in the raster as read."""
        return self.count / max(self.info.read_height * self.info.read_width, 1)


@dataclass
class Sample:
    """Model input for one raster.

    Attributes:
        image: float32 (in_chans, image_size, image_size), normalised.
        valid: float32 (1, image_size, image_size), valid fraction in [0, 1].
        scale: float32 (scale_dim,), the scale vector (step 4).
        info: metadata of the source raster.
        valid_fraction: share of valid pixels in the raster as read.
    """

    image: np.ndarray
    valid: np.ndarray
    scale: np.ndarray
    info: RasterInfo
    valid_fraction: float = 1.0


def load_sample(
    path: str | os.PathLike[str],
    spec: PreprocessSpec,
    maxworkers: int | None = 1,
    window: tuple[int, int, int, int] | None = None,
    within: str | os.PathLike[str] | None = None,
) -> Sample:
    """Reads and preprocesses one TIFF (or one chip of it: ``window`` is x0, y0,
    width, height). Raises BadRasterError naming file and reason. ``within``:
    the file opened must lie in this folder."""
    r = load_resampled(path, spec, maxworkers, window, within)
    check_in_range(r, spec)
    return normalise(r, spec)


def load_resampled(
    path: str | os.PathLike[str],
    spec: PreprocessSpec,
    maxworkers: int | None = 1,
    window: tuple[int, int, int, int] | None = None,
    within: str | os.PathLike[str] | None = None,
) -> Resampled:
    """Reads one TIFF (or one chip of it) and resamples it (steps 1, 2 and 4 of
    the module docstring). A chip's scale vector is the chip's own size.
    ``within``: the file opened must lie in this folder (read_raster)."""
    raster = read_raster(
        path,
        bands=spec.bands,
        nodata=spec.nodata,
        min_size=spec.image_size,
        max_pixels=spec.max_pixels,
        max_memory_mb=spec.max_memory_mb,
        in_chans=spec.in_chans if spec.bands is None else None,
        maxworkers=maxworkers,
        window=window,
        within=within,
    )
    return resample(raster, spec)


def preprocess(raster: Raster, spec: PreprocessSpec) -> Sample:
    """Turns a read raster into model input (see the module docstring)."""
    return normalise(resample(raster, spec), spec)


def resample(raster: Raster, spec: PreprocessSpec) -> Resampled:
    """Checks a read raster and resizes it to the model size, standardised by its
    own statistics (which travel beside it)."""
    if not spec.resolved:  # a training config's, before the run chose its settings
        raise ValueError(f"the spec still has settings to choose: {spec}")
    info = raster.info
    check_usable(raster, spec.in_chans)
    data, valid, kept = (
        trimmed(raster) if spec.trim else (raster.data, raster.valid, (1.0, 1.0))
    )
    # Extreme values (1e38 in a damaged float32 file) may overflow on the way:
    # such a raster is named by the caller's checks, not by numpy's warnings.
    with np.errstate(over="ignore", invalid="ignore"):
        mean, std = valid_mean_std(data, valid)
        safe = np.where(std > 0, std, 1.0)  # a flat raster stays flat, at 0
        # Standardise before resizing: large offsets (altitudes, int32 counts)
        # keep their precision in float32, and invalid pixels are zeroed exactly.
        x = (data - mean[:, None, None].astype(np.float32)) / safe[
            :, None, None
        ].astype(np.float32)
        x = np.where(valid, x, np.float32(0.0)).astype(np.float32)  # NaN * 0: NaN
        num, den = resize_valid_weighted(x, valid.astype(np.float32), spec.image_size)
    del x  # the slope channel's arrays take its place
    levels = np.rint(np.clip(den, 0.0, 1.0) * VALID_LEVELS).astype(np.uint8)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(levels > 0, num / den, 0.0)
    slope_stats = None
    if spec.slope_channel:
        channel, slope_stats = slope_channel(data[0], valid, info, spec, levels)
        z = np.concatenate([z, channel])
    count = int(valid.sum())
    scale = scale_vector(info, spec, kept)
    if spec.scale_stats:
        scale = np.concatenate(
            [scale, raster_facts(mean, std, count / valid.size, spec.scale_eps)]
        )
    if spec.slope_stats and slope_stats is not None:
        scale = np.concatenate([scale, slope_stats])
    return Resampled(
        z=np.ascontiguousarray(z, dtype=np.float16),
        valid=levels[None],
        mean=mean,
        std=std,
        count=count,
        scale=scale.astype(np.float32),
        info=info,
    )


def raster_facts(
    mean: np.ndarray, std: np.ndarray, valid_share: float, eps: float
) -> np.ndarray:
    """The scale vector's facts of a raster (``scale_stats``): the log of its
    valid share, then per band its mean, std and ``log(std + eps)``; float64."""
    return np.concatenate(
        [[math.log(max(valid_share, eps))], mean, std, np.log(std + eps)]
    ).astype(np.float64)


def slope_channel(
    z: np.ndarray,
    valid: np.ndarray,
    info: RasterInfo,
    spec: PreprocessSpec,
    levels: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(1, S, S): the ground slope of ``z`` (metres over metres, by central
    differences at the resolution read) as ``(log10(slope) - SLOPE_CENTRE) /
    SLOPE_SPREAD``, resized by the valid-weighted filter; 0 where ``levels`` is 0.
    And the mean and std of ``log10(slope)`` over the pixels read (float64;
    ``slope_stats``): what resizing keeps of the slopes only as an average.

    The slope is what resizing a DEM loses: a 64 px image of a 500 px catchment
    no longer shows its hillslopes, and its std and extent alone do not say how
    steep they are (on the real-terrain benchmark, R² of log slope within one
    DEM 0.85 with this channel, 0.10 without)."""
    from catchment_mae.geomorph import slope

    h_m, w_m = ground_extent_m(info)  # of the raster; its pixels as read:
    dy, dx = h_m / info.read_height, w_m / info.read_width
    v = slope(z, valid, dy, dx, np.float32)  # NaN where a neighbour is nodata
    known = np.isfinite(v)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        np.log10(np.maximum(v, SLOPE_FLOOR, out=v), out=v)  # in place: no copies
        stats = np.array([math.log10(SLOPE_FLOOR), 0.0])
        if known.any():
            stats = np.array([np.mean(v, where=known, dtype=np.float64),
                              np.std(v, where=known, dtype=np.float64)])  # fmt: skip
        v -= SLOPE_CENTRE
        v /= SLOPE_SPREAD
    v[~known] = 0.0
    num, den = resize_valid_weighted(v[None], known.astype(np.float32), spec.image_size)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where((levels > 0) & (den > 0), num[0] / den, 0.0)
    return out[None].astype(np.float32), stats


def norm_refusal(mean: np.ndarray, std: np.ndarray, spec: PreprocessSpec) -> str | None:
    """Why fixed normalisation with ``spec``'s norm_mean/norm_std (both set)
    cannot take a raster of valid ``mean`` and ``std``: its values would
    normalise to more than OUTLIER_FACTOR (its mean that many stds from
    norm_mean, or its own std that many times norm_std); one such raster turned
    the loss into NaN. None when it can, and always with per-raster
    normalisation."""
    if spec.norm != "fixed":
        return None
    peak = float(norm_peaks(mean, std, spec))
    return None if peak <= OUTLIER_FACTOR else norm_refusal_reason(peak, spec)


def norm_refusal_reason(peak: float, spec: PreprocessSpec) -> str:
    """A raster refused by fixed normalisation, in words (``peak``: what its
    values would normalise to)."""
    return (
        f"its values would normalise to about {peak:.2g} with norm_mean "
        f"{list(spec.norm_mean or ())} and norm_std {list(spec.norm_std or ())}; "
        "check its nodata value and scaling"
    )


def norm_peaks(mean: np.ndarray, std: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """How far a raster's values lie from the training data's, in its stds
    (``norm_mean``, ``norm_std``, both set): its mean's distance from norm_mean,
    or its own std, whichever is larger (``mean``, ``std``: (C,) for one raster,
    (N, C) for N; NaN where they or the norm are NaN). With fixed normalisation,
    how far from 0 its normalised values reach."""
    m = np.asarray(spec.norm_mean, np.float64)
    s = np.asarray(spec.norm_std, np.float64)
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.maximum(np.abs((mean - m) / s).max(axis=-1), (std / s).max(axis=-1))


def check_in_range(r: Resampled, spec: PreprocessSpec) -> None:
    """Refuses (BadRasterError) to embed a raster whose values lie more than
    OUTLIER_FACTOR of the training data's stds from its mean, or spread that
    many times wider: a nodata value the file's tag does not match, a wrong
    scale; its embedding would mean nothing, by either normalisation (per
    raster, its level and spread reach the model through the scale vector).
    Models that recorded no training statistics are not checked."""
    if spec.norm_mean is None or spec.norm_std is None:
        return
    peak = float(norm_peaks(r.mean, r.std, spec))
    if peak <= OUTLIER_FACTOR:
        return
    shown = lambda v: ", ".join(f"{x:.3g}" for x in v)  # noqa: E731
    raise BadRasterError(
        r.info.path,
        f"its values lie far outside the data the model was trained on (mean "
        f"{shown(r.mean)}, std {shown(r.std)}; the training data's mean "
        f"{shown(spec.norm_mean)}, std {shown(spec.norm_std)}); check its nodata "
        "value and scaling",
    )


def norm_coefficients(
    mean: np.ndarray, std: np.ndarray, spec: PreprocessSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``a``, ``b`` with ``image = a * z + b`` for a raster whose own
    valid mean and std are ``mean`` and ``std`` (float32, shape (C,) each; or
    (N, C) for N rasters at once).

    Fixed: ``(x - norm_mean) / norm_std`` with ``x = z * std + mean``. Per-raster:
    ``z`` itself. The slope channel, standardised already, passes as it is
    (one more ``a`` = 1, ``b`` = 0).
    """
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    if spec.norm == "per-raster":
        a, b = np.ones(mean.shape), np.zeros(mean.shape)
    elif spec.norm_mean is None or spec.norm_std is None:
        raise ValueError("norm='fixed' needs norm_mean and norm_std")
    else:
        m = np.asarray(spec.norm_mean, np.float64)
        s = np.asarray(spec.norm_std, np.float64)
        a, b = np.where(std > 0, std, 1.0) / s, (mean - m) / s
    if spec.slope_channel:
        one = np.ones((*mean.shape[:-1], 1))
        a, b = np.concatenate([a, one], -1), np.concatenate([b, 0 * one], -1)
    return a.astype(np.float32), b.astype(np.float32)


def normalise(r: Resampled, spec: PreprocessSpec) -> Sample:
    """Model input from a resampled raster (step 3 of the module docstring)."""
    a, b = norm_coefficients(r.mean, r.std, spec)
    z = r.z.astype(np.float32)
    image = np.where(r.valid > 0, z * a[:, None, None] + b[:, None, None], 0.0)
    return Sample(
        image=np.ascontiguousarray(image, dtype=np.float32),
        valid=r.valid.astype(np.float32) / VALID_LEVELS,
        scale=r.scale,
        info=r.info,
        valid_fraction=r.valid_fraction,
    )


def check_usable(raster: Raster, in_chans: int | None) -> None:
    """Raises BadRasterError for a raster no model can use (bands, size, nodata)."""
    info = raster.info
    n = raster.data.shape[0]
    if in_chans is not None and n != in_chans:
        raise BadRasterError(
            info.path,
            band_mismatch(n, in_chans),
        )
    if info.height * info.width < MIN_PIXELS:
        raise BadRasterError(
            info.path,
            f"is {info.width}x{info.height} pixels, too small to embed "
            f"(at least {MIN_PIXELS} pixels)",
        )
    if not raster.valid.any():
        raise BadRasterError(info.path, ALL_NODATA)


def trimmed(raster: Raster) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """The raster's data and validity without the border rows and columns that
    hold no valid pixel, and the share of its height and width kept."""
    valid = raster.valid
    rows, cols = np.flatnonzero(valid.any(axis=1)), np.flatnonzero(valid.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    h, w = valid.shape
    kept = ((y1 - y0) / h, (x1 - x0) / w)
    return raster.data[:, y0:y1, x0:x1], valid[y0:y1, x0:x1], kept


def scale_vector(
    info: RasterInfo,
    spec: PreprocessSpec,
    kept: tuple[float, float] | float = 1.0,
) -> np.ndarray:
    """``log(H + eps), log(W + eps)`` of the original raster (pixels or metres),
    times the share of each side ``kept`` by trimming; zeros with
    ``scale="none"``: every raster looks alike to ``scale_embed``."""
    if spec.scale == "none":
        return np.zeros(2, np.float32)
    if spec.scale == "ground":
        h, w = ground_extent_m(info)
    else:
        h, w = float(info.height), float(info.width)
    ky, kx = (kept, kept) if isinstance(kept, float) else kept
    h, w = h * ky, w * kx
    return np.array(
        [math.log(h + spec.scale_eps), math.log(w + spec.scale_eps)], dtype=np.float32
    )


def valid_mean_std(
    data: np.ndarray, valid: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) std of the valid pixels, float64."""
    vals = data[:, valid].astype(np.float64)  # [C, N]
    mean = vals.mean(axis=1)
    std = vals.std(axis=1)
    return mean, std


# ------------------------------------------------------------------------ resize
def resize_valid_weighted(
    x: np.ndarray, valid: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Resizes ``x * valid`` and ``valid`` to ``size x size`` with the same filter.

    Args:
        x: (C, H, W) float32, already zero where invalid.
        valid: (H, W) float32 weights in [0, 1].

    Returns:
        ``num`` (C, size, size) and ``den`` (size, size): the valid-weighted sums,
        so ``num / den`` is the mean of the valid input under each output pixel.
    """
    # Large rasters: integer box means first (O(HW)) down to at least 4x the output,
    # so the dense filter matrices below stay small; the box is a quarter of the
    # triangle's support, so the result stays close to the direct filter.
    ky = max(1, x.shape[1] // (4 * size))
    kx = max(1, x.shape[2] // (4 * size))
    if ky > 1 or kx > 1:
        x = _block_mean(x, ky, kx)
        valid = _block_mean(valid[None], ky, kx)[0]
    wy = resize_weights(x.shape[1], size)  # [S, H]
    wx = resize_weights(x.shape[2], size)  # [S, W]
    num = np.einsum("sh,chw,tw->cst", wy, x, wx, optimize=True)
    den = wy @ valid @ wx.T
    return num.astype(np.float32), den.astype(np.float32)


# A few sizes only: tiles of one size hit it every time, and an archive of mixed
# sizes would otherwise fill it with up to 1.6 MB per entry (256 entries made a
# reader's memory grow by 100 MB over 2,000 files).
@functools.lru_cache(maxsize=16)
def resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of an anti-aliased triangle (bilinear) filter, read-only.

    Like PIL's and torch's ``antialias=True`` bilinear: pixel centres aligned, the
    triangle widened by the downscale factor, rows summing to 1, edges renormalised.
    """
    factor = n_in / n_out
    support = max(factor, 1.0)
    centres = (np.arange(n_out) + 0.5) * factor  # in input pixel units
    pos = np.arange(n_in) + 0.5
    w = np.clip(1.0 - np.abs(pos[None, :] - centres[:, None]) / support, 0.0, None)
    w /= w.sum(axis=1, keepdims=True)
    out = w.astype(np.float32)
    out.setflags(write=False)  # shared through the cache
    return out


def _block_mean(a: np.ndarray, ky: int, kx: int) -> np.ndarray:
    """Means over ky x kx blocks of a (C, H, W) array; edge blocks may be partial."""
    c, h, w = a.shape
    ph, pw = -h % ky, -w % kx
    if ph or pw:  # pad with zeros and divide by the true count of each block
        a = np.pad(a, ((0, 0), (0, ph), (0, pw)))
    sums = a.reshape(c, (h + ph) // ky, ky, (w + pw) // kx, kx).sum(axis=(2, 4))
    counts = np.outer(
        np.minimum(ky, h - np.arange(0, h + ph, ky)),
        np.minimum(kx, w - np.arange(0, w + pw, kx)),
    )
    return (sums / counts).astype(np.float32)
