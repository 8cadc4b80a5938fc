"""Routes that train a model (a background job) and export one to ONNX."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, jsonify

from catchment_mae.errors import CmaeError
from catchment_mae.web import common
from catchment_mae.web.common import settings, state
from catchment_mae.web.jobs import Job, check_cancel
from catchment_mae.web.security import Refused, as_named, confine, held

bp = Blueprint("train", __name__)

# Whole-number fields of the form, with the range a request may ask for: a
# request must not be able to ask for a model or a run that fills the machine.
INT_FIELDS: dict[str, tuple[int, int]] = {
    "image_size": (8, 1024),
    "in_chans": (1, 64),
    "max_epochs": (1, 10_000),
    "batch_size": (1, 1024),
    "num_workers": (0, max(1, os.cpu_count() or 1)),
    "patch_size": (1, 64),
    "embed_dim": (8, 2048),
    "depth": (1, 48),
    "num_heads": (1, 32),
    "decoder_dim": (8, 2048),
    "decoder_depth": (1, 24),
    "decoder_num_heads": (1, 32),
}
FLOAT_FIELDS = ("mask_ratio", "lr")
# The share of the machine's (or GPU's) memory a training job may plan to take.
MEMORY_SHARE = 0.8
LIST_FIELDS = ("norm_mean", "norm_std")
TRAIN_FIELDS = (
    "dataset", "name", "vit_model_name", "norm", "overwrite",
    *INT_FIELDS, *FLOAT_FIELDS, *LIST_FIELDS,
)  # fmt: skip


@bp.post("/api/train")
def start_train() -> tuple[Response, int]:
    values = common.params(TRAIN_FIELDS)
    cfg, overwrite = train_config(values)
    job = state().jobs.start("train", values, _train_work(cfg, overwrite))
    return jsonify(status="started", job=job.id, url=f"/jobs/{job.id}"), 202


@bp.post("/api/export")
def export() -> Response:
    values = common.params(("model_path", "pool"))
    pth = common.model_path(values, {".pth"})
    pool = str(values["pool"]) if values.get("pool") else None  # None: the model's
    if pool not in (None, "cls", "mean"):
        raise Refused(400, f"pool: must be cls or mean, got {pool!r}", "pool")
    from catchment_mae.export.onnx import export_encoder

    root = settings().model_root
    out = common.output(pth.with_suffix(".onnx"), "model_path")
    sidecar = confine(root, str(pth.with_suffix(".json")), "model_path", "--model-root")
    # Read through the descriptors of what was checked; written into the held
    # folder's descriptor (a temp file there, then a rename): a component
    # swapped for a symlink meanwhile leads nowhere else.
    with (
        held(root, pth, "model_path") as weights,
        held(root, sidecar, "model_path") as config,
        held(root, out.parent, "model_path", directory=True) as folder,
    ):
        try:
            report = export_encoder(
                weights, folder / out.name, pool=pool, overwrite=True,
                config_path=config,
            )  # fmt: skip
        except CmaeError as e:
            text = as_named(str(e), {weights: pth.name, config: sidecar.name})
            raise Refused(400, f"model_path: {text}", "model_path") from e
    rel = out.relative_to(root).as_posix()
    return jsonify(
        status="success",
        onnx=rel,
        download=f"/api/models/download?path={rel}",
        max_abs=max(p.max_abs for p in report.parity),
        min_cos=min(p.min_cos for p in report.parity),
    )


def train_config(values: dict[str, Any]) -> tuple[Any, bool]:
    """The form's values as a checked TrainConfig (and whether to overwrite)."""
    from catchment_mae.config import TrainConfig
    from catchment_mae.errors import ConfigError
    from catchment_mae.model import vit_problem

    s = settings()
    name = common.name(values, "name")
    config: dict[str, Any] = {
        "input_dir": str(common.dataset(values)),
        "model_output_path": str(s.model_root / f"{name}.pth"),
        "device": s.device,
        # The decode-once cache stays inside the server's roots too.
        "cache_dir": str(s.model_root / ".cache"),
    }
    vit = str(values.get("vit_model_name") or "auto").strip()
    problem = None if vit == "auto" else vit_problem(vit)
    if problem is not None:
        raise Refused(400, f"vit_model_name: {problem}", "vit_model_name")
    config["vit_model_name"] = vit
    for key, (low, high) in INT_FIELDS.items():
        raw = values.get(key)
        if raw is None or str(raw).strip() == "":
            continue
        try:
            number = int(str(raw).strip())
        except ValueError:
            raise Refused(
                400, f"{key}: must be a whole number, got {raw!r}", key
            ) from None
        if not low <= number <= high:
            raise Refused(400, f"{key}: must be {low} to {high}, got {number}", key)
        config[key] = number
    for key in FLOAT_FIELDS:
        raw = values.get(key)
        if raw is None or str(raw).strip() == "":
            continue
        try:
            config[key] = float(str(raw).strip())
        except ValueError:
            raise Refused(400, f"{key}: must be a number, got {raw!r}", key) from None
        if not math.isfinite(config[key]):
            raise Refused(400, f"{key}: must be a finite number, got {raw!r}", key)
    if values.get("norm"):  # else chosen as cmae train chooses it
        config["norm"] = str(values["norm"])
    for key in LIST_FIELDS:
        raw = values.get(key)
        if raw is None or str(raw).strip() == "":
            continue  # computed from the data
        try:
            items = raw if isinstance(raw, list) else str(raw).split(",")
            config[key] = [float(v) for v in items if str(v).strip()]
        except (TypeError, ValueError):
            raise Refused(
                400, f"{key}: comma-separated numbers like 2000,1000, got {raw!r}", key
            ) from None
    try:  # TrainConfig checks the values (mask ratio, norm, ...) as for the CLI
        cfg = TrainConfig.from_dict(config)
    except ConfigError as e:
        raise Refused(400, str(e), e.key) from e
    _check_memory(cfg)
    stem = cfg.output_stem
    for path in (
        cfg.weights_path, cfg.config_path, cfg.checkpoint_path, cfg.metrics_path,
        stem.with_name(stem.name + ".loss.png"),
        stem.with_name(stem.name + ".preview.png"),
    ):  # fmt: skip
        common.output(path, "name")
    common.output(Path(cfg.cache_dir), "name", folder=True)
    return cfg, common.flag(values.get("overwrite"))


