"""Local SGD and DiLoCo: step locally, synchronize every H steps.

Each rank trains its own replica with its own optimizer and communicates only every ``period`` (H)
optimizer steps (Stich, "Local SGD converges fast and communicates little", ICLR 2019):

    outer="average"   theta <- mean over ranks of theta_r               (all-reduce of the parameters)
    outer="nesterov"  DiLoCo (Douillard et al., 2023): the averaged change since the last
                      synchronization, delta = theta_global - mean_r theta_r, is an "outer gradient";
                      theta_global takes a Nesterov-momentum SGD step with it (outer_lr,
                      outer_momentum: the paper's 0.7, 0.9 for H in the hundreds; for smaller H
                      derived from H, see ``outer_settings_for``), and every replica restarts
                      from theta_global

Replicas start equal (rank 0's parameters are broadcast). With period 1, plain averaging and SGD
without momentum this is exactly ddp: mean_r (theta - lr g_r) = theta - lr mean_r g_r.
Communication: one all-reduce of the parameters (2(N-1)/N x parameter bytes) every H steps, none in
between: 1/H of ddp's bytes.

The averaging all-reduce is launched right after the H-th step and waited for just before the next
forward, so it overlaps whatever the loop does in between (data loading, logging); on 2 cores it
cannot overlap compute to any gain.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from plait.buffers import FlatBuffer
from plait.checkpoint.format import Piece
from plait.comm import Context, Handle
from plait.errors import ConfigError
from plait.strategies.base import Runtime, Strategy, parameter_names
from plait.strategies.data_parallel import replicate_from_rank0


@dataclasses.dataclass(frozen=True)
class LocalSGD(Strategy):
    """Local steps on every rank; parameters synchronized every ``period`` steps."""

    name: ClassVar[str] = "local-sgd"

    period: int = 8
    """H: optimizer steps between synchronizations."""
    outer: str = "average"
    """"average" (local SGD) or "nesterov" (DiLoCo's outer Nesterov step on the averaged delta)."""
    outer_lr: float | None = None
    """DiLoCo's outer learning rate; None: derived from the period (``outer_settings``)."""
    outer_momentum: float | None = None
    """DiLoCo's outer Nesterov momentum; None: derived from the period (``outer_settings``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.period, int) or self.period < 1:
            raise ConfigError(f"period={self.period!r} must be an integer >= 1")
        if self.outer not in ("average", "nesterov"):
            raise ConfigError(f"outer={self.outer!r} is not known; use 'average' or 'nesterov'")
        lr, momentum = self.outer_settings()
        if lr <= 0 or not 0 <= momentum < 1:
            raise ConfigError(f"need outer_lr > 0 and 0 <= outer_momentum < 1; got {lr}, {momentum}")

    def outer_settings(self) -> tuple[float, float]:
        """DiLoCo's (outer learning rate, outer momentum): the ones given, else the rule for this period."""
        lr, momentum = outer_settings_for(self.period)
        return (
            self.outer_lr if self.outer_lr is not None else lr,
            self.outer_momentum if self.outer_momentum is not None else momentum,
        )

    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx: Context) -> Runtime:
        if optimizer is None:
            raise ConfigError("local-sgd steps locally: pass optimizer= to plait.setup")
        return LocalSGDRuntime(self, model, optimizer, ctx)


