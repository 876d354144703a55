"""The autograd operators of tensor parallelism (Megatron-LM's mappings.py and cross_entropy.py).

Each is the identity or a collective in forward and its adjoint in backward, over the
tensor-parallel :class:`~plait.comm.Group` passed in (see :mod:`plait.strategies.tensor_parallel`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from plait.comm import Group

# -- the region operators (Megatron's mappings.py) ------------------------------------------------


class _CopyToRegion(torch.autograd.Function):
    """f: forward the identity; backward all-reduce (sum) the gradient over the group: 1 x its bytes."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)
        ctx.group.all_reduce(grad)
        return grad, None


class _ReduceFromRegion(torch.autograd.Function):
    """g: forward all-reduce (sum) the partial results over the group; backward the identity."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        out = x.clone(memory_format=torch.contiguous_format)
        group.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _split_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    width = x.shape[-1] // group.size
    return x[..., group.rank * width : (group.rank + 1) * width].contiguous()


def _gather_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    """All-gather (t x x.numel() elements) and concatenate along the last dim, rank order."""
    x = x.contiguous()
    out = torch.empty(group.size * x.numel(), dtype=x.dtype, device=x.device)
    group.all_gather(out, x.view(-1))
    return out.view(group.size, *x.shape).movedim(0, -2).reshape(*x.shape[:-1], group.size * x.shape[-1])


class _GatherFromRegion(torch.autograd.Function):
    """Forward all-gather the last-dim shards into the whole tensor; backward keep this rank's slice."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _split_last(grad, ctx.group), None


class _ScatterToRegion(torch.autograd.Function):
    """Forward keep this rank's last-dim slice; backward all-gather the gradient slices."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _gather_last(grad, ctx.group), None


def copy_to_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _ReduceFromRegion.apply(x, group)


def gather_from_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _GatherFromRegion.apply(x, group)


def scatter_to_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    return _ScatterToRegion.apply(x, group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """-log softmax(z)[y] per token, from logits z split along the vocabulary (Megatron's cross_entropy.py).

    log softmax(z)[y] = z_y - m - log sum_v exp(z_v - m), m = max_v z_v. Two all-reduces over the
    group: the max (N elements), then the target logit and the sum of exponentials together (2N).
    Backward needs no communication: d loss / d z = softmax(z) - onehot(y), this rank's columns.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, group: Group) -> torch.Tensor:
        vocab = logits.shape[-1]
        top = logits.max(dim=-1).values
        group.all_reduce(top, op="max")
        shifted = logits - top.unsqueeze(-1)
        local = targets - group.rank * vocab
        outside = (local < 0) | (local >= vocab)
        local = local.masked_fill(outside, 0)
        exp = shifted.exp()
        picked_and_sum = torch.stack(
            [shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0), exp.sum(-1)]
        )
        group.all_reduce(picked_and_sum)
        picked, total = picked_and_sum
        ctx.save_for_backward(exp.div_(total.unsqueeze(-1)), local, outside)
        return total.log() - picked

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        softmax, local, outside = ctx.saved_tensors
        onehot = F.one_hot(local, softmax.shape[-1]).to(softmax.dtype) * (~outside).unsqueeze(-1)
        return (softmax - onehot) * grad.unsqueeze(-1), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, group: Group) -> torch.Tensor:
    """Mean token cross-entropy of (..., V/t) logit shards against (...) targets, equal on every rank."""
    losses = _VocabParallelCrossEntropy.apply(logits.flatten(0, -2), targets.flatten(), group)
    return losses.mean()
