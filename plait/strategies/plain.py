"""No parallelism: every rank trains its own copy (``strategy="none"``; also what a world of one needs)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from plait.comm import Context
from plait.strategies.base import Runtime, Strategy


@dataclasses.dataclass(frozen=True)
class Plain(Strategy):
    """Train the model as it is: no communication, ``no_sync`` does nothing."""

    name: ClassVar[str] = "none"

    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx: Context) -> Runtime:
        return Runtime(self, model, optimizer)
