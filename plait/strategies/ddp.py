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

Mixed precision (plait.precision): the flat buffers hold the compute copy (bf16/fp16), gradients are
all-reduced in it, and an fp32 master of every parameter (each rank holds all of them: this is data
parallelism) is what the optimizer steps on; the compute copy is refreshed from it after each step.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from plait.buffers import Bucket, FlatBuffer, make_buckets
from plait.checkpoint.format import Piece
from plait.checkpoint.pieces import model_pieces
from plait.comm import Context, Handle
from plait.comm.mesh import Mesh
from plait.errors import ConfigError
from plait.precision import DynamicLossScaler, parse_dtype, parse_mixed_precision, scale_output_gradients
from plait.strategies.base import (
    Runtime,
    Strategy,
    cast_frozen_parameters,
    flat_names,
    group_index,
    group_ordered,
    parameter_names,
    sum_of_squares,
)
from plait.strategies.bucketing import GradientBuckets
from plait.strategies.compression import Compression, parse_compression
from plait.strategies.compression.reducer import GradientReducer, reducer_for
from plait.strategies.data_parallel import DataParallelRuntime, replicate_from_rank0
from plait.strategies.master import MasterWeights, flat_segments, pieces_of

_MIB = 2**20


@dataclasses.dataclass(frozen=True)
class DDP(Strategy):
    """Synchronous data parallelism with bucketed, overlapped gradient all-reduce."""

    name: ClassVar[str] = "ddp"

    bucket_mb: float = 25.0
    """Gradient bytes per all-reduce message. Smaller buckets start communicating earlier in backward."""
    grad_dtype: str | None = None
    """Dtype gradients travel in ("bf16", "fp16", "fp32"); None: the parameters' (compute) dtype."""
    mixed_precision: str | None = None
    """"bf16" or "fp16": parameters and gradients in that dtype, an fp32 master copy for the optimizer
    (plait.precision describes the policy); "fp16" adds dynamic loss scaling."""
    find_unused_parameters: bool = False
    """Tolerate parameters that get no gradient in a backward (treated as zero) instead of raising."""
    compression: str | Compression | None = None
    """Gradient compression: None, "bf16", "powersgd", "sign" or a plait.PowerSGD / plait.Sign."""
    hierarchical: bool = False
    """Average within each host first, then across hosts on 1/L of the bytes (L ranks per host)."""

    def __post_init__(self) -> None:
        if not self.bucket_mb > 0:
            raise ConfigError(f"bucket_mb={self.bucket_mb} must be > 0 (the default is 25)")
        parse_dtype(self.grad_dtype, "grad_dtype")
        parse_mixed_precision(self.mixed_precision)
        if parse_compression(self.compression) is not None and self.grad_dtype is not None:
            raise ConfigError(
                f"grad_dtype={self.grad_dtype!r} and compression={self.compression!r} both set the wire "
                "format; drop grad_dtype (compression='bf16' sends bf16)"
            )

    def model_state_bytes(self, params: float, world: int, k: float = 12.0) -> float:
        """Every device holds everything: (2 + 2 + K) Psi."""
        return (2 + 2 + k) * params

    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx: Context) -> Runtime:
        return self.runtime(model, optimizer, Mesh(ctx))

    def runtime(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, mesh: Mesh) -> Runtime:
        """DDP over the ``dp`` axis of ``mesh`` (what ``apply`` and a mesh's dp axis build)."""
        return DDPRuntime(self, model, optimizer, mesh)


