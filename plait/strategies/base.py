"""The small interface every strategy implements, and what ``plait.setup`` adds to the model.

A *strategy* is a frozen config object (``plait.DDP(bucket_mb=25)``). ``setup`` hands it the model,
the optimizer the user's factory made, and the :class:`~plait.comm.Context`; ``apply`` lays the
model out, installs its hooks and returns a *runtime*: the per-model state (flat buffers, buckets,
handles in flight) that ``model.no_sync()`` and ``plait.full_state_dict`` talk to.

``setup`` keeps the user's module object and its ``state_dict`` keys: like FSDP2's ``fully_shard``,
it swaps the module's class for a subclass that also inherits :class:`PlaitModule`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from plait.checkpoint.format import Piece
from plait.checkpoint.pieces import model_pieces, optimizer_pieces
from plait.comm import Context, Group, current
from plait.comm.stats import bus_bytes
from plait.errors import ConfigError
from plait.precision import DynamicLossScaler

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(model output, targets) -> the mean loss over this rank's samples."""


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of next-token logits (..., V) against token ids (...): the default loss."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten())


class Runtime:
    """Per-model state of an applied strategy. The defaults suit a strategy that keeps full replicas."""

    theory: str = "no communication"
    """How ``theory_bytes_per_step`` is computed, for the run summary."""
    supports_no_sync: bool = True
    """Whether gradient accumulation (``train_step(microbatches=k)``) defers communication to the last
    micro-batch with ``no_sync()``; ZeRO-3 reduces every micro-batch instead, to keep gradients sharded."""
    synchronous: bool = True
    """Whether ranks step in lockstep (an asynchronous strategy must not be re-synchronized every step)."""
    dp_group: Any = None
    """The group of ranks that share each global batch (None: all ranks)."""
    dp_rank: int | None = None
    dp_size: int | None = None
    microbatches: int = 1
    """Micro-batches of the last ``train_step`` (the step's theory bytes count them where it matters)."""
    more_microbatches: bool = False
    """True inside ``train_step`` while another micro-batch of the same step follows: the parameters
    do not change before its forward (ZeRO-3 keeps the units it gathers first)."""

    def __init__(
        self, strategy: Strategy, module: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> None:
        self.strategy = strategy
        self.module = module
        self.optimizer = optimizer

    @property
    def uneven_shares(self) -> bool:
        """Whether the data-parallel ranks may take different shares of the global batch (``--balance``,
        plait.data.balance), each accumulating its own number of micro-batches: where they step in lockstep."""
        return self.synchronous

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally inside the block; the first backward after it synchronizes."""
        yield

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model as ordinary tensors, keyed as the original module's ``state_dict()``."""
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def train_step(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss_fn: LossFunction | None = None,
        *,
        microbatches: int = 1,
    ) -> float:
        """Forward, loss and backward of one batch (the strategy's hooks communicate); the global mean loss.

        The batch is cut into ``microbatches`` equal chunks along dim 0 and their gradients accumulate
        (each chunk's loss divided by ``microbatches``); all but the last run under ``no_sync`` where
        the strategy defers communication (``supports_no_sync``). ``loss_fn(output, targets)`` returns a
        chunk's mean loss; None: token cross-entropy. Returns the mean over the global batch, reduced
        once (:meth:`mean_loss`). The optimizer step stays the caller's.
        """
        chunks = split_microbatches(inputs, targets, microbatches)
        total = torch.zeros((), dtype=torch.float32, device=inputs.device)
        self.microbatches = len(chunks)
        try:
            for i, (x, y) in enumerate(chunks):
                self.more_microbatches = i < len(chunks) - 1
                defer = self.more_microbatches and self.supports_no_sync
                with self.no_sync() if defer else contextlib.nullcontext():
                    loss = self.forward_loss(x, y, loss_fn) / len(chunks)
                    loss.backward()
                total += loss.detach().float()
        finally:
            self.more_microbatches = False
        return self.mean_loss(total)

    def forward_loss(
        self, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFunction | None
    ) -> torch.Tensor:
        """This rank's mean loss of one chunk, ready for backward (tensor parallelism: on vocabulary shards)."""
        return (loss_fn or token_cross_entropy)(self.module(inputs), targets)

    def mean_loss(self, loss: torch.Tensor) -> float:
        """This rank's mean loss averaged over the data-parallel ranks (one 4-byte all-reduce on them).

        Equal local batches make it the mean over the global batch. Ranks that do not step in
        lockstep (asynchronous strategies) report their own loss instead: a collective would sync them.
        """
        group = self.dp_group if self.dp_group is not None else current().world
        if not self.synchronous or group.size == 1:
            return loss.item()
        loss = loss.reshape(1).clone()
        group.all_reduce(loss, op="avg")
        return loss.item()

    def loss_bytes(self) -> int:
        """Bytes this rank sends reducing ``train_step``'s loss (:meth:`mean_loss`: 4 bytes all-reduced over dp)."""
        group = self.dp_group if self.dp_group is not None else current().world
        if not self.synchronous or group.size == 1:
            return 0
        return bus_bytes("all_reduce", 4, group.size)

    def mesh_sizes(self) -> dict[str, int] | None:
        """The degree of each mesh axis (``{"dp": 2, "pp": 1, "tp": 2}``) when the strategy lays out a mesh; else None."""
        return None

    def summary_group(self) -> Group:
        """The ranks a run summary gathers per-rank figures (peak memory) over: every rank training this model.

        Default: the data-parallel ranks (a parameter server's servers have left by the end); a mesh's whole world.
        """
        return self.dp_group if self.dp_group is not None else current().world

    def gradient_squares(self, counted: Callable[[nn.Parameter], bool] | None = None) -> torch.Tensor:
        """The sum of squares (fp32, 0-d) of the gradient after backward, each element counted once over the dp ranks.

        ``counted(param)`` limits it to the parameters it accepts (a mesh counts a tensor-parallel
        replica once). Runtimes that shard gradients all-reduce their shards' sums on the dp group;
        here the gradients are replicated (no communication).
        """
        grads = [
            p.grad for p in self.module.parameters() if p.grad is not None and (counted is None or counted(p))
        ]
        return sum_of_squares(grads)

    def scale_gradients_(self, coef: torch.Tensor) -> None:
        """Multiply every gradient this rank holds (the ones the optimizer steps on) by ``coef``."""
        for p in self.module.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale gradients so their global L2 norm is at most ``max_norm``; return the norm before clipping."""
        total = self.gradient_squares().sqrt()
        self.scale_gradients_(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        return total

    def theory_bytes_per_step(self) -> int:
        """Bytes one rank should send per optimizer step by the algorithm's theory (0: no communication)."""
        return 0

    def checkpoint_pieces(self, optimizer: Any) -> list[Piece]:
        """What this rank saves and loads (``plait.checkpoint``): here every tensor whole, replicated."""
        state = optimizer_pieces(self.module, optimizer)  # first: it may flatten (move) the parameters
        return model_pieces(self.module) + state

    def replicated_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors every rank should hold identically (what ``plait.check_replicas`` compares)."""
        return dict(self.module.state_dict())

    def checkpoint_guard(self) -> contextlib.AbstractContextManager:
        """Held while a checkpoint copies this rank's pieces (a strategy whose state changes in the background locks it)."""
        return contextlib.nullcontext()

    optimizer_state_elsewhere: bool = False
    """Whether the optimizer ``plait.setup`` returned on this rank holds no state (another rank steps)."""
    saves_in_background: bool = True
    """Whether ``plait.checkpoint.save(blocking=False)`` may write in the background here (else it blocks)."""

    def begin_checkpoint(self, kind: str, directory: str, step: int) -> None:
        """Called by ``plait.checkpoint.save`` / ``load`` ("save" / "load") before their first collective.

        A runtime whose other ranks are busy elsewhere brings them in here (dedicated parameter
        servers take their part in the checkpoint when every worker has asked).
        """

    def after_checkpoint_load(self) -> None:
        """Bring derived copies (compute-dtype parameters, gathered replicas) up to the loaded values."""

    @property
    def loss_scaler(self) -> DynamicLossScaler | None:
        """fp16's dynamic loss scaler, whose scale and growth interval a caller may set; None without fp16."""
        return None

    def finish_training(self) -> None:
        """This rank has taken its last step: release, without waiting, what other ranks still need of it.

        Called before any closing collective (a run summary), where a rank may wait long for a
        straggler: a parameter-server worker tells the servers it is done, so they stop expecting
        its pushes. Idempotent; ``plait.shutdown`` does it too.
        """

    def final_parameters(self) -> None:
        """Training has ended on this rank: make its model the run's final parameters.

        A no-op where every replica holds them after the last step. An asynchronous worker's
        replica is the last reply it got, which the other workers' later pushes leave behind: it
        installs the servers' final state, waiting (like a closing collective) for the last worker.
        """

    def metrics(self) -> dict[str, Any]:
        """Strategy-specific figures for the per-step metrics (staleness, synchronizations, ...)."""
        return {}

    def memory_tensors(self) -> dict[str, list[torch.Tensor]]:
        """The tensors this runtime keeps alive, by role (see ``plait.memory_report``)."""
        params = list(self.module.parameters())
        master = getattr(self, "master", None)
        return {
            "parameters": params + self.parameter_tensors(),
            "gradients": [p.grad for p in params if p.grad is not None]
            + self.gradient_tensors()
            + ([master.grad] if master is not None and master.grad is not None else []),
            "master": master.own_tensors() if master is not None else [],
            "buffers": self.buffer_tensors(),
        }

    def parameter_tensors(self) -> list[torch.Tensor]:
        """Parameter storage beyond the module's parameters (zero3's shards)."""
        return []

    def gradient_tensors(self) -> list[torch.Tensor]:
        """Gradient storage beyond the parameters' ``.grad`` (flat buffers, shards)."""
        return []

    def buffer_tensors(self) -> list[torch.Tensor]:
        """Communication buffers kept alive between steps (idle bucket buffers of ZeRO-2/3)."""
        return []


class Strategy:
    """Base class of strategy configs. Subclasses are frozen dataclasses named in :data:`STRATEGIES`."""

    name: ClassVar[str]

    def validate(self, ctx: Context, model: nn.Module) -> None:
        """Raise :class:`plait.ConfigError` if this strategy cannot run ``model`` on ``ctx``'s world."""

    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx: Context) -> Runtime:
        raise NotImplementedError

    def model_state_bytes(self, params: float, world: int, k: float = 12.0) -> float | None:
        """Bytes of parameters, gradients and optimizer state per device by the ZeRO paper's accounting
        (Rajbhandari et al., SC'20, section 3.1: 2 + 2 + K bytes per parameter, mixed-precision Adam with
        K = 12), over ``world`` data-parallel devices; None where the paper has no formula."""
        return None

    def for_batch(self, world_size: int, batch_size: int, micro_batch: int) -> Strategy:
        """This strategy as it runs a trainer's steps of ``batch_size`` sequences, ``micro_batch`` at a time.

        Default: unchanged. A pipeline takes its micro-batch count from them.
        """
        return self


