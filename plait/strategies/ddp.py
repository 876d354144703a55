"""Synchronous data parallelism, as in PyTorch DDP (Li et al., "PyTorch Distributed", VLDB 2020).

Every rank holds the whole model; all start equal and apply the same averaged gradient:

    theta <- theta - lr * (1/N) * sum_i grad L_i(theta)

Setup: rank 0's parameters and buffers are broadcast (one broadcast per flat buffer), so replicas
start identical. The trainable parameters are laid out in one flat buffer per dtype, optimizer group
by optimizer group, each group in reverse model order: roughly the order backward produces their
gradients, so the gradient buffer fills from its front.

Backward: the buffer is cut into buckets of about ``bucket_mb``. A per-parameter hook counts each
bucket's gradients; when a bucket is complete its all-reduce (ring: 2(N-1)/N x bucket bytes per
rank) is launched asynchronously while backward carries on with earlier layers. Buckets launch in
one fixed order on every rank, which keeps the collectives matched; after the first backward that
order becomes the order the buckets actually completed on rank 0. A callback at the end of backward
waits for every bucket, so ``optimizer.step()`` sees averaged gradients.

Communication per step and rank: 2(N-1)/N x (gradient bytes), in ``grad_dtype`` when set.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import nn

from plait.buffers import Bucket, FlatBuffer, make_buckets
from plait.comm import Context, Group, Handle
from plait.errors import ConfigError
from plait.precision import parse_dtype
from plait.strategies.base import Runtime, Strategy, clip_flat_grads_, group_ordered, parameter_names

_MIB = 2**20


@dataclasses.dataclass(frozen=True)
class DDP(Strategy):
    """Synchronous data parallelism with bucketed, overlapped gradient all-reduce."""

    name: ClassVar[str] = "ddp"

    bucket_mb: float = 25.0
    """Gradient bytes per all-reduce message. Smaller buckets start communicating earlier in backward."""
    grad_dtype: str | None = None
    """Dtype gradients travel in ("bf16", "fp16", "fp32"); None keeps the parameters' dtype."""
    find_unused_parameters: bool = False
    """Tolerate parameters that get no gradient in a backward (treated as zero) instead of raising."""

    def __post_init__(self) -> None:
        if not self.bucket_mb > 0:
            raise ConfigError(f"bucket_mb={self.bucket_mb} must be > 0 (the default is 25)")
        parse_dtype(self.grad_dtype, "grad_dtype")

    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx: Context) -> Runtime:
        return DDPRuntime(self, model, optimizer, ctx.world)


def replicate_from_rank0(model: nn.Module, buffers: list[FlatBuffer], group: Group) -> None:
    """Make every replica equal to rank 0's: one broadcast per flat buffer, one for everything else."""
    for flat in buffers:
        group.broadcast(flat.data, src=0)
    flat_ids = {id(p) for flat in buffers for p in flat.params}
    rest = [t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in flat_ids]
    for dtype in {t.dtype for t in rest}:
        tensors = [t for t in rest if t.dtype == dtype]
        packed = torch.cat([t.detach().reshape(-1) for t in tensors])
        group.broadcast(packed, src=0)
        for t, chunk in zip(tensors, packed.split([t.numel() for t in tensors])):
            t.data.copy_(chunk.view_as(t))


