"""Optimizers over flat buffers with the torch.optim.Optimizer API."""

from plait.optim.adamw import AdamW
from plait.optim.flat import FlatOptimizer
from plait.optim.sgd import SGD

__all__ = ["SGD", "AdamW", "FlatOptimizer"]
