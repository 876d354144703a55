"""``plait.setup`` and ``plait.full_state_dict``: the two calls between a user's model and a strategy."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from plait.comm import Context, current
from plait.errors import ConfigError
from plait.strategies import PlaitModule, Strategy, resolve
from plait.strategies.base import adopt

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def setup(
    model: nn.Module,
    strategy: str | Strategy = "ddp",
    optimizer: OptimizerFactory | torch.optim.Optimizer | None = None,
    *,
    ctx: Context | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer | None]:
    """Prepare ``model`` (any ``nn.Module``) and its optimizer for training under ``strategy``.

    ``optimizer`` is best a factory, ``lambda params: plait.optim.AdamW(params, lr=3e-4)``: it is called
    with the model's parameters after the model moved to this rank's device. Any torch optimizer works.
    Returns the same module object, now also a :class:`~plait.strategies.PlaitModule` (``no_sync()``),
    and the optimizer. World size 1 (or ``strategy="none"``) trains plainly.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"plait.setup needs a torch.nn.Module, got {type(model).__name__}")
    strategy = resolve(strategy)
    ctx = ctx or current()
    strategy.validate(ctx, model)
    model.to(ctx.device)
    if optimizer is None or isinstance(optimizer, torch.optim.Optimizer):
        opt = optimizer
    elif callable(optimizer):
        opt = optimizer(model.parameters())
        if not isinstance(opt, torch.optim.Optimizer):
            raise ConfigError(
                f"the optimizer factory returned {type(opt).__name__}, not a torch.optim.Optimizer"
            )
    else:
        raise ConfigError(f"optimizer={optimizer!r} is neither a torch optimizer nor a factory of one")
    runtime = strategy.apply(model, opt, ctx)
    return adopt(model, runtime), runtime.optimizer


def full_state_dict(model: nn.Module) -> dict[str, Any]:
    """The whole model as ordinary tensors, keyed exactly as the original module's ``state_dict()``.

    Gathers shards where the strategy keeps them (ZeRO-3, tensor and pipeline parallelism); every rank
    must call it. A module plait did not set up is returned as a detached copy of its state dict.
    """
    if isinstance(model, PlaitModule):
        return model.plait_runtime.full_state_dict()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients of a model ``plait.setup`` prepared to a global L2 norm of ``max_norm``.

    Like ``torch.nn.utils.clip_grad_norm_``, but the norm is over the whole model whatever the strategy
    (sharded gradients are combined across ranks), computed on flat buffers. Returns the norm before clipping.
    """
    if not isinstance(model, PlaitModule):
        return torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    return model.plait_runtime.clip_grad_norm_(max_norm)


class DesyncError(RuntimeError):
    """Replicas that should be identical are not; the message names the tensor and the ranks."""


def check_replicas(model: nn.Module) -> None:
    """Compare a checksum of every replicated tensor across ranks; raise DesyncError naming the first that differs.

    One all-gather of two float64 numbers (sum and sum of squares) per tensor. Sharded tensors
    (ZeRO-3's parameters) and asynchronous replicas are not compared.
    """
    ctx = current()
    tensors = (
        model.plait_runtime.replicated_tensors()
        if isinstance(model, PlaitModule)
        else dict(model.state_dict())
    )
    if ctx.world_size == 1 or not tensors:
        return
    names = sorted(tensors)
    mine = torch.stack(
        [torch.stack([tensors[n].double().sum(), tensors[n].double().square().sum()]) for n in names]
    ).reshape(-1)
    everyone = torch.zeros(ctx.world_size * mine.numel(), dtype=torch.float64)
    ctx.world.all_gather(everyone, mine)
    table = everyone.view(ctx.world_size, len(names), 2)
    differs = (table != table[0]).any(dim=2)
    if differs.any():
        index = int(differs.any(dim=0).nonzero()[0])
        ranks = differs[:, index].nonzero().flatten().tolist()
        raise DesyncError(
            f"replicas differ: {names[index]!r} on rank(s) {ranks} is not rank 0's "
            f"(checksums {table[ranks[0], index].tolist()} vs {table[0, index].tolist()})"
        )
