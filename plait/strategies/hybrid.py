"""Data, tensor and pipeline parallelism together over a device mesh (Narayanan et al., SC'21: "PTD-P").

The world's ranks form a grid with named axes, ``dp x pp x tp``, tp the fastest-varying:

    rank = (dp_index * pp + pp_index) * tp + tp_index

so a tensor-parallel group (the chattiest: two all-reduces per block per pass) is a run of adjacent
ranks, the stages of one pipeline come next, and each data-parallel replica of the whole model is
a contiguous block of tp x pp ranks: on nodes of that many devices, only the data-parallel gradient
traffic would leave a node. Each axis gets one :class:`~plait.comm.Group` per line of the grid
(``Context.split``).

``plait.Hybrid(dp=d, tp=t, pp=p, zero=z)`` applies, in order, to every rank's copy of the model:

1. tensor parallelism (``tensor_parallel.apply_plan`` on the tp group): layers replaced by shards;
2. pipeline parallelism (``pipeline.PipelineStage``): only this rank's stage is kept;
3. data parallelism on the dp group over what is left: DDP's bucketed all-reduce (z=0) or ZeRO
   stage 1/2 (reduce-scatter into an optimizer-state shard), the same runtimes ``ddp`` and
   ``zero1/2`` use, given the dp group instead of the world.

Under a pipeline, micro-batches accumulate gradients without data-parallel communication; after the
schedule the tied embedding/head gradient is summed between the first and last stage, then one
synchronized backward of zero loss fires every parameter's hook, so DDP or ZeRO reduce the
accumulated gradients exactly as after an ordinary backward.

Setup broadcasts rank 0's whole model over the world once (one message per dtype), so every rank
cuts its shards and stage from the same values. Not supported here: mixed precision, ZeRO-3.
Dropout inside tensor-parallel layers draws from each rank's own generator (seed every rank
alike, as for any replicated computation).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from plait.checkpoint.format import Piece
from plait.checkpoint.pieces import aliases
from plait.comm import Context, Group
from plait.errors import ConfigError, divisors
from plait.strategies.base import LossFunction, Runtime, Strategy, token_cross_entropy
from plait.strategies.ddp import DDP, DDPRuntime, replicate_from_rank0
from plait.strategies.master import rebuild_optimizer
from plait.strategies.pipeline import SCHEDULES, PipelineSchedule, PipelineStage, check_pipeline
from plait.strategies.tensor_parallel import (
    apply_plan,
    check_plan,
    resolve_plan,
    vocab_parallel_cross_entropy,
)
from plait.strategies.zero import Zero
from plait.strategies.zero.stage1 import Stage1Runtime
from plait.strategies.zero.stage2 import Stage2Runtime

AXES = ("dp", "pp", "tp")
"""The mesh's axes, slowest-varying first."""


class Mesh:
    """This rank's place in the dp x pp x tp grid of ranks and one group per axis holding it."""

    def __init__(self, ctx: Context, dp: int, pp: int, tp: int) -> None:
        self.ctx = ctx
        self.grid = torch.arange(ctx.world_size).view(dp, pp, tp)
        where = (self.grid == ctx.rank).nonzero()[0].tolist()
        self.coords = dict(zip(AXES, where))
        """This rank's index along each axis."""
        self.groups = {axis: ctx.split(self.lines(axis), axis) for axis in AXES}
        """The group of ranks that differ from this one along each axis only (collective to build)."""

    @property
    def sizes(self) -> dict[str, int]:
        """The number of ranks along each axis, e.g. ``{"dp": 2, "pp": 1, "tp": 2}``."""
        return dict(zip(AXES, self.grid.shape))

    def lines(self, axis: str) -> list[list[int]]:
        """Every line of the grid along ``axis``: the global ranks of each group of that axis."""
        along = self.grid.movedim(AXES.index(axis), -1)
        return along.reshape(-1, along.shape[-1]).tolist()

    def split_stages(self, stages: tuple[int, ...], name: str) -> Group:
        """A group of the pipeline stages ``stages`` of this rank's pipeline (collective to build)."""
        partition = []
        for line in self.lines("pp"):
            partition.append([line[s] for s in stages])
            partition += [[rank] for s, rank in enumerate(line) if s not in stages]
        return self.ctx.split(partition, name)


