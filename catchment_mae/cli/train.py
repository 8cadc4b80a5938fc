"""``cmae train``: train a scale-aware MAE on a directory of TIFFs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from catchment_mae.cli import options
from catchment_mae.config import AUTO, POOLS, TrainConfig
from catchment_mae.ranks import is_main_process, ranks_from_env
from catchment_mae.spec import SCALE_MODES


@click.command(short_help="Train a scale-aware MAE on a directory of TIFFs.")
@click.argument(
    "input_dir", required=False, type=click.Path(file_okay=False, path_type=str)
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A config JSON (the original tool's keys or a NAME.json); flags override it.",
)
@click.option(
    "--out",
    "model_output_path",
    help="Output NAME.pth (NAME.json goes beside it)  [default: "
    "catchment_foundation_model.pth, the original tool's]",
)
@click.option(
    "--model",
    "vit_model_name",
    help="timm ViT name, e.g. vit_small_patch16_224 (never downloaded)  [default: "
    "auto: a 6-block ViT of vit_tiny's width on 64 px inputs, 8 px patches]",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=8),
    help="Model input size S (rasters are resized to S x S; a multiple of the "
    "patch size)  [default: 64 with the auto model, else the size the named "
    "model was made for, e.g. 224]",
)
@click.option(
    "--patch-size", type=click.IntRange(min=1), help="Override the ViT's patch size."
)
@click.option(
    "--embed-dim", type=click.IntRange(min=8), help="Override the ViT's width."
)
@click.option("--depth", type=click.IntRange(min=1), help="Override the ViT's depth.")
@click.option(
    "--num-heads", type=click.IntRange(min=1), help="Override the ViT's heads."
)
@click.option(
    "--in-chans",
    type=click.IntRange(min=1),
    help="Channels (default: the data's band count).",
)
@options.bands_opt
@options.nodata_opt
@click.option(
    "--norm",
    type=click.Choice(["fixed", "per-raster"]),
    help="fixed: --norm-mean/--norm-std (computed from the data if not given); "
    "per-raster: each raster's own valid mean/std (its level and spread travel "
    "in the scale vector)  [default: fixed where --norm-mean is given, else "
    "per-raster]",
)
@options.norm_mean_opt
@options.norm_std_opt
@click.option(
    "--scale",
    type=click.Choice([AUTO, *SCALE_MODES]),
    help="Scale input: raster size in pixels, its extent in metres (needs "
    "georeferencing), or none (zeros: the ablation without it)  [default: auto: "
    "ground where the rasters are georeferenced, else pixels]",
)
@click.option(
    "--scale-stats/--no-scale-stats",
    default=None,
    help="The raster's valid share and each band's mean and spread join the "
    "scale vector (and the embedding)  [default: yes]",
)
@click.option(
    "--slope-channel/--no-slope-channel",
    default=None,
    help="One more input channel: the ground slope of the first band  [default: "
    "for one georeferenced band, an elevation model]",
)
@click.option(
    "--slope-stats/--no-slope-stats",
    default=None,
    help="The mean and spread of the first band's log ground slope at its own "
    "resolution join the scale vector (and the embedding)  [default: with the "
    "slope channel]",
)
@click.option(
    "--valid-channel/--no-valid-channel",
    default=None,
    help="The encoder sees where the raster has data  [default: yes]",
)
@click.option(
    "--drop-empty/--no-drop-empty",
    "drop_empty_patches",
    default=None,
    help="Patches without data take no part in attention, and masking keeps "
    "patches with data first  [default: yes]",
)
@click.option(
    "--trim/--no-trim",
    default=None,
    help="Crop border rows and columns without data before resizing  [default: yes]",
)
@click.option(
    "--pool",
    type=click.Choice(POOLS),
    help="The embedding cmae export writes: class token or valid-weighted mean "
    "of the patch tokens  [default: mean]",
)
@click.option(
    "--epochs",
    "max_epochs",
    type=click.IntRange(min=1),
    help="Epochs (max_epochs)  [default: from the archive's size and the device]",
)
@options.batch_size_opt
@click.option(
    "--mask-ratio",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Fraction of patches masked.",
)
@click.option(
    "--num-workers", type=click.IntRange(min=0), help="Data-loading processes."
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    help="Peak learning rate  [default: 5e-4 * sqrt(batch / 32)]",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="torch's threads on a CPU  [default: the cores this process may use]",
)
@click.option(
    "--warmup-epochs",
    type=click.FloatRange(min=0),
    help="Linear warm-up before the cosine decay.",
)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, max_open=True),
    help="Files held out for the validation loss.",
)
@click.option("--seed", type=int, help="Random seed.")
@options.device_opt()
@click.option(
    "--precision", type=click.Choice(["fp32", "bf16"]), help="bf16 autocast or fp32."
)
@click.option(
    "--norm-pix-loss/--no-norm-pix-loss",
    default=None,
    help="Normalise each target patch (MAE).",
)
@click.option("--flips/--no-flips", default=None, help="Random flips as augmentation.")
@options.recursive_opt
@options.max_pixels_opt
@options.max_memory_opt
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False, path_type=str),
    help="Decode-once cache of the resampled rasters (default: $CMAE_CACHE_DIR, "
    "else $XDG_CACHE_HOME/cmae, else ~/.cache/cmae). The first run reads each "
    "raster once into it; later epochs and runs with the same reading settings "
    "read no TIFF. With the normalisation known up front (--norm per-raster, or "
    "--norm-mean/--norm-std), the first epoch trains while the rasters are read.",
)
@click.option(
    "--no-cache",
    "no_cache",
    is_flag=True,
    help="Read the TIFFs every epoch instead (nothing written to disk).",
)
@click.option(
    "--cache-on-gpu/--no-cache-on-gpu",
    default=None,
    help="On CUDA, hold the cached rasters in the GPU's memory and batch them "
    "there, so the GPU never waits for loader workers (default: when they take "
    "at most a quarter of its free memory; asked for, up to half).",
)
@options.tile_opts(
    tile_help="Train on chips: a raster larger than PIXELS on a side becomes its "
    "grid of PIXELS x PIXELS chips (full resolution, edge chips shifted inside), "
    "each a sample, so one huge DEM is not one sample; smaller rasters stay whole.",
    stride_help="With --tile: pixels between chips (default: --tile; less gives "
    "overlapping chips, more samples of the same ground).",
    max_nodata_help="With --tile: leave out (and count) chips with more nodata "
    "than this share (default 1: only chips with no valid pixel).",
    stride_dest="tile_stride",
)
@click.option(
    "--log-every",
    type=click.IntRange(min=1),
    help="Steps between reading the loss back (a GPU sync); default 20.",
)
@click.option(
    "--resume",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Continue from an epoch checkpoint (NAME.ckpt.pth).",
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Training processes on this machine (DistributedDataParallel: one per "
    "GPU, or a few on a many-core CPU); --batch-size is the global batch.",
)
@options.overwrite_opt
@options.strict_opt
@options.json_opt
@click.pass_context
def train(
    ctx: click.Context,
    input_dir: str | None,
    config_file: Path | None,
    resume: Path | None,
    overwrite: bool,
    strict: bool,
    as_json: bool,
    no_cache: bool,
    nproc: int,
    **flags: Any,
) -> None:
    """Train a scale-aware MAE on INPUT_DIR and write NAME.pth + NAME.json.

    Settings come from the defaults, then --config, then the flags. What is left
    open (the model, its input size, the epochs, the scale input, ...) is chosen
    from the archive and the device, said in one line, and recorded in NAME.json.
    Bad files are skipped with their reason; with --strict the first one stops
    the run.

    \b
    Examples:
      cmae train dems/ --out models/catchments.pth
      cmae train dems/ --out m.pth --model vit_small_patch16_224 --epochs 50
      cmae train --config seed_config.json --epochs 5 --device cpu

    With --nproc N (or under torchrun, for several machines) it trains with
    DistributedDataParallel, --batch-size being the global batch (gloo on CPUs,
    NCCL on GPUs; rank 0 writes the outputs):

    \b
      cmae train dems/ --out m.pth --nproc 4 --device cuda
      torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29400 -m catchment_mae.cli.main train dems/ --out m.pth
    """
    cfg = TrainConfig.from_json(config_file) if config_file else TrainConfig()
    overrides = options.drop_none(flags)
    if no_cache:
        overrides["cache"] = False
    if input_dir is not None:
        overrides["input_dir"] = input_dir
    cfg = cfg.merged(overrides)
    _check_paths(cfg, overwrite, resume)
    if reads_here(nproc, flags.get("num_workers")):
        from catchment_mae.workers import prestart

        # The first pass's readers come from it; it starts beside torch.
        prestart("catchment_mae.prepare")
    from catchment_mae.distributed import launch
    from catchment_mae.trainer import train as run_training

    if is_launcher(nproc):
        code = launch(nproc, _without_nproc(sys.argv[1:]))
        if code:
            ctx.exit(code)  # each process said why (rank 0 for an interruption)
        return

    _check_image_size(cfg)
    verbosity = ctx.obj.get("verbosity", 0) if ctx.obj else 0
    result = run_training(
        cfg, overwrite=overwrite, resume=resume, strict=strict, progress=verbosity >= 0
    )
    if is_main_process():  # under torchrun, rank 0 reports for all
        _report(result, as_json, verbosity)


def _report(result: Any, as_json: bool, verbosity: int) -> None:
    """What the training did: its summary as JSON, or two lines on stderr."""
    summary = result.summary()
    if as_json:
        click.echo(json.dumps(summary, sort_keys=True))
    elif verbosity >= 0:
        click.echo(summary["cache"], err=True)
        what = f"{summary['files']} raster(s)"
        if result.config.tile:
            what = (
                f"{summary['files']} chip(s) and whole raster(s) of "
                f"{summary['rasters']} raster(s) ({summary['chips_skipped']} "
                "nodata chip(s) left out)"
            )
        click.echo(
            f"trained on {what}, {summary['skipped']} skipped; "
            f"wrote {summary['weights']} and {summary['config']}",
            err=True,
        )


def _check_paths(cfg: TrainConfig, overwrite: bool, resume: Path | None) -> None:
    """The mistakes a path can hold, said before torch is imported (a second,
    not the ten or more that torch, timm and lightly take on a busy machine)."""
    from catchment_mae.errors import NoInputError, TrainingError
    from catchment_mae.io import check_writable

    if cfg.input_dir:
        root = Path(cfg.input_dir)
        if not root.exists():
            raise NoInputError(f"{root}: input directory does not exist")
        if not root.is_dir():
            raise NoInputError(f"{root}: not a directory")
    if resume is not None:
        if not Path(resume).is_file():
            raise TrainingError(f"{resume}: no such checkpoint (NAME.ckpt.pth)")
    elif cfg.input_dir:
        check_writable([cfg.weights_path, cfg.config_path], overwrite=overwrite)


def _check_image_size(cfg: TrainConfig) -> None:
    """An input size the patches do not tile is a usage error, said before
    anything is read."""
    from catchment_mae.model import patch_size_of

    patch = patch_size_of(cfg)
    size = cfg.preprocess.image_size
    if size is not None and size % patch:
        raise click.BadParameter(
            f"{size} is not a multiple of the patch size {patch} (the "
            "model's, or --patch-size)",
            param_hint="'--image-size'",
        )


def is_launcher(nproc: int) -> bool:
    """--nproc N outside torchrun: this process starts the N that train."""
    return nproc > 1 and not ranks_from_env().active


def reads_here(nproc: int, num_workers: int | None) -> bool:
    """Whether this process reads the first pass in reader processes: not with
    --num-workers 0, not --nproc's launcher, not a torchrun rank that waits for
    its machine's first."""
    return num_workers != 0 and not is_launcher(nproc) and ranks_from_env().local_main


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line without its --nproc option (what each process runs)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
