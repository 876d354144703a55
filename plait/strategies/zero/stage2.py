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
from plait.strategies.zero.sharding import BucketPool
from plait.strategies.zero.stage1 import Stage1Runtime


class Stage2Runtime(Stage1Runtime):
    """Gradients reduced bucket by bucket into the shard; no full gradient buffer."""

    keeps_gradient_buffer = False

    def __init__(self, *args, **kwargs) -> None:
        self.pool = BucketPool()
        self._filling: dict[int, torch.Tensor] = {}
        super().__init__(*args, **kwargs)

    def _bucket(self, b: int) -> torch.Tensor:
        """Bucket ``b``'s gradient buffer for this backward (from the pool; its padding zeroed)."""
        if b not in self._filling:
            flat = self.buckets[b]
            buffer = self.pool.take(flat.data.numel(), flat.data.dtype, flat.data.device)
            buffer[flat.numel :].zero_()
            self._filling[b] = buffer
        return self._filling[b]

    def _collect(self, b: int, i: int) -> None:
        flat = self.buckets[b]
        param = flat.params[i]
        self._bucket(b)[flat.offsets[i] : flat.offsets[i] + flat.numels[i]].copy_(param.grad.reshape(-1))
        param.grad = None

    def _collect_unused(self, b: int, i: int) -> None:
        flat = self.buckets[b]
        param = flat.params[i]
        slot = self._bucket(b)[flat.offsets[i] : flat.offsets[i] + flat.numels[i]]
        if param.grad is None:
            slot.zero_()
        else:  # accumulated under no_sync, unused in the last micro-step
            slot.copy_(param.grad.reshape(-1))
            param.grad = None

    def _launch(self, b: int) -> Handle:
        buffer = self._filling.pop(b)
        return self.pool.release_after(self.shards.reduce_scatter(b, buffer), buffer)

    def _release_model_gradients(self) -> None:
        """Each gradient was dropped as soon as its bucket copied it.

        The pool keeps its few idle bucket buffers for the next backward: allocating them afresh
        every step costs page faults (measured: stage 2 at 0.92x of ddp with them, see
        docs/benchmarks.md). Stage 3, whose point is memory, gives them back instead.
        """

    def gradient_tensors(self) -> list[torch.Tensor]:
        return self.pool.tensors()