class PlaitModule:
    """Methods ``plait.setup`` adds to the user's module (mixed in ahead of its own class)."""

    _plait_runtime: Runtime

    @property
    def plait_runtime(self) -> Runtime:
        return self._plait_runtime

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        """Inside this block backward accumulates gradients without communicating (gradient accumulation)."""
        return self._plait_runtime.no_sync()

    def train_step(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss_fn: LossFunction | None = None,
        *,
        microbatches: int = 1,
    ) -> float:
        """Forward, loss and backward of one batch under the strategy (a pipeline runs its schedule).

        ``microbatches`` equal chunks of dim 0 accumulate gradients (without communication until the
        last, where the strategy allows); a pipeline runs its schedule over them. ``loss_fn(output,
        targets)`` -> mean loss; None: token cross-entropy (vocabulary-parallel under tensor
        parallelism). Returns the global mean loss, reduced once, the same float on every rank
        (asynchronous strategies: this rank's). Call ``optimizer.step()`` after it.
        """
        return self._plait_runtime.train_step(inputs, targets, loss_fn, microbatches=microbatches)

    @property
    def dp_rank(self) -> int:
        """This rank's index among the ranks that share each global batch: which slice a data loader takes."""
        runtime = self._plait_runtime
        if runtime.dp_rank is not None:
            return runtime.dp_rank
        return runtime.dp_group.rank if runtime.dp_group is not None else current().rank

    @property
    def dp_size(self) -> int:
        """How many ranks share each global batch."""
        runtime = self._plait_runtime
        if runtime.dp_size is not None:
            return runtime.dp_size
        return runtime.dp_group.size if runtime.dp_group is not None else current().world_size


