"""ZeRO stage 2: partition the gradients too (Rajbhandari et al., SC'20, section 5.2).

As stage 1, except that no rank keeps a full gradient buffer. Each gradient autograd produces is
copied into its bucket's transient buffer and dropped (``param.grad = None``); when the bucket is
complete it is reduce-scattered into the owner's master gradient shard, and once that is done the
buffer goes back to a small pool for the next bucket. Only the gradient shard outlives backward.

    per step and rank: 2(N-1)/N x gradient bytes (reduce-scatter in backward, all-gather after step)
    gradient memory:   1/N of DDP's, plus the buckets in flight

Under ``no_sync`` gradients accumulate in each parameter's ``.grad`` (autograd's own tensors) and
the synchronized backward reduces the sums: accumulation trades stage 2's gradient saving for fewer
communications while it lasts.
"""

from __future__ import annotations

import torch

from plait.comm import Handle
from plait.strategies.zero.sharding import BucketPool, TransientGradients
from plait.strategies.zero.stage1 import Stage1Runtime


class Stage2Runtime(Stage1Runtime):
    """Gradients reduced bucket by bucket into the shard; no full gradient buffer."""

    keeps_gradient_buffer = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.transient = TransientGradients(self.shards)

    def _collect(self, b: int, i: int) -> None:
        self.transient.collect(self.buckets[b], b, i)

    def _collect_unused(self, b: int, i: int) -> None:
        self.transient.collect_unused(self.buckets[b], b, i)

    def _launch(self, b: int) -> Handle:
        return self.transient.reduce(b)

    def _release_model_gradients(self) -> None:
        """Each gradient was dropped as soon as its bucket copied it.

        The pool keeps its few idle bucket buffers for the next backward: allocating them afresh
        every step costs page faults (measured: stage 2 at 0.92x of ddp with them, see
        docs/benchmarks.md). Stage 3, whose point is memory, gives them back instead.
        """

    def gradient_tensors(self) -> list[torch.Tensor]:
        return []  # no full-size buffer: the gradient shard is the master's

    def buffer_tensors(self) -> list[torch.Tensor]:
        return self.transient.pool.tensors() + super().buffer_tensors()

    @property
    def pool(self) -> BucketPool:
        return self.transient.pool