class DDPRuntime(DataParallelRuntime):
    """The flat buffers, their buckets, the all-reduces in flight, and (mixed precision) the fp32 master."""

    theory = "ring all-reduce 2(N-1)/N x gradient bytes"

    def __init__(self, strategy: DDP, module: nn.Module, optimizer: torch.optim.Optimizer | None, mesh: Mesh):
        super().__init__(strategy, module, optimizer, mesh)
        group = self.group
        compute = parse_mixed_precision(strategy.mixed_precision)
        if compute is not None and optimizer is None:
            raise ConfigError(
                f"mixed_precision={strategy.mixed_precision!r} needs an optimizer to hold the fp32 master"
            )
        names = parameter_names(module)
        groups = group_ordered(module, optimizer)
        ordered = [p for group_params in groups for p in reversed(group_params)]
        self.buffers = [
            FlatBuffer(params, names=[names[p] for p in params])
            for dtype in dict.fromkeys(p.dtype for p in ordered)
            for params in [[p for p in ordered if p.dtype == dtype]]
        ]
        replicate_from_rank0(module, self.buffers, group)
        self.comm_dtype = parse_dtype(strategy.grad_dtype, "grad_dtype")

        if compute is not None:
            group_of = group_index(groups)
            self.master = MasterWeights(
                [piece for flat in self.buffers for piece in pieces_of(flat, group_of)],
                optimizer,
                self.buffers[0].data.device,
                self.skip_group,
                DynamicLossScaler() if compute == torch.float16 else None,
            )
            offset = 0
            for flat in self.buffers:  # the master starts from rank 0's full-precision values
                self.master.data[offset : offset + flat.numel].copy_(flat.data[: flat.numel])
                offset += flat.numel
                flat.cast_(compute)
            cast_frozen_parameters(module, compute)
            self.optimizer = self.master.optimizer
            self.optimizer.register_step_post_hook(lambda *_: self._copy_master_to_model())
            if self.master.loss_scaler is not None:
                scale_output_gradients(module, self.master.loss_scaler)

        bucket_of: dict[tuple[int, int], int] = {}
        self.buckets: list[tuple[FlatBuffer, Bucket]] = []
        for b, flat in enumerate(self.buffers):
            cap = max(1, int(strategy.bucket_mb * _MIB) // flat.data.element_size())
            for bucket in make_buckets(flat.numels, cap):
                bucket_of.update({(b, i): len(self.buckets) for i in bucket.params})
                self.buckets.append((flat, bucket))
        self.schedule = GradientBuckets(
            self.buffers,
            bucket_of,
            group,
            self._launch,
            strategy.find_unused_parameters,
            on_unused=self._zero_unused,
            on_synced=self._synced if self.master is not None else None,
        )
        self.reducer: GradientReducer | None = reducer_for(strategy, mesh)
        if self.reducer is not None:
            self.theory = self.reducer.describe()
            for k, (flat, bucket) in enumerate(self.buckets):
                layout = [
                    (flat.offsets[i] - bucket.start, tuple(flat.params[i].shape)) for i in bucket.params
                ]
                grad = flat.grad
                self.reducer.register(k, bucket.stop - bucket.start, grad.dtype, layout, grad.device)

    def _launch(self, k: int) -> Handle:
        flat, bucket = self.buckets[k]
        grad = flat.grad[bucket.start : bucket.stop]
        if self.reducer is not None:
            return self.reducer.all_reduce(k, grad)
        if self.comm_dtype is None or self.comm_dtype == grad.dtype:
            return self.group.all_reduce(grad, op="avg", async_op=True)
        # pre-divide in the gradients' precision, then sum in the communication dtype
        message = grad.div(self.group.size).to(self.comm_dtype)
        return self.group.all_reduce(message, op="sum", async_op=True).then(lambda: grad.copy_(message))

    def _zero_unused(self, b: int, i: int) -> None:
        flat = self.buffers[b]
        param = flat.params[i]
        if param.grad is not flat.grad_views[i]:  # no gradient since the last zero_grad: it is zero
            flat.grad_views[i].zero_()
            param.grad = flat.grad_views[i]

    def _synced(self) -> None:
        """Mixed precision: the averaged gradients become the master's fp32 gradients."""
        self.master.ensure_grads()
        offset = 0
        for flat in self.buffers:
            self.master.grad[offset : offset + flat.numel].copy_(flat.grad[: flat.numel])
            offset += flat.numel
        self.master.attach_grads()
        for flat in self.buffers:  # the next backward overwrites the compute-dtype gradients
            for p in flat.params:
                p.grad = None

    def _copy_master_to_model(self) -> None:
        offset = 0
        for flat in self.buffers:
            flat.data[: flat.numel].copy_(self.master.data[offset : offset + flat.numel])
            offset += flat.numel

    # -- Runtime interface ------------------------------------------------------------------------

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        return self.schedule.no_sync()

    def _reduced_gradients(self) -> list[torch.Tensor]:
        """The gradients the optimizer steps on: the fp32 master's, or each flat buffer's (padding excluded)."""
        if self.master is not None:
            self.master.unscale()
            return [self.master.grad]
        return [flat.grad[: flat.numel] for flat in self.buffers]

    def gradient_squares(self, counted: Callable[[nn.Parameter], bool] | None = None) -> torch.Tensor:
        """The gradients are replicated after backward: no communication."""
        if counted is None:
            return sum_of_squares(self._reduced_gradients())
        grads = self._reduced_gradients()
        if self.master is None:
            return sum_of_squares(
                [flat.grad_views[i] for flat in self.buffers for i, p in enumerate(flat.params) if counted(p)]
            )
        offset, views = 0, []
        for flat in self.buffers:
            views += [
                grads[0][offset + o : offset + o + n]
                for o, n, p in zip(flat.offsets, flat.numels, flat.params)
                if counted(p)
            ]
            offset += flat.numel
        return sum_of_squares(views)

    def scale_gradients_(self, coef: torch.Tensor) -> None:
        for grad in self._reduced_gradients():
            grad.mul_(coef.to(grad.dtype))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        state = super().full_state_dict()
        if self.master is None:
            return state
        offset = 0
        for flat in self.buffers:  # the fp32 master holds the true values of the trainable parameters
            for name, i in flat_names(self.module, flat).items():
                start = offset + flat.offsets[i]
                state[name] = (
                    self.master.data[start : start + flat.numels[i]].view(flat.params[i].shape).clone()
                )
            offset += flat.numel
        return state

    def gradient_tensors(self) -> list[torch.Tensor]:
        return [flat.grad for flat in self.buffers]

    def checkpoint_pieces(self, optimizer: object) -> list[Piece]:
        compressed = self.reducer.checkpoint_pieces(self.group.rank) if self.reducer is not None else []
        if self.master is None:
            return super().checkpoint_pieces(optimizer) + compressed
        trainable = {id(p) for flat in self.buffers for p in flat.params}
        segments, offset = [], 0
        for flat in self.buffers:  # the fp32 master covers every trainable parameter, replicated
            segments += flat_segments(flat, 0, flat.numel, offset)
            offset += flat.numel
        master = self.master.checkpoint_pieces(segments, replicated=True)
        return model_pieces(self.module, trainable) + master + compressed

    def after_checkpoint_load(self) -> None:
        if self.master is not None:
            self._copy_master_to_model()

    def buffer_tensors(self) -> list[torch.Tensor]:
        """Error-feedback residuals and PowerSGD's Q, when compressing."""
        return self.reducer.memory_tensors() if self.reducer is not None else []

    def theory_bytes_per_step(self) -> int:
        if self.reducer is not None:
            return self.reducer.theory_bytes()
        world = self.group.size
        total = 0
        for flat in self.buffers:
            size = self.comm_dtype.itemsize if self.comm_dtype is not None else flat.data.element_size()
            total += flat.numel * size
        return 2 * (world - 1) * total // world