def _check_memory(cfg: Any) -> None:
    """Refuses a model that would not fit the machine (MEMORY_SHARE of its
    memory, or of the GPU's), before anything starts: a request must not make
    the server allocate until the machine gives out."""
    from catchment_mae.defaults import shape_updates
    from catchment_mae.epochs import pick_device
    from catchment_mae.errors import ConfigError
    from catchment_mae.model import training_memory

    try:
        shaped = cfg.merged(shape_updates(cfg))
        need, params, tokens = training_memory(shaped, cfg.preprocess.in_chans or 1)
        device = pick_device(cfg.device)
    except (ConfigError, ValueError) as e:
        raise Refused(400, str(e), getattr(e, "key", None)) from e
    have = _memory_bytes(device.type)
    if need > MEMORY_SHARE * have:
        raise Refused(
            400,
            f"this model takes about {need / 1e9:.1f} GB to train ({params / 1e6:.0f} "
            f"M parameters, {tokens} tokens a sample, batch {cfg.batch_size}): more "
            f"than {MEMORY_SHARE:.0%} of the {have / 1e9:.1f} GB of this "
            f"{'GPU' if device.type == 'cuda' else 'machine'}; choose a smaller "
            "model, image size or batch",
        )


def _memory_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(0).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _train_work(cfg: Any, overwrite: bool):
    from catchment_mae.errors import OutputExistsError
    from catchment_mae.io import check_writable

    try:
        check_writable([cfg.weights_path, cfg.config_path], overwrite=overwrite)
    except OutputExistsError as e:
        raise Refused(409, f"name: {e}", "name") from e
    s = settings()
    root = s.model_root

    def work(job: Job) -> dict[str, Any]:
        from catchment_mae.trainer import train

        start = time.perf_counter()
        job.progress = {"epoch": 0, "epochs": cfg.max_epochs, "step": 0}

        def on_batch(info: dict[str, Any]) -> None:
            check_cancel(job)
            done = info["epoch"] * info["steps"] + info["step"]
            total = info["epochs"] * info["steps"]  # chosen at the start if auto
            elapsed = time.perf_counter() - start
            job.progress = {
                "epoch": info["epoch"] + 1,
                "epochs": info["epochs"],
                "step": info["step"],
                "steps": info["steps"],
                "loss": info["loss"],
                "images_per_s": info["images_per_s"],
                "eta_s": elapsed / done * (total - done),
            }
            job.add_point(done, info["loss"])

        def on_epoch(stats: dict[str, Any]) -> None:
            job.add_epoch(stats)
            check_cancel(job)

        result = train(
            cfg, overwrite=overwrite, progress=False, within=s.data_root,
            on_batch_end=on_batch, on_epoch_end=on_epoch, cache_within=root,
        )  # fmt: skip
        weights = Path(result.weights_path)
        return {
            "weights": weights.relative_to(root).as_posix(),
            "config": Path(result.config_path).relative_to(root).as_posix(),
            "loss_png": weights.with_suffix(".loss.png").relative_to(root).as_posix(),
            "epochs_run": result.epochs_run,
            "train_loss": result.history[-1]["train_loss"],
            "files": result.files,
            "skipped": len(result.skipped),
        }

    return work
