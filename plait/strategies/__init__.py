"""Strategies: one module per way of splitting training work, all behind :class:`Strategy`."""

from __future__ import annotations

from collections.abc import Callable

from plait.errors import ConfigError
from plait.strategies.base import PlaitModule, Runtime, Strategy
from plait.strategies.ddp import DDP
from plait.strategies.plain import Plain
from plait.strategies.zero import Zero

STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "none": Plain,
    "ddp": DDP,
    "zero1": lambda: Zero(stage=1),
    "zero2": lambda: Zero(stage=2),
    "zero3": lambda: Zero(stage=3),
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


__all__ = ["DDP", "STRATEGIES", "Plain", "PlaitModule", "Runtime", "Strategy", "Zero", "resolve"]
