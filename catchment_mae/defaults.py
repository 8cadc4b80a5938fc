"""The settings ``cmae train`` chooses from the archive and the device.

A config may leave the model, its input size, the epochs, the scale input, the
normalisation and the slope channel to be chosen (``"auto"`` or None; the
defaults). :func:`resolve` chooses them when a run starts, from the
listing (how many samples; whether the rasters are georeferenced; how many
bands) and the device, and says what it chose in one line. The choices are
written into ``NAME.json``, so the run can be repeated as it was.

The figures behind each choice come from the real-terrain benchmark
(``benchmarks/quality.py``, ``benchmarks/README.md``). No torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from catchment_mae.config import AUTO, TrainConfig
from catchment_mae.errors import BadRasterError
from catchment_mae.raster import header, pixel_metres
from catchment_mae.workers import available_cores

# The model when none is named: a ViT of timm's vit_tiny width, 6 blocks deep,
# on 64 px inputs cut in 8 px patches (64 tokens); in exploratory runs on the
# real-terrain benchmark, 12 blocks took twice as long and scored no better (its
# training rate: benchmarks/README.md).
SMALL_VIT: dict[str, Any] = {
    "vit_model_name": "vit_tiny_patch16_224",
    "image_size": 64,
    "patch_size": 8,
    "embed_dim": 192,
    "depth": 6,
    "num_heads": 3,
}
NAMED_MODEL_IMAGE_SIZE = 224  # a named timm model without a size of its own
# Samples seen in a run whose epochs were not given: per CPU core, and on a GPU.
# The epochs are this over the number of samples, within [MIN_EPOCHS, MAX_EPOCHS].
# In exploratory runs on the real-terrain benchmark (608 rasters), 30 epochs
# scored as well as 90.
SAMPLES_PER_CORE = 12_000
SAMPLES_GPU = 400_000
MIN_EPOCHS, MAX_EPOCHS = 20, 400
GEO_PROBES = 64  # rasters whose headers say whether the archive is georeferenced
# The keys :func:`resolve` may choose (where the config leaves them None or auto).
CHOSEN_KEYS = (
    *SMALL_VIT, "max_epochs", "norm", "scale", "slope_channel", "slope_stats",
)  # fmt: skip


def resolve(
    cfg: TrainConfig,
    paths: Sequence[Path],
    samples: int,
    device: str,
    threads: int | None = None,
) -> tuple[TrainConfig, str]:
    """``cfg`` with nothing left to choose, and the one line that says what was
    chosen (and why, where it came from the data).

    Args:
        cfg: the run's config (defaults, then its file, then the flags).
        paths: the rasters listed (one per raster, chips aside).
        samples: the samples an epoch takes (rasters, or chips with --tile).
        device: "cpu" or "cuda", the device the run trains on.
        threads: torch's threads on a CPU (said in the line).
    """
    updates: dict[str, Any] = shape_updates(cfg)
    why: list[str] = []
    cores = available_cores()
    if cfg.max_epochs is None:
        updates["max_epochs"] = epochs_for(samples, device, cores)
    spec = cfg.preprocess
    if spec.norm is None:
        updates["norm"] = "fixed" if spec.norm_mean is not None else "per-raster"
    scale = spec.scale
    if scale == AUTO:
        scale, reason = _scale_from(paths)
        updates["scale"] = scale
        why.append(f"scale {scale} ({reason})")
    if spec.slope_channel is None:
        bands = _band_count(cfg, paths)
        updates["slope_channel"] = scale == "ground" and bands == 1
        if updates["slope_channel"]:
            why.append("a slope channel (one georeferenced band: elevations)")
    if spec.slope_stats is None:
        updates["slope_stats"] = bool(updates.get("slope_channel", spec.slope_channel))
    out = cfg.merged(updates) if updates else cfg
    return out, describe(out, samples, device, why, threads)


def shape_updates(cfg: TrainConfig) -> dict[str, Any]:
    """The model's shape where ``cfg`` leaves it to be chosen: the small ViT's
    keys for the auto model, a named model's own input size."""
    if cfg.vit_model_name == AUTO:
        return {k: v for k, v in SMALL_VIT.items() if cfg.setting(k) in (None, AUTO)}
    if cfg.preprocess.image_size is None:
        return {"image_size": native_image_size(cfg.vit_model_name)}
    return {}


def native_image_size(name: str) -> int:
    """The input size a timm model was made for (its pretrained config's:
    224 for vit_small_patch16_224, 384 for vit_base_patch16_384), else
    NAMED_MODEL_IMAGE_SIZE. Reads timm's registry only (imported here: the
    trainer calls this, never the torch-free paths)."""
    import timm

    try:
        size = timm.models.get_pretrained_cfg(name).input_size[-1]
    except (AttributeError, RuntimeError, TypeError, IndexError):
        return NAMED_MODEL_IMAGE_SIZE
    return int(size)


def describe(
    cfg: TrainConfig,
    samples: int,
    device: str,
    why: list[str],
    threads: int | None = None,
) -> str:
    """The run in one line: what trains, on what, for how long."""
    model = cfg.vit_model_name
    custom = [
        f"{name} {getattr(cfg, key)}"
        for key, name in (
            ("patch_size", "patch"),
            ("embed_dim", "width"),
            ("depth", "depth"),
        )  # fmt: skip
        if getattr(cfg, key) is not None
    ]
    if custom:
        model += f" ({', '.join(custom)})"
    threads_said = f", {threads} thread(s)" if device == "cpu" and threads else ""
    line = (
        f"training {model} at {cfg.preprocess.image_size} px on {samples} sample(s), "
        f"{device}{threads_said}: {cfg.max_epochs} epoch(s) of batch {cfg.batch_size}, "
        f"lr {cfg.base_lr:.2g}, norm {cfg.preprocess.norm}"
    )
    if why:
        line += "; " + ", ".join(why)
    return f"{line}; writes {cfg.weights_path}"


def _probes(paths: Sequence[Path]) -> list[Path]:
    """Up to GEO_PROBES rasters spread over the listing."""
    if len(paths) <= GEO_PROBES:
        return list(paths)
    step = len(paths) / GEO_PROBES
    return [paths[int(i * step)] for i in range(GEO_PROBES)]


def _scale_from(paths: Sequence[Path]) -> tuple[str, str]:
    """ "ground" where every probed raster has a size in metres, else "pixels";
    and why. Rasters that cannot be read are left to the first pass."""
    read = lacking = 0
    for path in _probes(paths):
        try:
            pixel_metres(path)
            read += 1
        except BadRasterError as e:
            if "georeferencing" in e.reason or "unit" in e.reason:
                lacking += 1
                read += 1
    if read and not lacking:
        return "ground", "the rasters are georeferenced"
    if not read:
        return "pixels", "no raster header could be read"
    return "pixels", f"{lacking} of {read} probed rasters have no size in metres"


def _band_count(cfg: TrainConfig, paths: Sequence[Path]) -> int | None:
    """The bands the model takes: as configured, else the first readable
    raster's."""
    spec = cfg.preprocess
    if spec.bands is not None:
        return len(spec.bands)
    if spec.in_chans is not None:
        return spec.in_chans
    for path in _probes(paths):
        try:
            return header(path)[2]
        except BadRasterError:
            continue
    return None


def epochs_for(samples: int, device: str, cores: int) -> int:
    """The epochs a run of ``samples`` per epoch gets when none are given."""
    budget = SAMPLES_GPU if device == "cuda" else SAMPLES_PER_CORE * cores
    return min(max(round(budget / max(samples, 1)), MIN_EPOCHS), MAX_EPOCHS)
