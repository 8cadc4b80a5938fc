"""The training config: one dataclass, saved as ``NAME.json`` next to the weights.

Its preprocessing is one :class:`~catchment_mae.spec.PreprocessSpec`
(``preprocess``), whose fields ``NAME.json`` holds flat among the others, so the
original tool's config dicts (``image_size``, ``in_chans``, ``norm_mean`` and
``norm_std`` among their eleven keys) load unchanged. No torch here: the batch
runner reads configs too.

Some settings may be ``"auto"`` (or None): :mod:`catchment_mae.defaults` chooses
them from the archive and the device when a run starts, and ``NAME.json``
records what was chosen, so ``--config NAME.json`` trains the same model again.
A ``NAME.json`` of format 1 (written before the terrain inputs) or 2 (before
the slope statistics) reads with the values those models were trained with
(:data:`FORMAT_1`, :data:`FORMAT_2`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from catchment_mae.errors import ConfigError, ModelLoadError
from catchment_mae.spec import (
    AUTO,
    PreprocessSpec,
    SpecError,
    fields_of_spec,
    scale_length,
)

POOLS = ("cls", "mean")

FORMAT_VERSION = 3
# What a format-2 NAME.json meant by the keys it did not have yet.
FORMAT_2: dict[str, Any] = {"slope_stats": False}
# And a format-1 one.
FORMAT_1: dict[str, Any] = {
    "trim": False,
    "scale_stats": False,
    "slope_channel": False,
    "valid_channel": False,
    "drop_empty_patches": False,
    "pool": "cls",
    **FORMAT_2,
}
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")


# The original tool's keys, first in NAME.json in its order.
ORIGINAL_KEYS = (
    "input_dir", "model_output_path", "vit_model_name", "image_size", "in_chans",
    "norm_mean", "norm_std", "max_epochs", "batch_size", "mask_ratio", "num_workers",
)  # fmt: skip


def new_run_preprocess() -> PreprocessSpec:
    """A new run's preprocessing: the terrain inputs on (trimming, the raster's
    facts in the scale vector), the rest chosen from the data."""
    return PreprocessSpec(
        image_size=None, in_chans=None, norm=None, scale=AUTO, trim=True,
        scale_stats=True, slope_channel=None, slope_stats=None,
    )  # fmt: skip


@dataclass
class TrainConfig:
    """Everything ``cmae train`` needs; ``NAME.json`` is :meth:`to_dict` of it,
    the preprocessing's fields flat among the others (the original tool's
    ``image_size``, ``in_chans``, ``norm_mean`` and ``norm_std`` among them)."""

    # --- the original tool's keys (and its image_size, in_chans, norm_mean,
    # norm_std: the preprocessing's) ----------------------------------------------
    input_dir: str = ""
    model_output_path: str = "catchment_foundation_model.pth"
    vit_model_name: str = AUTO  # auto: a small ViT for the device (defaults.py)
    max_epochs: int | None = None  # None: from the archive's size and the device
    batch_size: int = 32
    mask_ratio: float = 0.75
    num_workers: int = 4

    # --- reading and preprocessing (shared with embedding) -----------------------
    preprocess: PreprocessSpec = field(default_factory=new_run_preprocess)
    # The scale vector's centre and spread inside the model (scale_embed); None:
    # from the data (with scale_stats), else none (0 and 1).
    scale_mean: list[float] | None = None
    scale_std: list[float] | None = None
    recursive: bool = True
    # Decode-once cache of resampled rasters (catchment_mae.cache): None puts it
    # in the user's cache directory ($CMAE_CACHE_DIR, else $XDG_CACHE_HOME/cmae).
    cache: bool = True
    cache_dir: str | None = None
    # Hold the cached rasters in the GPU's memory and batch them there (None:
    # when they take at most a quarter of its free memory; loaders.py).
    cache_on_gpu: bool | None = None
    # Chips of large rasters (--tile): rasters larger than ``tile`` pixels on a
    # side train as a grid of chips ``tile_stride`` apart (None: tile), each a
    # sample; chips with more nodata than ``max_nodata`` are left out.
    tile: int | None = None
    tile_stride: int | None = None
    max_nodata: float = 1.0

    # --- model ------------------------------------------------------------------
    # None keeps the timm model's own value; set them for small custom ViTs.
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    decoder_dim: int = 256
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    scale_hidden_dim: int = 64
    norm_pix_loss: bool = False
    # The encoder sees where the raster has data (one more input channel): a
    # catchment's outline is part of what it encodes.
    valid_channel: bool = True
    # Patches without a valid pixel take no part in attention, and masking keeps
    # patches with data first.
    drop_empty_patches: bool = True
    # The embedding cmae export writes by default: "cls" (the class token, the
    # original tool's), or "mean" (patch tokens weighted by their valid share);
    # with scale_stats the standardised scale vector follows either. On the
    # real-terrain benchmark the trained class token ranks slope within a DEM
    # better (R² 0.88 against 0.85) and training adds more to it (0.88 against
    # 0.71 untrained; mean 0.85 against 0.78): benchmarks/README.md.
    pool: str = "cls"

    # --- optimisation ------------------------------------------------------------
    # None: 5e-4 * sqrt(batch_size / 32) (format 1: blr * batch_size / 256, MAE's
    # rule, which left small-batch runs barely trained).
    lr: float | None = None
    blr: float = 1.5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    val_fraction: float = 0.1
    flips: bool = True
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    log_every: int = 20  # steps between reading the loss back (a host sync on GPUs)
    threads: int | None = None  # torch's threads on a CPU; None: the usable cores

    # --- bookkeeping -------------------------------------------------------------
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raises ConfigError naming the first offending key."""
        _check_types(self)
        self._check_choices()
        self._check_scale()
        _check_bounds(self)
        if self.cache_dir is not None and not str(self.cache_dir).strip():
            raise ConfigError(
                "cache_dir (--cache) is empty (an unset variable?): give a "
                "directory, or leave it out for the default",
                key="cache_dir",
            )
        if self.tile_stride is not None and self.tile is None:
            raise ConfigError(
                "tile_stride (--stride) needs tile (--tile)", key="tile_stride"
            )
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise ConfigError(f"lr must be > 0 and finite, got {self.lr}", key="lr")
        size = self.preprocess.image_size
        if self.patch_size is not None and size is not None and size % self.patch_size:
            raise ConfigError(
                f"image_size {size} is not a multiple of patch_size {self.patch_size}",
                key="patch_size",
            )

    def _check_choices(self) -> None:
        """Keys that take one of a few values (the preprocessing ones aside),
        and the format version."""
        _choice("pool", self.pool, POOLS)
        if self.format_version not in (1, 2, FORMAT_VERSION):
            raise ConfigError(
                f"format_version {self.format_version} is not one this cmae reads "
                f"(1, 2, {FORMAT_VERSION})",
                key="format_version",
            )
        _choice("device", self.device, DEVICES)
        _choice("precision", self.precision, PRECISIONS)

    def _check_scale(self) -> None:
        """The scale vector's centre and spread against its length."""
        _pair(self.scale_mean, self.scale_std, "scale_mean", "scale_std")
        if self.scale_mean is None or self.scale_std is None:
            return
        spec = self.preprocess
        lengths = []  # the scale vector's, as far as it is known yet
        if spec.in_chans or not spec.scale_stats:
            chosen = (False, True) if spec.slope_stats is None else (spec.slope_stats,)
            lengths = [
                scale_length(spec.scale_stats, spec.in_chans or 0, s) for s in chosen
            ]
        if len(self.scale_mean) != len(self.scale_std) or (
            lengths and len(self.scale_mean) not in lengths
        ):
            raise ConfigError(
                f"scale_mean/scale_std have {len(self.scale_mean)}/"
                f"{len(self.scale_std)} values; the scale vector has "
                f"{' or '.join(map(str, lengths))}",
                key="scale_mean",
            )
        if not all(math.isfinite(v) and v > 0 for v in self.scale_std):
            raise ConfigError("scale_std values must be > 0", key="scale_std")

    @property
    def resolved(self) -> bool:
        """Whether no field is left for :mod:`catchment_mae.defaults` to choose."""
        return (
            self.vit_model_name != AUTO
            and self.max_epochs is not None
            and self.preprocess.resolved
        )

    def preprocess_spec(self) -> PreprocessSpec:
        """How this config turns a raster into model input, once nothing is
        left to choose (training, its cache key, export and the web UI use it)."""
        if not self.resolved:
            raise ConfigError(
                "the config still has settings to choose from the data (auto); "
                "catchment_mae.defaults.resolve chooses them"
            )
        return self.preprocess

    # --------------------------------------------------------------- round trip
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Builds a config from a dict, rejecting unknown keys (nanoGPT's rule)."""
        if not isinstance(data, dict):
            raise ConfigError(
                f"a config must be a JSON object, got {type(data).__name__}"
            )
        own = {f.name for f in dataclasses.fields(cls)} - {"preprocess"}
        spec_keys = set(fields_of_spec())
        for key in data:
            if key not in own | spec_keys:
                raise ConfigError(f"Unknown config key: {key}", key=key)
        if data.get("format_version") == 1:  # the keys it did not have yet
            data = {**FORMAT_1, **data}
        elif data.get("format_version") == 2:
            data = {**FORMAT_2, **data}
        spec = new_run_preprocess().to_dict()
        spec.update((k, v) for k, v in data.items() if k in spec_keys)
        try:
            preprocess = PreprocessSpec(**_typed(spec, PreprocessSpec))
        except SpecError as e:
            raise ConfigError(str(e), key=e.key) from None
        return cls(preprocess=preprocess, **{k: v for k, v in data.items() if k in own})

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> TrainConfig:
        """Reads a ``NAME.json`` or an original-tool config file."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a text file (a config is JSON)") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from e
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}", key=e.key) from e

    def merged(self, overrides: dict[str, Any]) -> TrainConfig:
        """Returns a copy with the non-None overrides applied (CLI flags win).
        Norm (or scale) statistics given anew are no longer the data's
        (``extra``'s ``norm_stats_from``, ``scale_stats_from``), unless
        ``extra`` comes with them."""
        given = {k: v for k, v in overrides.items() if v is not None}
        data = self.to_dict()
        data.update(given)
        for keys, marker in (
            ({"norm_mean", "norm_std"}, "norm_stats_from"),
            ({"scale_mean", "scale_std"}, "scale_stats_from"),
        ):
            if keys & set(given) and "extra" not in given:
                data["extra"] = {k: v for k, v in data["extra"].items() if k != marker}
        return TrainConfig.from_dict(data)

    def setting(self, key: str) -> Any:
        """The value of ``key`` as ``NAME.json`` names it (the preprocessing's
        keys among the others)."""
        return getattr(self.preprocess if key in fields_of_spec() else self, key)

    def to_dict(self) -> dict[str, Any]:
        """The config as ``NAME.json`` holds it: the original tool's keys
        first, the preprocessing's fields flat where its field stands."""
        out: dict[str, Any] = {}
        for name, value in asdict(self).items():
            out.update(
                self.preprocess.to_dict() if name == "preprocess" else {name: value}
            )
        return {**{k: out[k] for k in ORIGINAL_KEYS}, **out}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    # ------------------------------------------------------------------ paths
    @property
    def output_stem(self) -> Path:
        """``NAME`` of ``NAME.pth``/``NAME.json`` (the original tool's rule)."""
        p = Path(self.model_output_path)
        return p.with_suffix("") if p.suffix == ".pth" else p

    @property
    def weights_path(self) -> Path:
        return self.output_stem.with_name(self.output_stem.name + ".pth")

    @property
    def config_path(self) -> Path:
        return self.output_stem.with_name(self.output_stem.name + ".json")

    @property
    def checkpoint_path(self) -> Path:
        return self.output_stem.with_name(self.output_stem.name + ".ckpt.pth")

    @property
    def metrics_path(self) -> Path:
        return self.output_stem.with_name(self.output_stem.name + ".metrics.jsonl")

    @property
    def base_lr(self) -> float:
        """The peak learning rate after warm-up."""
        if self.lr is not None:
            return self.lr
        if self.format_version == 1:
            return self.blr * self.batch_size / 256
        return default_lr(self.batch_size)

    @property
    def scale_dim(self) -> int:
        """Length of the scale vector (``in_chans`` must be known with
        scale_stats)."""
        dim = self.preprocess.scale_dim
        if dim is None:
            raise ConfigError("in_chans is not set (and was not taken from the data)")
        return dim


def model_files(
    weights_path: str | os.PathLike[str],
    config_path: str | os.PathLike[str] | None = None,
) -> tuple[Path, Path]:
    """``NAME.pth`` and the ``NAME.json`` beside it (the original tool's pair;
    ``config_path`` where it lies elsewhere), checked to be there
    (ModelLoadError); no torch, so a command says so at once."""
    path = Path(weights_path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: weights file does not exist")
    cfg_path = path.with_suffix(".json") if config_path is None else Path(config_path)
    if not cfg_path.is_file():
        raise ModelLoadError(
            f"{cfg_path}: missing; cmae needs the NAME.json written beside NAME.pth"
        )
    return path, cfg_path


def default_lr(batch_size: int) -> float:
    """5e-4 at a batch of 32, scaled by the square root of the batch (as for
    Adam at small batches): on the real-terrain benchmark 5e-4 brought the loss
    of a 64 px ViT from 1.04 to 0.36 in 30 epochs (an exploratory run)."""
    return 5e-4 * math.sqrt(batch_size / 32)


# Keys with a lowest value, checked where they are set (the unit said after it).
_AT_LEAST: dict[str, tuple[int, str]] = {
    "threads": (1, ""),
    **dict.fromkeys(
        ("max_epochs", "batch_size", "log_every", "patch_size", "embed_dim",
         "depth", "num_heads"),
        (1, ""),
    ),
    **dict.fromkeys(("tile", "tile_stride"), (8, " pixels")),
    "num_workers": (0, ""),
}  # fmt: skip
# Keys within an interval: (low, high, low included, high included, as said).
_WITHIN: dict[str, tuple[float, float, bool, bool, str]] = {
    "max_nodata": (0.0, 1.0, True, True, "[0, 1]"),
    "mask_ratio": (0.0, 1.0, False, False, "(0, 1)"),
    "val_fraction": (0.0, 1.0, True, False, "[0, 1)"),
}


def _check_bounds(cfg: Any) -> None:
    """Numbers against their bounds (_AT_LEAST, _WITHIN, positive and finite)."""
    for key, (low, unit) in _AT_LEAST.items():
        value = getattr(cfg, key)
        if value is not None and value < low:
            raise ConfigError(f"{key} must be >= {low}{unit}, got {value}", key=key)
    for key, (low, high, low_in, high_in, said) in _WITHIN.items():
        value = getattr(cfg, key)
        above = value >= low if low_in else value > low
        below = value <= high if high_in else value < high
        if not (above and below):
            raise ConfigError(f"{key} must be in {said}, got {value}", key=key)
    for key in ("blr", "weight_decay", "warmup_epochs", "min_lr"):
        if not 0 <= getattr(cfg, key) < math.inf:
            raise ConfigError(
                f"{key} must be >= 0 and finite, got {getattr(cfg, key)}", key=key
            )


def _pair(a: Any, b: Any, key_a: str, key_b: str) -> None:
    """Two keys that are given together or not at all."""
    if (a is None) != (b is None):
        raise ConfigError(f"{key_a} and {key_b} must be given together", key=key_a)


def _choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(
            f"{key} must be one of {', '.join(valid)}; got {value!r}", key=key
        )


def _check_types(cfg: TrainConfig) -> None:
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    typed = _typed(values, type(cfg))
    for name, value in typed.items():
        setattr(cfg, name, value)


def _typed(values: dict[str, Any], cls: type) -> dict[str, Any]:
    """``values`` checked against the type hints of ``cls``'s fields (ConfigError
    naming the key), with JSON's ints as floats where floats are meant (so
    NAME.json is stable) and its lists as tuples where tuples are."""
    hints = typing.get_type_hints(cls)
    out = {}
    for name, value in values.items():
        if not _is_instance(value, hints[name]):
            raise ConfigError(
                f"config key {name} must be {_type_name(hints[name])}, got "
                f"{type(value).__name__} {value!r}",
                key=name,
            )
        out[name] = _coerce(value, hints[name])
    return out


def _coerce(value: Any, hint: Any) -> Any:
    """Turns ints into floats where the hint allows a float but no int, and
    lists into tuples where it holds a tuple."""
    args = typing.get_args(hint) if typing.get_origin(hint) else (hint,)
    if isinstance(value, (list, tuple)):
        seqs = [a for a in args if typing.get_origin(a) in (list, tuple)]
        kind, item = typing.get_origin(seqs[0]), typing.get_args(seqs[0])[0]
        return kind(_coerce(v, item) for v in value)
    if isinstance(value, int) and not isinstance(value, bool):
        if float in args and int not in args:
            return float(value)
    return value


def _is_instance(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):  # a tuple is tuple[X, ...]; JSON gives lists
        item = typing.get_args(hint)[0]
        return isinstance(value, (list, tuple)) and all(
            _is_instance(v, item) for v in value
        )
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
