"""ZeRO stage 1: partition the optimizer state (Rajbhandari et al., SC'20, section 5.1).

Every rank keeps the whole model and a full gradient buffer, like DDP. Each owns 1/N of every bucket
(see ``sharding``): the optimizer state for that shard and, where compute precision is lower, an
fp32 master of it; in full precision the optimizer steps on the model's own shard in place.

    backward   as each bucket completes: reduce-scatter its gradient, averaged, into the owner's
               fp32 master gradient shard                          (N-1)/N x bucket bytes per rank
    step       the optimizer updates the master shard only (one fused update per group)
    after step all-gather every bucket's updated shards into the full parameters, asynchronously;
               the next forward waits for them                     (N-1)/N x bucket bytes per rank

Per step and rank: 2(N-1)/N x the (padded) gradient bytes, exactly DDP's all-reduce, split in two.
Optimizer state per rank: 1/N of DDP's.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from plait.buffers import FlatBuffer
from plait.checkpoint.format import Piece
from plait.checkpoint.pieces import model_pieces
from plait.comm import Handle
from plait.comm.mesh import Mesh
from plait.errors import ConfigError
from plait.precision import DynamicLossScaler, parse_mixed_precision, scale_output_gradients
from plait.strategies.base import Strategy, cast_frozen_parameters, flat_names
from plait.strategies.bucketing import GradientBuckets
from plait.strategies.compression.reducer import reducer_for
from plait.strategies.data_parallel import replicate_from_rank0
from plait.strategies.zero.sharding import (
    ShardedMaster,
    ShardedRuntime,
    bucketed_buffers,
    group_major_order,
)

GATHER_WINDOW = 2
"""All-gathers of updated buckets in flight at once after a step."""

REDUCE_WINDOW = 2
"""Reduce-scatters in flight at once during backward. Beyond two ranks each takes a bucket-sized
scratch buffer; with every bucket in flight a 166M model faulted in 635 MiB of fresh scratch per
step at 4 ranks (measured), where a window of two reuses two buffers."""


class Stage1Runtime(ShardedRuntime):
    """Full parameters and gradients on every rank; master and optimizer state sharded."""

    keeps_gradient_buffer = True
    theory = "reduce-scatter + all-gather 2(N-1)/N x gradient bytes"

    def __init__(
        self, strategy: Strategy, module: nn.Module, optimizer: torch.optim.Optimizer | None, mesh: Mesh
    ):
        super().__init__(strategy, module, optimizer, mesh)
        if optimizer is None:
            raise ConfigError(f"zero{strategy.stage} shards the optimizer: pass optimizer= to plait.setup")
        group = self.group
        self.compute = parse_mixed_precision(strategy.mixed_precision)
        params, group_of = group_major_order(module, optimizer)
        self.buckets = bucketed_buffers(
            module, params, strategy.bucket_mb, group.size, self.keeps_gradient_buffer
        )
        replicate_from_rank0(module, self.buckets, group)
        scaler = DynamicLossScaler() if self.compute == torch.float16 else None
        # full precision: the optimizer steps on the model's own shard of each bucket, no master copy
        in_place = self.compute is None and all(flat.data.dtype == torch.float32 for flat in self.buckets)
        self.shards = ShardedMaster(
            self.buckets, group_of, optimizer, group, scaler, in_place=in_place, skip_group=self.skip_group
        )
        self.shards.load_from([flat.data for flat in self.buckets])  # full precision, before any cast
        if self.compute is not None:
            for flat in self.buckets:
                flat.cast_(self.compute)
            cast_frozen_parameters(module, self.compute)
        self.shards.calibrate(self.buckets[0].data.dtype)
        self.shards.reducer = reducer_for(strategy, mesh)
        if self.shards.reducer is not None:
            self.theory = f"{self.shards.reducer.describe()}; all-gather (N-1)/N x B"
            self.shards.reducer.register_buffers(self.buckets)
        self.master = self.shards.master
        self.optimizer = self.master.optimizer
        self.optimizer.register_step_post_hook(lambda *_: self._gather_updated())
        self._gathers: dict[int, Handle] = {}
        self._queued: list[int] = []
        self._gather_order = self._forward_order(module)
        self._wait_before_use(module)
        if scaler is not None:
            scale_output_gradients(module, scaler)
        self.schedule = GradientBuckets(
            self.buckets,
            None,  # each buffer is one bucket
            group,
            self._launch,
            strategy.find_unused_parameters,
            on_ready=self._collect,
            on_unused=self._collect_unused,
            on_synced=self._synced,
            max_in_flight=REDUCE_WINDOW,
        )

    # -- backward ---------------------------------------------------------------------------------

    def _collect(self, b: int, i: int) -> None:
        """A gradient is ready: it already sits in the bucket's gradient buffer (the flat buffer's hook put it there)."""

    def _collect_unused(self, b: int, i: int) -> None:
        flat = self.buckets[b]
        if flat.params[i].grad is not flat.grad_views[i]:  # no gradient since the last step: zero
            flat.grad_views[i].zero_()

    def _launch(self, b: int) -> Handle:
        return self.shards.reduce_scatter(b, self.buckets[b].grad)

    def _synced(self) -> None:
        self.wait_for_parameters()  # a parameter forward did not use: its gather must land before the step
        self.shards.backward_done()
        self.master.attach_grads()
        self._release_model_gradients()

    def _release_model_gradients(self) -> None:
        """The reduced gradient lives in the master now; the next backward overwrites the local one."""
        for flat in self.buckets:
            for p in flat.params:
                p.grad = None

    # -- after the step ---------------------------------------------------------------------------

    def _forward_order(self, module: nn.Module) -> list[int]:
        """Buckets in the order forward first uses them (by their earliest parameter in model order)."""
        position = {p: i for i, p in enumerate(module.parameters())}
        first_use = [min(position[p] for p in flat.params) for flat in self.buckets]
        return sorted(range(len(self.buckets)), key=first_use.__getitem__)

    def _wait_before_use(self, module: nn.Module) -> None:
        """Each module waits, just before its forward, for the gathers of the buckets holding its parameters."""
        bucket_of = {p: b for b, flat in enumerate(self.buckets) for p in flat.params}
        for sub in module.modules():
            needed = sorted({bucket_of[p] for p in sub.parameters(recurse=False) if p in bucket_of})
            if needed:
                sub.register_forward_pre_hook(lambda *_, needed=needed: self._wait(needed))

    def _wait(self, buckets: list[int]) -> None:
        for b in buckets:
            if b in self._queued:
                self._launch_gathers(until=b)
            handle = self._gathers.pop(b, None)
            if handle is not None:
                handle.wait()
            self._launch_gathers()

    def _gather_updated(self) -> None:
        """After the step: queue the all-gathers of the updated shards in the order forward needs them.

        At most ``GATHER_WINDOW`` are in flight; each wait starts the next, so the gathers of later
        layers travel while earlier layers compute, and their scratch memory is reused.
        """
        self._queued = list(self._gather_order)
        self._launch_gathers()

    def _launch_gathers(self, until: int | None = None) -> None:
        while self._queued and (len(self._gathers) < GATHER_WINDOW or until in self._queued):
            b = self._queued.pop(0)
            self._gathers[b] = self.shards.all_gather(b, self.buckets[b].data)

    def wait_for_parameters(self) -> None:
        """Block until every all-gather of the last step's updates has landed."""
        self._wait(list(self._gathers) + list(self._queued))

    # -- Runtime interface ------------------------------------------------------------------------

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        return self.schedule.no_sync()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every rank's fp32 master shards gathered (the parameters' true values under mixed precision)."""
        self.wait_for_parameters()
        state = super().full_state_dict()
        for b, flat in enumerate(self.buckets):
            full = torch.empty(flat.data.numel(), dtype=torch.float32, device=flat.data.device)
            self.group.all_gather(full, self.shards.master_slice(b))
            _write_values(state, self.module, flat, full)
        return state

    def gradient_tensors(self) -> list[torch.Tensor]:
        return [flat.grad for flat in self.buckets]

    def buffer_tensors(self) -> list[torch.Tensor]:
        """Error-feedback residuals and PowerSGD's Q, when compressing."""
        return self.shards.reducer.memory_tensors() if self.shards.reducer is not None else []

    def checkpoint_pieces(self, optimizer: object) -> list[Piece]:
        """This rank's fp32 master shards and their optimizer state; buffers and frozen parameters whole."""
        trainable = {id(p) for flat in self.buckets for p in flat.params}
        reducer = self.shards.reducer
        compressed = reducer.checkpoint_pieces(self.group.rank) if reducer is not None else []
        return (
            model_pieces(self.module, trainable)
            + self.master.checkpoint_pieces(self.shards.segments())
            + compressed
        )

    def after_checkpoint_load(self) -> None:
        self._gather_updated()
        self.wait_for_parameters()

    def replicated_tensors(self) -> dict[str, torch.Tensor]:
        self.wait_for_parameters()
        return super().replicated_tensors()

    def theory_bytes_per_step(self) -> int:
        """Reduce-scatter plus all-gather of every (padded) bucket: 2(N-1)/N x gradient bytes, as DDP."""
        total = sum(flat.data.numel() * flat.data.element_size() for flat in self.buckets)
        if self.shards.reducer is not None:
            return self.shards.reducer.theory_bytes() + (self.group.size - 1) * total // self.group.size
        return 2 * (self.group.size - 1) * total // self.group.size


def _write_values(state: dict[str, Any], module: nn.Module, flat: FlatBuffer, values: torch.Tensor) -> None:
    """Put each parameter of ``flat`` into ``state`` (under every name it has) from the flat ``values``."""
    for name, i in flat_names(module, flat).items():
        state[name] = (
            values[flat.offsets[i] : flat.offsets[i] + flat.numels[i]].view(flat.params[i].shape).clone()
        )
