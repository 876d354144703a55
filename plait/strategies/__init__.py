"""Strategies: one module per way of splitting training work, all behind :class:`Strategy`."""

from __future__ import annotations

from plait.errors import ConfigError
from plait.strategies.base import PlaitModule, Runtime, Strategy
from plait.strategies.ddp import DDP
from plait.strategies.plain import Plain

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (Plain, DDP)}


def resolve(strategy: str | Strategy) -> Strategy:
    """A strategy object from a name ("ddp") or the object itself."""
    if isinstance(strategy, Strategy):
        return strategy
    if isinstance(strategy, str) and strategy in STRATEGIES:
        return STRATEGIES[strategy]()
    raise ConfigError(
        f"strategy={strategy!r} is not known; use one of {sorted(STRATEGIES)} or a strategy object"
    )


__all__ = ["DDP", "STRATEGIES", "Plain", "PlaitModule", "Runtime", "Strategy", "resolve"]
