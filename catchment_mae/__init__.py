"""catchment-mae: scale-aware Masked Autoencoders for catchment rasters."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from catchment_mae.version import __version__ as __version__

if TYPE_CHECKING:
    from catchment_mae.config import TrainConfig
    from catchment_mae.trainer import TrainResult


def train(config: TrainConfig | dict[str, Any], **kwargs: Any) -> TrainResult:
    """Trains a scale-aware MAE; accepts the original tool's config dict as it is.

    torch is imported only here, so ``import catchment_mae`` stays torch-free.
    See :func:`catchment_mae.trainer.train` for the keyword arguments.
    """
    from catchment_mae.trainer import train as _train

    return _train(config, **kwargs)