@dataclasses.dataclass(frozen=True)
class Hybrid(Strategy):
    """d-way data (DDP or ZeRO-1/2) x t-way tensor x p-way pipeline parallelism; d x t x p = world size."""

    name: ClassVar[str] = "hybrid"

    dp: int = 1
    """Data-parallel replicas: each takes 1/dp of the global batch (``model.dp_rank`` says which)."""
    tp: int = 1
    """Tensor-parallel ranks each layer is split over."""
    pp: int = 1
    """Pipeline stages."""
    zero: int = 0
    """Within the dp axis: 0 DDP, 1 ZeRO-1 (optimizer state sharded), 2 ZeRO-2 (and gradients)."""
    microbatches: int | None = None
    """Pipeline micro-batches per step (at least pp); None: 2 x pp."""
    schedule: str = "1f1b"
    """Pipeline schedule: "1f1b" or "gpipe"."""
    boundaries: tuple[int, ...] | None = None
    """Where each pipeline stage after the first begins in the layer list; None: balance parameters."""
    plan: Mapping[str, str] | None = None
    """Tensor-parallel plan (module glob -> style); None: the model's ``tensor_parallel_plan()``."""

    def __post_init__(self) -> None:
        for axis in AXES:
            value = getattr(self, axis)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{axis}={value!r} must be a positive integer")
        if self.zero not in (0, 1, 2):
            raise ConfigError(f"zero={self.zero!r} is not supported in a mesh; use zero in {{0, 1, 2}}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r} is not known; use one of {SCHEDULES}")

    @property
    def num_microbatches(self) -> int:
        return self.microbatches if self.microbatches is not None else 2 * self.pp

    def validate(self, ctx: Context, model: nn.Module) -> None:
        n, size = ctx.world_size, self.dp * self.tp * self.pp
        if size != n:
            fit = (
                f"use dp={n // (self.tp * self.pp)}"
                if n % (self.tp * self.pp) == 0
                else (f"tp x pp={self.tp * self.pp} must divide the world size; tp x pp in {divisors(n)}")
            )
            raise ConfigError(
                f"dp={self.dp} x tp={self.tp} x pp={self.pp} = {size} ranks, but the world has {n}; {fit}"
            )
        if self.tp > 1:
            check_plan(model, resolve_plan(model, self.plan), self.tp)
        if self.pp > 1:
            check_pipeline(model, self.pp, self.num_microbatches, self.schedule, self.boundaries)

    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx: Context) -> Runtime:
        return HybridRuntime(self, model, optimizer, ctx)


def _rebuild_optimizer(
    optimizer: torch.optim.Optimizer, replaced: dict[nn.Parameter, nn.Parameter], module: nn.Module
) -> torch.optim.Optimizer:
    """The same optimizer over this rank's parameters: shards for split ones, none for other stages'."""
    kept = set(module.parameters())
    groups = []
    for group in optimizer.param_groups:
        params = [replaced.get(p, p) for p in group["params"]]
        groups.append([p for p in dict.fromkeys(params) if p in kept])
    return rebuild_optimizer(optimizer, groups)


