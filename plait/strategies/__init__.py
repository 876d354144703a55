"""Strategies: one module per way of splitting training work, all behind :class:`Strategy`."""

from __future__ import annotations

from collections.abc import Callable

from plait.errors import ConfigError
from plait.strategies.async_ps import AsyncPS
from plait.strategies.base import PlaitModule, Runtime, Strategy
from plait.strategies.ddp import DDP
from plait.strategies.hybrid import Hybrid
from plait.strategies.local_sgd import LocalSGD
from plait.strategies.pipeline import Pipeline
from plait.strategies.plain import Plain
from plait.strategies.tensor_parallel import TensorParallel
from plait.strategies.zero import Zero

STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "none": Plain,
    "ddp": DDP,
    "zero1": lambda: Zero(stage=1),
    "zero2": lambda: Zero(stage=2),
    "zero3": lambda: Zero(stage=3),
    "async": AsyncPS,
    "local-sgd": LocalSGD,
    "tp": TensorParallel,
    "pp": Pipeline,
}


def resolve(strategy: str | Strategy) -> Strategy:
    """A strategy object from a name ("ddp") or the object itself."""
    if isinstance(strategy, Strategy):
        return strategy
    if isinstance(strategy, str) and strategy in STRATEGIES:
        return STRATEGIES[strategy]()
    raise ConfigError(
        f"strategy={strategy!r} is not known; use one of {sorted(STRATEGIES)} or a strategy object"
    )


__all__ = [
    "DDP",
    "STRATEGIES",
    "AsyncPS",
    "Hybrid",
    "LocalSGD",
    "Pipeline",
    "Plain",
    "PlaitModule",
    "Runtime",
    "Strategy",
    "TensorParallel",
    "Zero",
    "resolve",
]
