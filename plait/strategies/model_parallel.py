"""``tp`` and ``pp``: tensor or pipeline parallelism alone, as meshes whose remaining ranks are data parallel.

Each preset names one model-parallel axis and hands the rest to :class:`~plait.strategies.hybrid.Hybrid`
(``dp`` = the ranks that axis leaves over, DDP on them). They live here, not beside the layers and
schedules they use, so that ``hybrid`` can import ``tensor_parallel`` and ``pipeline`` without a cycle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from plait.comm import Context
from plait.comm.mesh import mesh_sizes
from plait.errors import ConfigError
from plait.strategies.base import Runtime, Strategy
from plait.strategies.hybrid import Hybrid
from plait.strategies.pipeline import SCHEDULES, pipeline_microbatches


def _positive(preset: Strategy, *names: str) -> None:
    for name in names:
        value = getattr(preset, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer")


@dataclasses.dataclass(frozen=True)
class TensorParallel(Strategy):
    """Megatron tensor parallelism over groups of ``size`` ranks; data parallelism (DDP) across the groups."""

    name: ClassVar[str] = "tp"

    size: int = 2
    """Ranks each layer is split over (t); the world size must be a multiple of it."""
    plan: Mapping[str, str] | None = None
    """Module path glob -> style (see ``tensor_parallel.STYLES``); None: the model's ``tensor_parallel_plan()``."""

    def __post_init__(self) -> None:
        _positive(self, "size")

    def mesh(self, ctx: Context) -> Hybrid:
        """The mesh this preset stands for on ``ctx``'s world."""
        mesh_sizes(ctx.world_size, tp=self.size, option="size")
        return Hybrid(tp=self.size, plan=self.plan)

    def validate(self, ctx: Context, model: nn.Module) -> None:
        self.mesh(ctx).validate(ctx, model)

    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx: Context) -> Runtime:
        return self.mesh(ctx).apply(model, optimizer, ctx)


@dataclasses.dataclass(frozen=True)
class Pipeline(Strategy):
    """Pipeline parallelism over groups of ``stages`` ranks; data parallelism (DDP) across the groups."""

    name: ClassVar[str] = "pp"

    stages: int = 2
    """Pipeline stages p, one rank each; the world size must be a multiple of it."""
    microbatches: int = 4
    """Micro-batches m per step (at least p); the local batch must split evenly. Bubble: (p-1)/(m+p-1)."""
    schedule: str = "1f1b"
    """"1f1b" (PipeDream-Flush: activations of at most p micro-batches alive) or "gpipe" (all m)."""
    boundaries: tuple[int, ...] | None = None
    """Index in the layer list where each stage after the first begins; None: balance parameters."""

    def __post_init__(self) -> None:
        _positive(self, "stages", "microbatches")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r} is not known; use one of {SCHEDULES}")

    def for_batch(self, world_size: int, batch_size: int, micro_batch: int) -> Pipeline:
        """batch_size / (dp x micro_batch) micro-batches per step, dp = world_size / stages."""
        dp = max(1, world_size // self.stages)
        return dataclasses.replace(
            self, microbatches=pipeline_microbatches(self.stages, dp, batch_size, micro_batch)
        )

    def mesh(self, ctx: Context) -> Hybrid:
        """The mesh this preset stands for on ``ctx``'s world."""
        mesh_sizes(ctx.world_size, pp=self.stages, option="stages")
        return Hybrid(
            pp=self.stages, microbatches=self.microbatches, schedule=self.schedule, boundaries=self.boundaries
        )

    def validate(self, ctx: Context, model: nn.Module) -> None:
        self.mesh(ctx).validate(ctx, model)

    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx: Context) -> Runtime:
        return self.mesh(ctx).apply(model, optimizer, ctx)
