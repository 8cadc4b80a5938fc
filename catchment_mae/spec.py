"""What a raster becomes model input by: :class:`PreprocessSpec`, and the rules
its settings keep, written once (:func:`check_settings`) for the spec and for
a training config whose settings are not all chosen yet.

The spec travels: ``NAME.json`` holds its fields among the config's, the ONNX
metadata holds them as one JSON object, and the training cache is keyed by the
fields that shape a resampled raster. No torch here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from catchment_mae.budget import DEFAULT_MAX_MEMORY_MB
from catchment_mae.raster import DEFAULT_MAX_PIXELS

# A training config's value for a setting chosen from the data when a run starts
# (catchment_mae.defaults); None means the same for the settings that may be None.
AUTO = "auto"
RESIZE_RULE = "valid-weighted-antialias-triangle"
SCALE_EPS = 1e-6  # in log(extent + eps): no log(0) for an empty side
# The scale input: the raster's size in pixels, its extent in metres, or nothing
# (zeros: the ablation that trains the same model without it).
SCALE_MODES = ("pixels", "ground", "none")
# Fields of PreprocessSpec that shape a resampled raster (not its normalisation):
# the training cache's key.
RESAMPLE_FIELDS = (
    "image_size", "bands", "nodata", "max_pixels", "max_memory_mb", "scale",
    "scale_eps", "resize", "trim", "scale_stats", "slope_channel", "slope_stats",
)  # fmt: skip
NORM_MODES = ("fixed", "per-raster")
# The smallest value each numeric setting takes.
AT_LEAST = {"image_size": 1, "in_chans": 1, "max_pixels": 1, "max_memory_mb": 16}


class SpecError(ValueError):
    """A preprocessing setting that breaks a rule; ``key`` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def check_settings(values: Mapping[str, Any]) -> None:
    """The preprocessing rules: the choices, the normalisation's statistics, the
    bands, and what the slope inputs need. ``values`` holds the spec's fields,
    where None (and the scale "auto") stand for settings chosen when a training
    run starts. Raises SpecError naming the first key that breaks a rule."""
    norm, scale, channel = values["norm"], values["scale"], values["slope_channel"]
    if norm is not None:
        _choice("norm", norm, NORM_MODES)
    _choice("scale", scale, (AUTO, *SCALE_MODES))
    _choice("resize", values["resize"], (RESIZE_RULE,))
    for key, low in AT_LEAST.items():
        if values[key] is not None and values[key] < low:
            raise SpecError(key, f"{key} must be >= {low}, got {values[key]}")
    if not values["scale_eps"] > 0:
        raise SpecError(
            "scale_eps", f"scale_eps must be > 0, got {values['scale_eps']}"
        )
    nodata = values["nodata"]
    if nodata is not None and math.isinf(nodata):
        raise SpecError(
            "nodata", "nodata must be a number (NaN and inf are always nodata)"
        )
    _check_bands(values["bands"], values["in_chans"])
    _check_norm(values["norm_mean"], values["norm_std"], values["in_chans"])
    if channel and scale not in ("ground", AUTO):
        raise SpecError(
            "slope_channel",
            f"slope_channel needs scale 'ground' (slopes in metres), not {scale!r}",
        )
    if values["slope_stats"] and channel is False:
        raise SpecError(
            "slope_stats", "slope_stats needs the slope channel (slope_channel)"
        )


