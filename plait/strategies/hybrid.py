"""Data, tensor and pipeline parallelism together over a device mesh (Narayanan et al., SC'21: "PTD-P").

The world's ranks form a ``dp x pp x tp`` :class:`~plait.comm.Mesh` (tp fastest-varying: a
tensor-parallel group is a run of adjacent ranks, each data-parallel replica a contiguous block of
tp x pp ranks). ``plait.Hybrid(dp=d, tp=t, pp=p, zero=z, mixed_precision=...)`` applies, in order, to
every rank's copy of the model:

1. tensor parallelism (``tensor_parallel.apply_plan`` on the tp group): layers replaced by shards;
2. pipeline parallelism (``pipeline.PipelineStage``): only this rank's stage is kept;
3. data parallelism on the dp axis over what is left: the runtime of the user's own data-parallel
   strategy (``data_parallel=plait.Zero(stage=3, bucket_mb=10)``; or DDP / ZeRO-``zero`` with
   ``mixed_precision``), built exactly as ``ddp`` and ``zero1/2/3`` build it, given the mesh.

Under a pipeline, micro-batches accumulate gradients under the data-parallel runtime's ``no_sync``;
after the schedule the tied embedding/head gradient is summed between the first and last stage (one
all-reduce of it over just those ranks), then ``sync_gradients`` reduces the accumulated gradients
on the dp axis exactly as after an ordinary backward. The step's loss and the pipeline's busy/idle
times travel together in one all-gather over the world (3 numbers per rank).

Setup broadcasts rank 0's whole model over the world once (one message per dtype), so every rank
cuts its shards and stage from the same values. Dropout inside tensor-parallel layers draws from
each rank's own generator (seed every rank alike, as for any replicated computation).
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
from plait.comm.mesh import Mesh, check_degrees, mesh_sizes
from plait.comm.stats import bus_bytes
from plait.errors import ConfigError
from plait.precision import DynamicLossScaler, parse_mixed_precision
from plait.strategies.base import LossFunction, Runtime, Strategy, token_cross_entropy
from plait.strategies.data_parallel import DataParallelRuntime, replicate_from_rank0
from plait.strategies.ddp import DDP
from plait.strategies.master import rebuild_optimizer
from plait.strategies.mesh_checkpoint import mesh_pieces
from plait.strategies.pipeline import (
    SCHEDULES,
    PipelineSchedule,
    PipelineStage,
    check_pipeline,
    pipeline_microbatches,
)
from plait.strategies.tensor_parallel import (
    apply_plan,
    check_plan,
    resolve_plan,
)
from plait.strategies.tp_ops import vocab_parallel_cross_entropy
from plait.strategies.zero import Zero


@dataclasses.dataclass(frozen=True)
class Hybrid(Strategy):
    """d-way data (DDP or ZeRO-1/2/3) x t-way tensor x p-way pipeline parallelism; d x t x p = world size."""

    name: ClassVar[str] = "hybrid"

    dp: int | None = None
    """Data-parallel replicas: each takes 1/dp of the global batch (``model.dp_rank`` says which); None: the
    ranks tp x pp leave over."""
    tp: int = 1
    """Tensor-parallel ranks each layer is split over."""
    pp: int = 1
    """Pipeline stages."""
    zero: int = 0
    """Within the dp axis: 0 DDP, 1 ZeRO-1 (optimizer state sharded), 2 ZeRO-2 (and gradients), 3 ZeRO-3
    (and parameters)."""
    mixed_precision: str | None = None
    """"bf16" or "fp16" compute with an fp32 master on the dp axis (plait.precision); "fp16" adds loss scaling."""
    data_parallel: DDP | Zero | None = None
    """The dp axis's own strategy object, with all its options (``plait.Zero(stage=3, bucket_mb=10)``);
    None: DDP (``zero=0``) or ``Zero(stage=zero)``, with ``mixed_precision``."""
    microbatches: int | None = None
    """Pipeline micro-batches per step (at least pp); None: 2 x pp."""
    schedule: str = "1f1b"
    """Pipeline schedule: "1f1b" or "gpipe"."""
    boundaries: tuple[int, ...] | None = None
    """Where each pipeline stage after the first begins in the layer list; None: balance parameters."""
    plan: Mapping[str, str] | None = None
    """Tensor-parallel plan (module glob -> style); None: the model's ``tensor_parallel_plan()``."""

    def __post_init__(self) -> None:
        check_degrees(self.dp, self.pp, self.tp)
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"zero={self.zero!r} is not a ZeRO stage; use zero in {{0, 1, 2, 3}}")
        parse_mixed_precision(self.mixed_precision)
        if self.data_parallel is not None:
            if not isinstance(self.data_parallel, (DDP, Zero)):
                raise ConfigError(
                    f"data_parallel={self.data_parallel!r} cannot run on a mesh's dp axis; use plait.DDP(...) "
                    "or plait.Zero(...)"
                )
            if self.zero or self.mixed_precision is not None:
                raise ConfigError(
                    f"zero={self.zero} / mixed_precision={self.mixed_precision!r} beside data_parallel="
                    f"{self.data_parallel!r}: set them on the data_parallel object only"
                )
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r} is not known; use one of {SCHEDULES}")

    @property
    def num_microbatches(self) -> int:
        return self.microbatches if self.microbatches is not None else 2 * self.pp

    @property
    def dp_strategy(self) -> DDP | Zero:
        """The strategy of the dp axis: ``data_parallel``, else the one ``zero`` and ``mixed_precision`` name."""
        if self.data_parallel is not None:
            return self.data_parallel
        if self.zero == 0:
            return DDP(mixed_precision=self.mixed_precision)
        return Zero(stage=self.zero, mixed_precision=self.mixed_precision)

    def for_batch(self, world_size: int, batch_size: int, micro_batch: int) -> Hybrid:
        """A dp left at 1 takes the ranks tp x pp leave over; a pipeline runs batch_size / (dp x micro_batch) micro-batches."""
        dp = world_size // (self.tp * self.pp) or 1
        microbatches = pipeline_microbatches(self.pp, dp, batch_size, micro_batch)
        return dataclasses.replace(
            self, dp=dp if self.dp == 1 else self.dp, microbatches=microbatches if self.pp > 1 else None
        )

    def validate(self, ctx: Context, model: nn.Module) -> None:
        mesh_sizes(ctx.world_size, self.dp, self.pp, self.tp)
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
        self.ctx = ctx
        self.mesh = mesh = Mesh(ctx, strategy.dp, strategy.pp, strategy.tp)
        groups = mesh.groups  # every rank builds every axis's groups, in the same order
        self.dp_group = groups["dp"]
        self.shapes = {k: (v.shape, v.dtype) for k, v in module.state_dict().items()}
        """Every key of the whole model's state dict, its shape and dtype (``full_state_dict`` rebuilds them)."""
        self.aliases = aliases(module)
        """Tied names -> the first name (a pipeline's last stage knows the embedding only as the head)."""
        replicate_from_rank0(module, [], ctx.world)  # shards and stages are cut from one model
        self.tp = (
            apply_plan(module, resolve_plan(module, strategy.plan), groups["tp"]) if strategy.tp > 1 else None
        )
        self.pipeline, self.tied_groups = None, {}
        if strategy.pp > 1:
            stage = PipelineStage(module, strategy.pp, strategy.boundaries, mesh.coords["pp"])
            for stages in stage.tied_sets:  # every rank joins every split, in the same order
                group = mesh.split_stages(stages, "pp-tied")
                if stages in stage.tied:
                    self.tied_groups[stages] = group
            self.pipeline = PipelineSchedule(
                stage, groups["pp"], strategy.num_microbatches, strategy.schedule
            )
            module.forward = self.pipeline.forward  # model(x): inference through the stages
        if optimizer is not None:
            self.optimizer = _rebuild_optimizer(optimizer, self.tp.replaced if self.tp else {}, module)
        if self.tp is not None:
            self.tp.replaced.clear()  # let the whole parameters go
        self.data_parallel: DataParallelRuntime = strategy.dp_strategy.runtime(module, self.optimizer, mesh)
        self.optimizer = self.data_parallel.optimizer
        self.supports_no_sync = self.data_parallel.supports_no_sync
        self.theory = f"dp axis: {self.data_parallel.theory} (tp, pp traffic not counted)"
        self._sync = True
        self._first_holder: dict | None = None

    # -- training ---------------------------------------------------------------------------------

    def _loss(
        self, forward: Callable[[], torch.Tensor], targets: torch.Tensor, loss_fn: LossFunction | None
    ) -> torch.Tensor:
        """The loss of ``forward()``'s logits: with no ``loss_fn`` under tensor parallelism, vocabulary-parallel
        (no rank ever holds the (B, T, V) logits: two small all-reduces instead of their all-gather)."""
        if loss_fn is None and self.tp is not None and self.tp.heads:
            with self.tp.sharded_logits():
                logits = forward()
            return vocab_parallel_cross_entropy(logits, targets, self.tp.group)
        return (loss_fn or token_cross_entropy)(forward(), targets)

    def forward_loss(
        self, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFunction | None
    ) -> torch.Tensor:
        return self._loss(lambda: self.module(inputs), targets, loss_fn)

    def train_step(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss_fn: LossFunction | None = None,
        *,
        microbatches: int = 1,
    ) -> float:
        """One batch forward and backward; under a pipeline, its schedule over the micro-batches.

        Under a pipeline ``microbatches`` > 1 sets the schedule's micro-batch count for this step
        (default: the strategy's ``microbatches``). The loss lives on the last stage: one all-gather
        over the world of [loss, busy, wall] per rank gives every rank the global mean and the bubble.
        """
        if self.pipeline is None:
            return super().train_step(inputs, targets, loss_fn, microbatches=microbatches)
        with self.data_parallel.no_sync():
            loss = self.pipeline.run(
                inputs,
                targets,
                lambda run, y: self._loss(run, y, loss_fn),
                microbatches if microbatches > 1 else None,
                self.data_parallel.loss_scale(),
            )
        if self._sync:
            self._finish_gradients()
        return self._step_loss(loss)

    def loss_bytes(self) -> int:
        """Under a pipeline: the one all-gather over the world of every stage's [loss, busy, wall] (float64)."""
        if self.pipeline is None:
            return super().loss_bytes()
        world = self.ctx.world_size
        return bus_bytes("all_gather", world * 3 * 8, world)

    def _step_loss(self, loss: torch.Tensor) -> float:
        """The global mean loss (last stages, averaged over dp) and this pipeline's bubble, from one all-gather."""
        mine = self.pipeline.step_figures(loss)
        everyone = torch.empty(self.ctx.world_size * mine.numel(), dtype=mine.dtype)
        self.ctx.world.all_gather(everyone, mine)
        grid = everyone.view(*(self.mesh.sizes[axis] for axis in ("dp", "pp", "tp")), mine.numel())
        line = grid[self.mesh.coords["dp"], :, self.mesh.coords["tp"]]  # this rank's pipeline, by stage
        self.pipeline.record_bubble(line[:, 1], line[:, 2])
        return grid[:, -1, 0, 0].mean().item()

    def _finish_gradients(self) -> None:
        """After the schedule: sum tied gradients across stages, then the data-parallel reduction.

        Tied: one all-reduce per set of sharing stages over just those ranks, of the tied gradients.
        """
        for stages, group in self.tied_groups.items():
            for param in self.pipeline.stage.tied[stages]:
                group.all_reduce(param.grad)
        self.data_parallel.sync_gradients()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        previous, self._sync = self._sync, False
        try:
            with self.data_parallel.no_sync():
                yield
        finally:
            self._sync = previous

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the norm of the whole model's gradient: each element counted once across the mesh.

        The data-parallel runtime's sum of squares of the counted parameters (a replicated parameter
        on tp rank 0 only, a tied one on its first stage only; ZeRO all-reduces its shards' sums over
        dp), all-reduced over the tp and pp groups: 4 bytes each.
        """
        squares = self.data_parallel.gradient_squares(self._counted).reshape(1)
        for axis in ("tp", "pp"):
            if self.mesh.sizes[axis] > 1:
                self.mesh.group(axis).all_reduce(squares)
        total = squares[0].sqrt()
        self.data_parallel.scale_gradients_(torch.clamp(max_norm / (total + 1e-6), max=1.0))
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

    # -- Runtime interface ------------------------------------------------------------------------

    @property
    def uneven_shares(self) -> bool:
        """Not under a pipeline: every stage's schedule runs the same micro-batches."""
        return self.pipeline is None

    def mesh_sizes(self) -> dict[str, int]:
        return dict(self.mesh.sizes)

    def summary_group(self) -> Group:
        """Every rank of the mesh (each holds a different part of the model)."""
        return self.ctx.world

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsplit model's state dict: dp shards (ZeRO), then tp shards, then pp stages gathered."""
        state = self.data_parallel.full_state_dict()
        if self.tp is not None:
            self.tp.unshard_state(self.module, state)
        if self.pipeline is not None:
            state = self.pipeline.gather_state(state, self.shapes)
        return {k: state[k] for k in self.shapes}

    def checkpoint_pieces(self, optimizer: Any) -> list[Piece]:
        """The data-parallel runtime's pieces as boxes of the whole model's tensors (:func:`mesh_pieces`)."""
        return mesh_pieces(
            self.data_parallel.checkpoint_pieces(optimizer),
            dict(self.module.named_parameters(remove_duplicate=False)),
            self.aliases,
            self.tp,
            self.mesh,
            self.pipeline is not None,
        )

    def after_checkpoint_load(self) -> None:
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
        return self.data_parallel.memory_tensors()

    @property
    def loss_scaler(self) -> DynamicLossScaler | None:
        return self.data_parallel.loss_scaler

    def theory_bytes_per_step(self) -> int:
        """The data-parallel axis's bytes (tensor and pipeline traffic depend on the batch, not counted)."""
        return self.data_parallel.theory_bytes_per_step()
