"""Data parallelism as the textbook writes it: after backward, average every gradient, one by one.

The naive twin of :mod:`plait.strategies.ddp` (picotron keeps one beside its bucketed version): replicas
start equal (rank 0's values broadcast), and once backward has produced every gradient, each
parameter's gradient is all-reduced (averaged) on the dp group, in model order, one blocking message
per parameter:

    theta <- theta - lr * (1/N) * sum_i grad L_i(theta)

Same bytes as DDP, 2(N-1)/N x gradient bytes per rank, but as many messages as parameters and no
overlap with backward. It exists to be read and to check the bucketed version against
(``tests/test_ddp.py``); train with ``ddp``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import nn

from plait.comm import Context
from plait.comm.mesh import Mesh
from plait.strategies.base import Runtime, Strategy
from plait.strategies.data_parallel import DataParallelRuntime, replicate_from_rank0


@dataclasses.dataclass(frozen=True)
class NaiveDDP(Strategy):
    """Per-parameter gradient all-reduce after backward (no buckets, no overlap)."""

    name: ClassVar[str] = "naive-ddp"

    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx: Context) -> Runtime:
        return self.runtime(model, optimizer, Mesh(ctx))

    def runtime(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, mesh: Mesh) -> Runtime:
        return NaiveDDPRuntime(self, model, optimizer, mesh)


class NaiveDDPRuntime(DataParallelRuntime):
    theory = "all-reduce 2(N-1)/N x gradient bytes, one message per parameter"

    def __init__(
        self, strategy: NaiveDDP, module: nn.Module, optimizer: torch.optim.Optimizer | None, mesh: Mesh
    ):
        super().__init__(strategy, module, optimizer, mesh)
        replicate_from_rank0(module, [], self.group)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self._sync, self._queued = True, False
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._gradient_ready)

    def _gradient_ready(self, _param: nn.Parameter) -> None:
        """The first gradient of a backward queues the averaging for the end of that backward."""
        if self._sync and not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._average)

    def _average(self) -> None:
        self._queued = False
        for p in self.params:
            if p.grad is None:  # unused in this backward: a zero gradient, as DDP's find_unused_parameters
                p.grad = torch.zeros_like(p)
            self.group.all_reduce(p.grad, op="avg")

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def theory_bytes_per_step(self) -> int:
        total = sum(p.numel() * p.element_size() for p in self.params)
        return 2 * (self.group.size - 1) * total // self.group.size