class LocalSGDRuntime(Runtime):
    """The replica's flat parameters, the step counter, and (DiLoCo) the global parameters and momentum."""

    synchronous = False
    theory = "all-reduce of the parameters every H steps: 2(N-1)/N x parameter bytes / H"

    def __init__(self, strategy: LocalSGD, module: nn.Module, optimizer: torch.optim.Optimizer, ctx: Context):
        super().__init__(strategy, module, optimizer)
        self.strategy = strategy
        self.group = ctx.world
        names = parameter_names(module)
        params = [p for p in module.parameters() if p.requires_grad]
        self.flat = FlatBuffer(params, names=[names[p] for p in params])
        self.flat.install_grad_hooks()
        replicate_from_rank0(module, [self.flat], ctx.world)
        self.steps = 0
        self.synchronizations = 0
        self._pending: Handle | None = None
        self._average: torch.Tensor | None = None
        if strategy.outer == "nesterov":
            self.global_params = self.flat.data.clone()
            self.momentum = torch.zeros_like(self.global_params)
        optimizer.register_step_post_hook(lambda *_: self._after_step())
        module.register_forward_pre_hook(lambda *_: self.wait())

    def _after_step(self) -> None:
        self.steps += 1
        if self.steps % self.strategy.period == 0:
            self._average = self.flat.data.clone()
            self._pending = self.group.all_reduce(self._average, op="avg", async_op=True)
            self.synchronizations += 1

    def wait(self) -> None:
        """Finish the synchronization in flight, if any: every replica takes the new parameters."""
        if self._pending is None:
            return
        self._pending.wait()
        self._pending = None
        average = self._average
        self._average = None
        if self.strategy.outer == "average":
            self.flat.data.copy_(average)
        else:
            delta = self.global_params - average  # the outer gradient
            lr, momentum = self.strategy.outer_settings()
            self.momentum.mul_(momentum).add_(delta)
            step = delta.add(self.momentum, alpha=momentum)  # Nesterov
            self.global_params.add_(step, alpha=-lr)
            self.flat.data.copy_(self.global_params)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        self.wait()
        return super().full_state_dict()

    def checkpoint_pieces(self, optimizer: object) -> list[Piece]:
        """Replicas whole; DiLoCo also its global parameters and outer momentum (only its own checkpoints have them)."""
        self.wait()
        pieces = super().checkpoint_pieces(optimizer)
        if self.strategy.outer == "nesterov":
            self._outer = [
                Piece(f"strategy/diloco/{name}", tuple(t.shape), (0,), t, replicated=True, required=False)
                for name, t in (("global", self.global_params), ("momentum", self.momentum))
            ]
            pieces += self._outer
        return pieces

    def after_checkpoint_load(self) -> None:
        """From another strategy's checkpoint DiLoCo restarts its outer loop at the loaded parameters."""
        if self.strategy.outer == "nesterov" and not all(p.loaded for p in self._outer):
            self.global_params.copy_(self.flat.data)
            self.momentum.zero_()

    def replicated_tensors(self) -> dict[str, torch.Tensor]:
        """None: replicas differ by design between synchronizations."""
        return {}

    def theory_bytes_per_step(self) -> int:
        world = self.group.size
        return (
            2 * (world - 1) * self.flat.numel * self.flat.data.element_size() // world // self.strategy.period
        )

    def metrics(self) -> dict[str, int]:
        """Synchronizations started (the last may still be in flight until the next forward)."""
        return {"synchronizations": self.synchronizations}


PAPER_PERIOD = 128
"""From this H on, DiLoCo's outer settings are the paper's (it used H = 500)."""


def outer_settings_for(period: int) -> tuple[float, float]:
    """DiLoCo's outer (learning rate, Nesterov momentum) for H = ``period``.

    From H = 128 on, the paper's (0.7, 0.9) (it used H = 500). Below, momentum 0.9 x log2(H) / 7
    (0 at H = 1, 0.9 at H = 128) and learning rate 1 - momentum. In steady state a Nesterov step
    is lr / (1 - momentum) times the averaged delta: 7x with the paper's values, exactly 1x with
    this rule, so the outer loop smooths the deltas' direction without lengthening the step.
    Deltas of a few inner steps point the same way round after round, and amplifying them
    overshoots: at H = 8 on gpt-tiny (docs/benchmarks.md) the paper's values ended at 2.751, lr 1
    with momentum 0.5 (2x) at 2.575, this rule's (0.61, 0.39) at 2.277, local SGD at 2.289. At
    H = 1 the rule is plain averaging (local SGD).
    """
    if period >= PAPER_PERIOD:
        return 0.7, 0.9
    momentum = 0.9 * math.log2(period) / math.log2(PAPER_PERIOD)
    return 1.0 - momentum, momentum