_swapped_classes: dict[type, type] = {}


def adopt(module: nn.Module, runtime: Runtime) -> nn.Module:
    """Give ``module`` the :class:`PlaitModule` methods in place, bound to ``runtime``."""
    cls = type(module)
    if issubclass(cls, PlaitModule):
        raise ValueError("this module was already set up by plait.setup; set up a fresh module")
    if cls not in _swapped_classes:
        _swapped_classes[cls] = type(
            f"Plait{cls.__name__}", (PlaitModule, cls), {"__module__": cls.__module__}
        )
    module.__class__ = _swapped_classes[cls]
    module._plait_runtime = runtime
    return module


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters that need gradients, each once (a tied parameter under its first name)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def parameter_names(model: nn.Module) -> dict[nn.Parameter, str]:
    return {p: n for n, p in reversed(list(model.named_parameters(remove_duplicate=False)))}


def group_ordered(model: nn.Module, optimizer: Any) -> list[list[nn.Parameter]]:
    """Trainable parameters split by optimizer group (model order within each), so each group can be one flat run.

    Parameters the optimizer does not hold form a last group of their own.
    """
    trainable = [p for _, p in trainable_named_parameters(model)]
    position = {p: i for i, p in enumerate(trainable)}
    groups: list[list[nn.Parameter]] = []
    seen: set[nn.Parameter] = set()
    for group in getattr(optimizer, "param_groups", []):
        members = sorted(
            (p for p in group["params"] if p in position and p not in seen), key=position.__getitem__
        )
        seen.update(members)
        if members:
            groups.append(members)
    rest = [p for p in trainable if p not in seen]
    if rest:
        groups.append(rest)
    return groups


