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
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from plait.comm import Context


class Runtime:
    """Per-model state of an applied strategy. The defaults suit a strategy that keeps full replicas."""

    theory: str = "no communication"
    """How ``theory_bytes_per_step`` is computed, for the run summary."""
    supports_no_sync: bool = True
    """Whether ``no_sync()`` can defer communication (gradient accumulation without it also works)."""

    def __init__(
        self, strategy: Strategy, module: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> None:
        self.strategy = strategy
        self.module = module
        self.optimizer = optimizer

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally inside the block; the first backward after it synchronizes."""
        yield

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model as ordinary tensors, keyed as the original module's ``state_dict()``."""
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale gradients so their global L2 norm is at most ``max_norm``; return the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(
            [p for p in self.module.parameters() if p.grad is not None], max_norm
        )

    def theory_bytes_per_step(self) -> int:
        """Bytes one rank should send per optimizer step by the algorithm's theory (0: no communication)."""
        return 0

    def memory_tensors(self) -> dict[str, list[torch.Tensor]]:
        """The tensors this runtime keeps alive, by role (see ``plait.memory_report``)."""
        params = list(self.module.parameters())
        master = getattr(self, "master", None)
        return {
            "parameters": params + self.parameter_tensors(),
            "gradients": [p.grad for p in params if p.grad is not None]
            + self.gradient_tensors()
            + ([master.grad] if master is not None else []),
            "master": [master.data] if master is not None else [],
        }

    def parameter_tensors(self) -> list[torch.Tensor]:
        """Parameter storage beyond the module's parameters (zero3's shards)."""
        return []

    def gradient_tensors(self) -> list[torch.Tensor]:
        """Gradient storage beyond the parameters' ``.grad`` (flat buffers, shards, bucket pools)."""
        return []


class Strategy:
    """Base class of strategy configs. Subclasses are frozen dataclasses named in :data:`STRATEGIES`."""

    name: ClassVar[str]

    def validate(self, ctx: Context, model: nn.Module) -> None:
        """Raise :class:`plait.ConfigError` if this strategy cannot run ``model`` on ``ctx``'s world."""

    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx: Context) -> Runtime:
        raise NotImplementedError


class PlaitModule:
    """Methods ``plait.setup`` adds to the user's module (mixed in ahead of its own class)."""

    _plait_runtime: Runtime

    @property
    def plait_runtime(self) -> Runtime:
        return self._plait_runtime

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        """Inside this block backward accumulates gradients without communicating (gradient accumulation)."""
        return self._plait_runtime.no_sync()


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


def clip_flat_grads_(grads: list[torch.Tensor], max_norm: float, sum_squares: Any = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over flat gradient tensors: one norm per tensor, not per parameter.

    ``sum_squares``, when given, turns this rank's sum of squares into the global one (an all-reduce
    over the ranks that hold disjoint shards); replicated gradients need none.
    """
    squares = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) ** 2 for g in grads]).sum()
    if sum_squares is not None:
        squares = sum_squares(squares)
    total = squares.sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total


def cast_frozen_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Mixed precision: frozen parameters join the compute dtype too (they get no master copy)."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)


def flat_names(model: nn.Module, flat: Any) -> dict[str, int]:
    """Every name (tied parameters have several) of each parameter of ``flat``, with its index there."""
    index = {id(p): i for i, p in enumerate(flat.params)}
    return {n: index[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if id(p) in index}