class HybridRuntime(Runtime):
    """The model after tensor and pipeline splitting, the data-parallel runtime over it, and the schedule."""

    def __init__(
        self, strategy: Hybrid, module: nn.Module, optimizer: torch.optim.Optimizer | None, ctx: Context
    ) -> None:
        super().__init__(strategy, module, optimizer)
        self.mesh = mesh = Mesh(ctx, strategy.dp, strategy.pp, strategy.tp)
        self.dp_group = mesh.groups["dp"]
        self.shapes = {k: (v.shape, v.dtype) for k, v in module.state_dict().items()}
        """Every key of the whole model's state dict, its shape and dtype (``full_state_dict`` rebuilds them)."""
        self.aliases = aliases(module)
        """Tied names -> the first name (a pipeline's last stage knows the embedding only as the head)."""
        replicate_from_rank0(module, [], ctx.world)  # shards and stages are cut from one model
        self.tp = (
            apply_plan(module, resolve_plan(module, strategy.plan), mesh.groups["tp"])
            if strategy.tp > 1
            else None
        )
        self.pipeline, self.tied_groups = None, {}
        if strategy.pp > 1:
            stage = PipelineStage(module, strategy.pp, strategy.boundaries, mesh.coords["pp"])
            for stages in stage.tied_sets:  # every rank joins every split, in the same order
                group = mesh.split_stages(stages, "pp-tied")
                if stages in stage.tied:
                    self.tied_groups[stages] = group
            self.pipeline = PipelineSchedule(
                stage, mesh.groups["pp"], strategy.num_microbatches, strategy.schedule
            )
            module.forward = self.pipeline.forward  # model(x): inference through the stages
        if optimizer is not None:
            self.optimizer = _rebuild_optimizer(optimizer, self.tp.replaced if self.tp else {}, module)
        if self.tp is not None:
            self.tp.replaced.clear()  # let the whole parameters go
        self.data_parallel = self._data_parallel(strategy, ctx) if strategy.dp > 1 else None
        if self.data_parallel is not None:
            self.optimizer = self.data_parallel.optimizer
            self.theory = f"dp axis: {self.data_parallel.theory} (tp, pp traffic not counted)"
        else:
            self.theory = "tp and pp traffic follows the activations (no data-parallel theory)"
        self._sync = True
        self._first_holder: dict | None = None
        self._clip_mask: torch.Tensor | None = None

    def _data_parallel(self, strategy: Hybrid, ctx: Context) -> Runtime:
        """DDP or ZeRO-1/2 over this rank's parameters on the dp group."""
        if strategy.zero == 0:
            return DDPRuntime(DDP(), self.module, self.optimizer, self.dp_group)
        runtime = {1: Stage1Runtime, 2: Stage2Runtime}[strategy.zero]
        return runtime(Zero(stage=strategy.zero), self.module, self.optimizer, ctx, group=self.dp_group)

    # -- training ---------------------------------------------------------------------------------

    def _forward_loss(
        self, forward: Callable[[], torch.Tensor], targets: torch.Tensor, loss_fn: LossFunction | None
    ) -> torch.Tensor:
        """The loss of ``forward()``'s logits: with no ``loss_fn`` under tensor parallelism, vocabulary-parallel."""
        if loss_fn is None and self.tp is not None and self.tp.heads:
            with self.tp.sharded_logits():
                logits = forward()
            return vocab_parallel_cross_entropy(logits, targets, self.tp.group)
        return (loss_fn or token_cross_entropy)(forward(), targets)

    def train_step(
        self, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFunction | None = None
    ) -> float:
        """One batch forward and backward; under a pipeline, its schedule over ``microbatches``.

        The pipeline's loss lives on its last stage: one all-gather on the pp group gives it to all.
        """
        if self.pipeline is None:
            loss = self._forward_loss(lambda: self.module(inputs), targets, loss_fn)
            loss.backward()
            return self.mean_loss(loss.detach())
        with self.data_parallel.no_sync() if self.data_parallel else contextlib.nullcontext():
            loss = self.pipeline.run(inputs, targets, lambda run, y: self._forward_loss(run, y, loss_fn))
        if self._sync:
            self._finish_gradients()
        return self.mean_loss(self.pipeline.finish_step(loss))

    def _finish_gradients(self) -> None:
        """After the schedule: sum tied gradients across stages, then the data-parallel reduction.

        Tied: one all-reduce per set of sharing stages over just those ranks, of the tied gradients.
        Data parallel: a backward of zero loss adds nothing to any gradient but fires every
        parameter's hook, so DDP / ZeRO reduce what the micro-batches accumulated.
        """
        for stages, group in self.tied_groups.items():
            for param in self.pipeline.stage.tied[stages]:
                group.all_reduce(param.grad)
        if self.data_parallel is not None:
            params = [p for p in self.module.parameters() if p.requires_grad]
            torch.autograd.backward(params, [p.new_zeros(()).expand_as(p) for p in params])

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        previous, self._sync = self._sync, False
        try:
            with self.data_parallel.no_sync() if self.data_parallel else contextlib.nullcontext():
                yield
        finally:
            self._sync = previous

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the norm of the whole model's gradient: each element counted once across the mesh.

        Sums of squares of this rank's shards (a replicated parameter on tp rank 0 only, a tied one on
        its first stage only), all-reduced over the tp and pp groups, and over dp where ZeRO shards
        the gradients (its master gradient shard, weighted by a mask of the counted elements).
        """
        if self.data_parallel is not None and self.strategy.zero:
            master = self.data_parallel.master
            master.unscale()
            if self._clip_mask is None:
                self._clip_mask = self._counted_mask(self.data_parallel.shards.segments(), master.grad)
            grads = [master.grad]
            squares = torch.dot(master.grad, master.grad * self._clip_mask).reshape(1)
            self.dp_group.all_reduce(squares)
        else:
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            counted = [p.grad for p in self.module.parameters() if p.grad is not None and self._counted(p)]
            squares = sum(
                (torch.linalg.vector_norm(g, dtype=torch.float32) ** 2 for g in counted), torch.zeros(())
            ).reshape(1)
        self.mesh.groups["tp"].all_reduce(squares)
        self.mesh.groups["pp"].all_reduce(squares)
        total = squares[0].sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return total

    def _counted(self, param: nn.Parameter) -> bool:
        """Whether this rank counts ``param`` in the global norm: a tp shard, or tp rank 0's copy of a
        replicated parameter, on the first stage that holds it."""
        if self._first_holder is None:
            stages_of = self.pipeline.stage.tied.items() if self.pipeline else ()
            self._first_holder = {p: stages[0] for stages, ps in stages_of for p in ps}
        split = self.tp is not None and param in self.tp.splits
        stage = self.mesh.coords["pp"]
        return (split or self.mesh.coords["tp"] == 0) and self._first_holder.get(param, stage) == stage

    def _counted_mask(self, segments: list, grad: torch.Tensor) -> torch.Tensor:
        """1 where an element of the ZeRO gradient shard is counted in the norm, 0 elsewhere (padding too)."""
        params = dict(self.module.named_parameters(remove_duplicate=False))
        mask = torch.zeros_like(grad, dtype=torch.float32)
        for segment in segments:
            if self._counted(params[segment.name]):
                mask[segment.master_lo : segment.master_lo + segment.numel] = 1
        return mask

    # -- Runtime interface ------------------------------------------------------------------------

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsplit model's state dict: dp shards (ZeRO), then tp shards, then pp stages gathered."""
        if self.data_parallel is not None:
            state = self.data_parallel.full_state_dict()
        else:
            state = super().full_state_dict()
        if self.tp is not None:
            self.tp.unshard_state(self.module, state)
        if self.pipeline is not None:
            state = self.pipeline.gather_state(state, self.shapes)
        return {k: state[k] for k in self.shapes}

    def checkpoint_pieces(self, optimizer: Any) -> list[Piece]:
        """The pieces of the data-parallel runtime, translated to the whole model's names and shapes.

        A tensor-parallel shard becomes the boxes of the whole parameter it holds (``parts`` of them
        for a fused q|k|v); a replicated copy is written by its holders in turn; a tied parameter only
        by the stage that holds it first. ZeRO shards are the same on every tp rank of a replicated
        parameter, so only tp rank 0 writes those.
        """
        inner = (
            self.data_parallel.checkpoint_pieces(optimizer)
            if self.data_parallel
            else super().checkpoint_pieces(optimizer)
        )
        params = dict(self.module.named_parameters(remove_duplicate=False))
        coords, mesh = self.mesh.coords, self.strategy
        out = []
        for piece in inner:
            kind, name, *state = piece.key.split("/", 2)
            canonical = self.aliases.get(name, name)
            key = "/".join([kind, canonical, *state])
            split = (
                self.tp.splits.get(params.get(name))
                if self.tp is not None and kind in ("model", "optim")
                else None
            )
            save = piece.save and (canonical == name or self.pipeline is None)
            if piece.replicated:
                index, count = (
                    (coords["dp"], mesh.dp)
                    if split
                    else (coords["dp"] * mesh.tp + coords["tp"], mesh.dp * mesh.tp)
                )
                share = (index, count)
            else:
                share, save = (
                    None,
                    save and (split is not None or coords["tp"] == 0 or not piece.tensor.dim()),
                )
            if split is None or not piece.tensor.dim():
                out.append(
                    Piece(
                        key,
                        piece.shape,
                        piece.offsets,
                        piece.tensor,
                        piece.replicated,
                        save,
                        piece.required,
                        share=share,
                    )
                )
                continue
            dim, parts = split
            out += tp_boxes(key, piece, dim, parts, coords["tp"], mesh.tp, save, share)
        return out

    def after_checkpoint_load(self) -> None:
        if self.data_parallel is not None:
            self.data_parallel.after_checkpoint_load()

    def metrics(self) -> dict[str, Any]:
        if self.pipeline is None:
            return {}
        return {
            "bubble": self.pipeline.bubble,
            "bubble_theory": self.pipeline.bubble_theory,
            "in_flight": self.pipeline.peak_in_flight,
        }

    def memory_tensors(self) -> dict[str, list[torch.Tensor]]:
        if self.data_parallel is not None:
            return self.data_parallel.memory_tensors()
        return super().memory_tensors()

    def theory_bytes_per_step(self) -> int:
        """The data-parallel axis's bytes (tensor and pipeline traffic depend on the batch, not counted)."""
        return self.data_parallel.theory_bytes_per_step() if self.data_parallel else 0


def tp_boxes(
    key: str, piece: Piece, dim: int, parts: int, rank: int, size: int, save: bool, share: tuple | None
) -> list[Piece]:
    """A piece of a tensor-parallel shard as boxes of the whole tensor (see ``shard_tensor``).

    Along ``dim`` the whole tensor is ``parts`` equal parts, each cut into ``size`` slices; the shard
    is slice ``rank`` of every part, in order. Other dimensions keep their offsets.
    """
    slice_len = piece.shape[dim] // parts
    whole = list(piece.shape)
    whole[dim] = piece.shape[dim] * size
    start, length = piece.offsets[dim], piece.lengths[dim]
    boxes, done = [], 0
    while done < length:
        local = start + done
        part, within = divmod(local, slice_len)
        n = min(slice_len - within, length - done)
        offsets = list(piece.offsets)
        offsets[dim] = part * slice_len * size + rank * slice_len + within
        tensor = piece.tensor.narrow(dim, done, n)
        boxes.append(
            Piece(
                key, tuple(whole), tuple(offsets), tensor, piece.replicated, save, piece.required, share=share
            )
        )
        done += n
    return boxes
