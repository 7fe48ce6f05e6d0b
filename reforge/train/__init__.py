"""Training the knowledge adapter: `train_adapter(TrainConfig(...))` (recipe in `reforge.train.dora`)."""

from reforge.train.config import TrainConfig
from reforge.train.dora import StepStats, TrainResult, train_adapter

__all__ = ["StepStats", "TrainConfig", "TrainResult", "train_adapter"]
