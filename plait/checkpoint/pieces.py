"""The pieces a rank contributes to a checkpoint: a replicated model's every tensor whole, its generator state."""

from __future__ import annotations

from typing import Any

import torch

from plait.checkpoint.format import Piece
from plait.comm import current
from plait.errors import ConfigError


def model_pieces(module: torch.nn.Module, skip: set[int] | frozenset = frozenset()) -> list[Piece]:
    """``model/<key>`` for each state_dict entry (a tied tensor under its first name only), replicated.

    ``skip`` holds ids of tensors another source provides (a strategy's fp32 master, say).
    """
    pieces, seen = [], set(skip)
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        pieces.append(
            Piece(f"model/{name}", tuple(tensor.shape), (0,) * tensor.dim(), tensor.detach(), replicated=True)
        )
    return pieces


def optimizer_pieces(module: torch.nn.Module, optimizer: Any) -> list[Piece]:
    """``optim/<param>/<state>`` for an optimizer over the module's own parameters, replicated."""
    if optimizer is None:
        return []
    materialize = getattr(optimizer, "materialize_state", None)
    if materialize is not None:
        materialize()
    pieces = []
    for name, param in module.named_parameters():
        for state_name, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor):
                pieces.append(
                    Piece(
                        f"optim/{name}/{state_name}",
                        tuple(value.shape),
                        (0,) * value.dim(),
                        value,
                        replicated=True,
                    )
                )
    return pieces


def aliases(module: torch.nn.Module) -> dict[str, str]:
    """Tied state_dict names -> the first name of the same tensor (saved once, exported under both)."""
    first: dict[int, str] = {}
    out = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            out[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return out


def runtime_of(model: torch.nn.Module) -> Any:
    """The runtime ``plait.setup`` gave ``model``; a ConfigError for a model it did not prepare."""
    runtime = getattr(model, "plait_runtime", None)
    if runtime is None:
        raise ConfigError(
            "plait.checkpoint needs a model prepared by plait.setup (it knows how the model is split)"
        )
    return runtime


def rank_pieces(model: torch.nn.Module, optimizer: Any) -> list[Piece]:
    """Every piece this rank saves or loads: its runtime's, and its generator state (``rng/rank<r>``)."""
    runtime = runtime_of(model)
    ctx = current()
    rng = torch.get_rng_state()
    return [*runtime.checkpoint_pieces(optimizer), Piece(f"rng/rank{ctx.rank}", tuple(rng.shape), (0,), rng)]
