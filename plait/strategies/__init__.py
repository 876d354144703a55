"""Strategies: one module per way of splitting training work, all behind :class:`Strategy`.

:data:`STRATEGIES` is the one map from a strategy's name to its class (and the options the name fixes,
such as ZeRO's stage): ``plait.setup``, ``plait train`` and ``plait estimate`` all resolve names here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from plait.errors import ConfigError
from plait.strategies.async_ps import AsyncPS
from plait.strategies.base import PlaitModule, Runtime, Strategy
from plait.strategies.ddp import DDP
from plait.strategies.hybrid import Hybrid
from plait.strategies.local_sgd import LocalSGD
from plait.strategies.model_parallel import Pipeline, TensorParallel
from plait.strategies.plain import Plain
from plait.strategies.zero import Zero

STRATEGIES: dict[str, tuple[type[Strategy], dict[str, Any]]] = {
    "none": (Plain, {}),
    "ddp": (DDP, {}),
    "zero1": (Zero, {"stage": 1}),
    "zero2": (Zero, {"stage": 2}),
    "zero3": (Zero, {"stage": 3}),
    "async": (AsyncPS, {}),
    "local-sgd": (LocalSGD, {}),
    "tp": (TensorParallel, {}),
    "pp": (Pipeline, {}),
    "hybrid": (Hybrid, {}),
}
"""name -> (the strategy's class, the options the name fixes)."""


def strategy_class(name: str) -> tuple[type[Strategy], dict[str, Any]]:
    """The class ``name`` stands for and the options it fixes; a ConfigError naming the known names."""
    if name not in STRATEGIES:
        raise ConfigError(
            f"strategy={name!r} is not known; use one of {sorted(STRATEGIES)} or a strategy object"
        )
    return STRATEGIES[name]


def zero_stage_name(stage: int) -> str:
    """The name of ZeRO stage ``stage``'s strategy as DeepSpeed numbers them (0: plain data parallelism, ddp)."""
    for name, (cls, fixed) in STRATEGIES.items():
        if isinstance(stage, bool) or not isinstance(stage, int):
            break
        if (cls is DDP and stage == 0) or (cls is Zero and fixed.get("stage") == stage):
            return name
    raise ConfigError(f"stage={stage!r} is not a ZeRO stage; use 0 (ddp), 1, 2 or 3")


def options(name: str) -> list[dataclasses.Field]:
    """The fields of strategy ``name`` a user may set: its dataclass's fields less those the name fixes."""
    cls, fixed = strategy_class(name)
    return [f for f in dataclasses.fields(cls) if f.name not in fixed]


def resolve(strategy: str | Strategy, **given: Any) -> Strategy:
    """A strategy object from a name and options (``resolve("zero3", prefetch=False)``) or the object itself."""
    if isinstance(strategy, Strategy):
        if given:
            raise ConfigError(
                f"options {sorted(given)} go with a strategy name, not a {type(strategy).__name__} object"
            )
        return strategy
    if not isinstance(strategy, str):
        raise ConfigError(
            f"strategy={strategy!r} is not known; use one of {sorted(STRATEGIES)} or a strategy object"
        )
    cls, fixed = strategy_class(strategy)
    known = {f.name for f in options(strategy)}
    unknown = set(given) - known
    if unknown:
        raise ConfigError(
            f"strategy {strategy!r} has no option(s) {sorted(unknown)}; its options: {sorted(known) or 'none'}"
        )
    return cls(**fixed, **given)


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
    "options",
    "resolve",
    "strategy_class",
    "zero_stage_name",
]