def group_index(groups: list[list[nn.Parameter]]) -> dict[nn.Parameter, int]:
    """Each parameter's optimizer group, from :func:`group_ordered`'s lists."""
    return {p: g for g, members in enumerate(groups) for p in members}


def regroup(param_groups: list[dict[str, Any]], params_by_group: list[list[Any]]) -> list[dict[str, Any]]:
    """The same optimizer groups (every hyperparameter) over other parameters, group by group."""
    return [
        {**{k: v for k, v in group.items() if k != "params"}, "params": params}
        for group, params in zip(param_groups, params_by_group)
    ]


_NORM_ROW = 1024


def sum_of_squares(grads: list[torch.Tensor]) -> torch.Tensor:
    """The sum of squares of ``grads`` (fp32 result), accurate whatever the tensors' sizes.

    One fp32 norm per row of 1,024 elements, the rows' squares summed in fp64: a single fp32
    ``vector_norm`` over a 7.5M-element flat buffer is off by ~8e-4 (relative) on CPU, which made the
    clipped gradient depend on how a strategy lays its buffers out; this is within 4e-8 for the same
    cost (3.8 against 3.1 ms for 7.5M elements, one thread).
    """
    if not grads:
        return torch.zeros(())
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device)
    for g in grads:
        flat = g.reshape(-1)
        whole = flat.numel() - flat.numel() % _NORM_ROW
        if whole:
            rows = flat[:whole].view(-1, _NORM_ROW)
            total += torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32).double().square().sum()
        if whole < flat.numel():
            total += torch.linalg.vector_norm(flat[whole:], dtype=torch.float32).double().square()
    return total.float()


def split_microbatches(
    inputs: torch.Tensor, targets: torch.Tensor, microbatches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``microbatches`` equal chunks of a batch along dim 0; ConfigError if it does not split evenly."""
    if not isinstance(microbatches, int) or microbatches < 1:
        raise ConfigError(f"microbatches={microbatches!r} must be a positive integer")
    if inputs.shape[0] % microbatches:
        raise ConfigError(
            f"the local batch of {inputs.shape[0]} does not split into microbatches={microbatches}; "
            f"use a local batch that is a multiple of {microbatches}"
        )
    return list(zip(inputs.chunk(microbatches), targets.chunk(microbatches)))


def cast_frozen_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Mixed precision: frozen parameters join the compute dtype too (they get no master copy)."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)


def flat_names(model: nn.Module, flat: Any) -> dict[str, int]:
    """Every name (tied parameters have several) of each parameter of ``flat``, with its index there."""
    index = {id(p): i for i, p in enumerate(flat.params)}
    return {n: index[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if id(p) in index}