def _choice(key: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise SpecError(key, f"{key} must be one of {', '.join(valid)}; got {value!r}")


def _check_bands(bands: Sequence[int] | None, in_chans: int | None) -> None:
    if bands is None:
        return
    if not bands or any(b < 1 for b in bands):
        raise SpecError("bands", f"bands are 1-based band numbers, got {list(bands)}")
    if in_chans is not None and len(bands) != in_chans:
        raise SpecError(
            "bands", f"bands selects {len(bands)} bands but in_chans is {in_chans}"
        )


def _check_norm(
    mean: Sequence[float] | None, std: Sequence[float] | None, in_chans: int | None
) -> None:
    """Fixed normalisation's mean and std: given together, one value a channel,
    std > 0, all finite."""
    if (mean is None) != (std is None):
        raise SpecError("norm_mean", "norm_mean and norm_std must be given together")
    if mean is None or std is None:
        return
    if len(mean) != len(std):
        raise SpecError(
            "norm_mean", f"norm_mean has {len(mean)} values, norm_std {len(std)}"
        )
    if in_chans is not None and len(mean) != in_chans:
        raise SpecError(
            "norm_mean",
            f"norm_mean/norm_std have {len(mean)} values but in_chans is {in_chans}",
        )
    for i, s in enumerate(std):
        if not (math.isfinite(s) and s > 0):
            raise SpecError("norm_std", f"norm_std[{i}] must be > 0, got {s}")
    for i, m in enumerate(mean):
        if not math.isfinite(m):
            raise SpecError("norm_mean", f"norm_mean[{i}] must be finite, got {m}")


def scale_length(scale_stats: bool, bands: int, slope_stats: bool) -> int:
    """The scale vector's length: the two extents; with ``scale_stats`` the
    valid share and each band's mean, std and log std; with ``slope_stats``
    the slope's mean and std (preprocessing's step 4)."""
    return 2 + (1 + 3 * bands if scale_stats else 0) + (2 if slope_stats else 0)


@dataclass(frozen=True)
class PreprocessSpec:
    """How a raster becomes model input (the steps of
    :mod:`catchment_mae.preprocess`); its fields break none of
    :func:`check_settings`' rules.

    A training config holds one (``TrainConfig.preprocess``, its fields flat in
    ``NAME.json``). There a setting may be None, or the scale "auto": it is
    chosen from the data when the run starts (:mod:`catchment_mae.defaults`),
    and only a :attr:`resolved` spec preprocesses. The defaults here are what a
    model from before each setting meant (ONNX metadata without its key); a
    new run starts from ``config.new_run_preprocess()``.

    ``in_chans`` None accepts any band count, and ``norm_mean``/``norm_std`` may be
    None until they are computed from the data (training's first pass); a fixed
    normalisation without them fails when it is applied.
    """

    image_size: int | None  # None: chosen with the model
    in_chans: int | None  # None: the band count of the data
    # fixed: norm_mean/norm_std; per-raster: each raster's own (its level and
    # spread then travel in the scale vector); None: fixed where norm_mean is
    # given, per-raster otherwise.
    norm: str | None = "fixed"
    norm_mean: tuple[float, ...] | None = None  # None: computed from the data
    norm_std: tuple[float, ...] | None = None
    # pixels: log(H, W + eps); ground: in metres; none: zeros (the ablation
    # without the scale input); auto: ground where every raster is
    # georeferenced, pixels otherwise.
    scale: str = "pixels"
    scale_eps: float = SCALE_EPS
    bands: tuple[int, ...] | None = None  # 1-based band selection and order
    nodata: float | None = None  # extra nodata value on top of the file's own
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_memory_mb: int = DEFAULT_MAX_MEMORY_MB  # one raster's, while read (budget.py)
    resize: str = RESIZE_RULE
    # Crop the rows and columns that hold no valid pixel before resizing: a
    # catchment's input (and its extent in the scale vector) then does not
    # depend on the nodata around its outline. False: models from before it.
    trim: bool = False
    # The raster's valid share and each band's level and spread join the scale
    # vector (preprocessing's step 4); False: the two extents alone, as models
    # from before it.
    scale_stats: bool = False
    # One more input channel: the first band's ground slope (needs ``scale``
    # "ground"; an elevation band). None: for one georeferenced band.
    slope_channel: bool | None = False
    # The mean and std of that slope's log10 at the resolution read join the
    # scale vector (needs ``slope_channel``); False: models from before it;
    # None: with the slope channel.
    slope_stats: bool | None = False

    def __post_init__(self) -> None:
        check_settings(asdict(self))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PreprocessSpec:
        """Takes the matching keys of a mapping (ONNX metadata, a config dict)."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in data.items() if k in names}
        for key in ("norm_mean", "norm_std", "bands"):
            if kw.get(key) is not None:
                kw[key] = tuple(kw[key])
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("norm_mean", "norm_std", "bands"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    @property
    def resolved(self) -> bool:
        """Whether nothing is left to choose from the data."""
        chosen = (self.image_size, self.norm, self.slope_channel, self.slope_stats)
        return None not in chosen and self.scale != AUTO

    @property
    def channels(self) -> int | None:
        """Channels of the model input: the bands, and the slope channel."""
        if self.in_chans is None:
            return None
        return self.in_chans + int(bool(self.slope_channel))

    @property
    def scale_dim(self) -> int | None:
        """Length of the scale vector (None while the band count is unknown)."""
        if self.scale_stats and self.in_chans is None:
            return None
        return scale_length(
            self.scale_stats, self.in_chans or 0, bool(self.slope_stats)
        )

    def resample_key(self) -> dict[str, Any]:
        """The fields that decide a :class:`Resampled` raster (the cache key)."""
        d = self.to_dict()
        return {k: d[k] for k in RESAMPLE_FIELDS}


def fields_of_spec() -> tuple[str, ...]:
    """The names of :class:`PreprocessSpec`'s fields (keys of ``NAME.json``
    too, among the training config's own)."""
    return tuple(f.name for f in fields(PreprocessSpec))
