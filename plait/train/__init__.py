"""The training loop and its configuration."""

from plait.train.config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from plait.train.report import Summary
from plait.train.trainer import Trainer

__all__ = ["DataConfig", "ModelConfig", "OptimConfig", "RunConfig", "Summary", "TrainConfig", "Trainer"]