class DDPRuntime(Runtime):
    """The flat gradient buffers, their buckets, and the all-reduces in flight for one model."""

    def __init__(
        self, strategy: DDP, module: nn.Module, optimizer: torch.optim.Optimizer | None, group: Group
    ):
        super().__init__(strategy, module, optimizer)
        self.group = group
        self.comm_dtype = parse_dtype(strategy.grad_dtype, "grad_dtype")
        names = parameter_names(module)
        ordered = [p for group_params in group_ordered(module, optimizer) for p in reversed(group_params)]
        self.buffers = [
            FlatBuffer(params, names=[names[p] for p in params])
            for dtype in dict.fromkeys(p.dtype for p in ordered)
            for params in [[p for p in ordered if p.dtype == dtype]]
        ]
        replicate_from_rank0(module, self.buffers, group)

        # buckets of all buffers, numbered globally; bucket_of[(buffer, param)] -> global bucket index
        self.buckets: list[tuple[FlatBuffer, Bucket]] = []
        self.bucket_of: dict[tuple[int, int], int] = {}
        for b, flat in enumerate(self.buffers):
            cap = max(1, int(strategy.bucket_mb * _MIB) // flat.data.element_size())
            for bucket in make_buckets(flat.numels, cap):
                for i in bucket.params:
                    self.bucket_of[(b, i)] = len(self.buckets)
                self.buckets.append((flat, bucket))
            flat.install_grad_hooks(on_ready=self._ready_hook(b))
        self.launch_order = list(range(len(self.buckets)))
        self._observed_order: list[int] | None = []
        self._sync = True
        self._reset_backward_state()

    # -- per-backward state -----------------------------------------------------------------------

    def _reset_backward_state(self) -> None:
        self._pending = [len(bucket.params) for _, bucket in self.buckets]
        self._seen: set[tuple[int, int]] = set()
        self._next = 0
        self._handles: list[Handle] = []
        self._callback_queued = False

    def _ready_hook(self, b: int):
        def on_ready(i: int) -> None:
            self._param_ready(b, i)

        return on_ready

    def _param_ready(self, b: int, i: int) -> None:
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
            self._callback_queued = True
        if not self._sync or (b, i) in self._seen:
            return
        self._seen.add((b, i))
        k = self.bucket_of[(b, i)]
        self._pending[k] -= 1
        if self._pending[k] == 0:
            if self._observed_order is not None:
                self._observed_order.append(k)
            self._launch_ready_buckets()

    def _launch_ready_buckets(self) -> None:
        """Launch, in ``launch_order``, every bucket whose gradients are all ready, up to the first that is not."""
        while self._next < len(self.launch_order) and self._pending[self.launch_order[self._next]] == 0:
            self._handles.append(self._launch(self.launch_order[self._next]))
            self._next += 1

    def _launch(self, k: int) -> Handle:
        flat, bucket = self.buckets[k]
        grad = flat.grad[bucket.start : bucket.stop]
        world = self.group.size
        if self.comm_dtype is None or self.comm_dtype == grad.dtype:
            return self.group.all_reduce(grad, op="avg", async_op=True)
        # pre-divide in full precision, then sum in the (narrower) communication dtype
        message = grad.div(world).to(self.comm_dtype)
        return self.group.all_reduce(message, op="sum", async_op=True).then(lambda: grad.copy_(message))

    def _finish_backward(self) -> None:
        """End of backward: launch what is left, wait for every bucket, get ready for the next backward."""
        try:
            if not self._sync:
                return
            if len(self._seen) != len(self.bucket_of):
                self._treat_unused([key for key in self.bucket_of if key not in self._seen])
            self._launch_ready_buckets()
            for handle in self._handles:
                handle.wait()
            if self._observed_order is not None:
                self._adopt_observed_order()
        finally:
            self._reset_backward_state()

    def _treat_unused(self, missing: list[tuple[int, int]]) -> None:
        names = [self.buffers[b].names[i] for b, i in missing]
        if not self.strategy.find_unused_parameters:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise RuntimeError(
                f"DDP: {len(names)} parameter(s) received no gradient in this backward: {shown}. "
                "Every rank must produce a gradient for every trainable parameter; if some are unused by "
                "design, set requires_grad=False on them or use plait.DDP(find_unused_parameters=True)."
            )
        for b, i in missing:
            flat = self.buffers[b]
            param = flat.params[i]
            if param.grad is not flat.grad_views[i]:  # no gradient since the last zero_grad: it is zero
                flat.grad_views[i].zero_()
                param.grad = flat.grad_views[i]
            k = self.bucket_of[(b, i)]
            self._pending[k] -= 1
            if self._pending[k] == 0 and self._observed_order is not None:
                self._observed_order.append(k)

    def _adopt_observed_order(self) -> None:
        """Launch buckets from now on in the order they completed in rank 0's first backward."""
        order = torch.tensor(self._observed_order, dtype=torch.int64)
        self.group.broadcast(order, src=0)
        self.launch_order = order.tolist()
        self._observed_order = None

    # -- Runtime interface ------------------------------------------------------------------------

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The gradients are replicated after backward: clip each flat buffer with no communication."""
        return clip_flat_grads_([flat.grad[: flat.numel] for flat in self.buffers], max_norm)

    def theory_bytes_per_step(self) -> int:
        world = self.group.size
        total = 0
        for flat in self.buffers:
            size = self.comm_dtype.itemsize if self.comm_dtype is not None else flat.data.element_size()
            total += flat.numel * size
        return 2 * (world - 1) * total // world
