"""ZeRO: data parallelism without the redundant copies (Rajbhandari et al., SC'20).

``plait.Zero(stage=k)`` (or the names "zero1", "zero2", "zero3") partitions across the N
data-parallel ranks, cumulatively: 1 the optimizer state (and the fp32 master, under mixed precision), 2 the gradients,
3 the parameters. Updates equal DDP's; stages 1 and 2 send DDP's bytes, stage 3 1.5x. Each stage
is its own module (stage1, stage2, stage3) over the shared layout in ``sharding``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from plait.comm import Context
from plait.comm.mesh import Mesh
from plait.errors import ConfigError
from plait.precision import parse_mixed_precision
from plait.strategies.base import Runtime, Strategy
from plait.strategies.compression import Compression, parse_compression
from plait.strategies.zero.stage1 import Stage1Runtime
from plait.strategies.zero.stage2 import Stage2Runtime
from plait.strategies.zero.stage3 import Stage3Runtime


@dataclasses.dataclass(frozen=True)
class Zero(Strategy):
    """ZeRO stage 1, 2 or 3."""

    name: ClassVar[str] = "zero"

    stage: int = 1
    """1: shard optimizer state; 2: and gradients; 3: and parameters."""
    bucket_mb: float = 25.0
    """Bytes per reduce-scatter / all-gather message (stages 1 and 2; stage 3 uses its units)."""
    prefetch: bool = True
    """Stage 3: gather the next unit's parameters asynchronously while the current one computes."""
    mixed_precision: str | None = None
    """"bf16" or "fp16" compute and communication with an fp32 master (plait.precision); "fp16" adds loss scaling."""
    unit_classes: tuple[type[nn.Module], ...] | None = None
    """Stage 3: module classes whose instances are gathered and freed as one unit; default: the direct
    children of the model's layer lists (each transformer block)."""
    find_unused_parameters: bool = False
    """Tolerate parameters that get no gradient in a backward (treated as zero) instead of raising."""
    compression: str | Compression | None = None
    """Gradient compression (None, "bf16", "powersgd", "sign", plait.PowerSGD, plait.Sign): each bucket
    (stage 3: each unit) is averaged compressed and each rank keeps its shard of the result."""
    hierarchical: bool = False
    """Stages 1, 2: average each bucket within the host first, then across hosts on 1/L of the bytes.
    Stage 3: the HSDP layout, parameters sharded within a host and replicated across hosts (the
    all-gathers stay in the host; gradients are reduce-scattered in it, then all-reduced across)."""

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise ConfigError(f"stage={self.stage!r} is not a ZeRO stage; use 1, 2 or 3")
        if not self.bucket_mb > 0:
            raise ConfigError(f"bucket_mb={self.bucket_mb} must be > 0 (the default is 25)")
        parse_mixed_precision(self.mixed_precision)
        parse_compression(self.compression)

    def model_state_bytes(self, params: float, world: int, k: float = 12.0) -> float:
        """Stage 1 shards the K Psi optimizer state, stage 2 the gradients too, stage 3 the parameters too."""
        sharded = {1: k, 2: 2 + k, 3: 2 + 2 + k}[self.stage]
        return (2 + 2 + k - sharded) * params + sharded * params / world

    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx: Context) -> Runtime:
        return self.runtime(model, optimizer, Mesh(ctx))

    def runtime(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, mesh: Mesh) -> Runtime:
        """This stage's runtime over the ``dp`` axis of ``mesh`` (what ``apply`` and a mesh's dp axis build)."""
        runtime = {1: Stage1Runtime, 2: Stage2Runtime, 3: Stage3Runtime}[self.stage]
        return runtime(self, model, optimizer, mesh)


__all__ = ["Zero"]
