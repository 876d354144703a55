"""Tensor parallelism, as in Megatron-LM (Shoeybi et al., "Megatron-LM", 2019).

A layer's weight matrix is split across the t ranks of the tensor-parallel group, each rank holding
and multiplying by one slice. Two splits compose into a transformer block with one all-reduce per
pair of linear layers in forward and one in backward:

    Y = GeLU(X A) B,   A = [A_1 ... A_t] split by columns,  B = [B_1; ...; B_t] split by rows
    rank i:  Y_i = GeLU(f(X) A_i) B_i,   Y = g(sum_i Y_i)

``f`` (copy to the region) is the identity in forward and an all-reduce of the gradient in backward;
``g`` (reduce from the region) is an all-reduce in forward and the identity in backward. Attention
splits the same way, by heads: q|k|v column-parallel, the output projection row-parallel. The
vocabulary is split too: the embedding table by rows (token ids), the output head by columns, and the
cross-entropy is computed on vocabulary shards without ever gathering the logits.

Every collective runs on the tensor-parallel :class:`~plait.comm.Group` passed in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from plait.comm import Context, Group
from plait.errors import ConfigError, divisors, require_divisor
from plait.strategies.base import Runtime, Strategy

STYLES = ("col", "row", "vocab", "qkv")
"""Plan styles: column-parallel Linear; row-parallel Linear (its input already split); the vocabulary
split (an Embedding by rows, a Linear output head by columns, gathered for ``model(x)``); and a fused
q|k|v column split, each of q, k, v split by heads (the parent module's ``n_head`` is divided by t)."""


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


# -- shards of a tensor -----------------------------------------------------------------------------


def shard_tensor(full: torch.Tensor, dim: int, parts: int, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s slice of ``full`` along ``dim``: of each of ``parts`` equal parts (q|k|v: 3), its 1/size."""
    return full.unflatten(dim, (parts, size, -1)).select(dim + 1, rank).flatten(dim, dim + 1)


def unshard_tensor(shards: torch.Tensor, dim: int, parts: int) -> torch.Tensor:
    """Inverse of :func:`shard_tensor`: ``shards`` stacks every rank's slice along a new first dim."""
    return shards.unflatten(dim + 1, (parts, -1)).movedim(0, dim + 1).flatten(dim, dim + 2)


# -- the layers -------------------------------------------------------------------------------------


class ColumnParallelLinear(nn.Module):
    """Y = XA + b, A is split along its second dimension: A = [A_1 ... A_t], rank i computes Y_i = X A_i + b_i.

    ``weight`` is this rank's (out/t, in) slice of ``nn.Linear``'s (out, in) weight, ``bias`` its
    slice of the bias. Forward: f (gradient all-reduce in backward, B x T x in elements), the local
    matmul, and with ``gather_output`` an all-gather of the (B, T, out/t) outputs into (B, T, out).
    ``parts=3`` splits a fused q|k|v output so that each rank gets its heads of each of q, k and v.
    """

    def __init__(
        self, weight: nn.Parameter, bias: nn.Parameter | None, group: Group, gather_output: bool
    ) -> None:
        super().__init__()
        self.weight, self.bias, self.group, self.gather_output = weight, bias, group, gather_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_region(x, self.group), self.weight, self.bias)
        return gather_from_region(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Y = XA + b, A is split along its first dimension: A = [A_1; ...; A_t], X = [X_1 ... X_t], Y = sum_i X_i A_i + b.

    ``weight`` is this rank's (out, in/t) slice. The input normally arrives split already (the output
    of a column-parallel layer, ``input_is_parallel``); else this rank's slice is taken (scatter).
    Forward: the local matmul, then g, an all-reduce of the (B, T, out) partial sums; the bias,
    replicated, is added once after it. Backward: no communication.
    """

    def __init__(
        self, weight: nn.Parameter, bias: nn.Parameter | None, group: Group, input_is_parallel: bool = True
    ) -> None:
        super().__init__()
        self.weight, self.bias, self.group = weight, bias, group
        self.input_is_parallel = input_is_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_region(x, self.group)
        y = reduce_from_region(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """E[idx] with the table E (V, C) split along its first dimension: rank i holds rows [iV/t, (i+1)V/t).

    Each rank looks up the ids in its range and writes zeros for the rest; g, an all-reduce of the
    (B, T, C) result, sums the one non-zero row per token into place. Backward: no communication,
    and only this rank's rows get gradient.
    """

    def __init__(self, weight: nn.Parameter, group: Group) -> None:
        super().__init__()
        self.weight, self.group = weight, group
        self.vocab_start = group.rank * weight.shape[0]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        local = idx - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        y = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_region(y, self.group)


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


# -- applying a plan --------------------------------------------------------------------------------


def planned_modules(model: nn.Module, plan: Mapping[str, str]) -> list[tuple[str, nn.Module, str]]:
    """(name, module, style) of every module a pattern of ``plan`` matches (the first pattern that does)."""
    for pattern, style in plan.items():
        if style not in STYLES:
            raise ConfigError(f"plan[{pattern!r}]={style!r} is not a style; use one of {STYLES}")
    found, used = [], set()
    for name, module in model.named_modules():
        pattern = next((p for p in plan if fnmatch.fnmatchcase(name, p)), None)
        if pattern is not None:
            found.append((name, module, plan[pattern]))
            used.add(pattern)
    unused = [p for p in plan if p not in used]
    if unused:
        raise ConfigError(
            f"plan patterns {unused} match no module of {type(model).__name__}; check the names"
        )
    return found


def _split_size(model: nn.Module, name: str, module: nn.Module, style: str) -> tuple[str, int]:
    """The size a style divides by t, and what to call it in an error."""
    if style == "qkv":
        parent = model.get_submodule(name.rpartition(".")[0])
        if not hasattr(parent, "n_head"):
            raise ConfigError(f"{name}: a 'qkv' split needs its parent module to have n_head")
        return "n_head", parent.n_head
    if isinstance(module, nn.Embedding):
        return ("vocab_size", module.num_embeddings) if style == "vocab" else ("", 0)
    if not isinstance(module, nn.Linear):
        return "", 0
    if style == "row":
        return "in_features", module.in_features
    return ("vocab_size" if style == "vocab" else "out_features"), module.out_features


def check_plan(model: nn.Module, plan: Mapping[str, str], size: int) -> None:
    """Raise ConfigError naming every size that cannot be split ``size`` ways, and the sizes that fit."""
    problems: dict[str, list[str]] = {}  # message -> the modules it concerns
    for name, module, style in planned_modules(model, plan):
        what, n = _split_size(model, name, module, style)
        if not what:
            problems.setdefault(f"style {style!r} does not apply to {type(module).__name__}", []).append(name)
        elif n % size:
            message = f"{what}={n} is not divisible by tp={size}; use tp in {divisors(n)}"
            problems.setdefault(message, []).append(name)
    if problems:
        raise ConfigError(
            "; ".join(
                f"{message} ({names[0]}{f' and {len(names) - 1} more' if len(names) > 1 else ''})"
                for message, names in problems.items()
            )
        )


@dataclasses.dataclass
class TensorParallelLayout:
    """What applying a plan left behind: how each sharded parameter splits, and the vocabulary heads."""

    group: Group
    splits: dict[nn.Parameter, tuple[int, int]] = dataclasses.field(default_factory=dict)
    """Sharded parameter -> (dim, parts) as passed to :func:`shard_tensor`; unlisted ones are replicated."""
    heads: list[ColumnParallelLinear] = dataclasses.field(default_factory=list)
    """Output layers split along the vocabulary: gathered for ``model(x)``, not for the parallel loss."""
    replaced: dict[nn.Parameter, nn.Parameter] = dataclasses.field(default_factory=dict, repr=False)
    """Each whole parameter split -> its shard (a tied one is split once); the caller clears it once the
    optimizer is rebuilt over the shards, letting the whole parameters go."""

    def shard(self, param: nn.Parameter, dim: int, parts: int = 1) -> nn.Parameter:
        """This rank's slice of ``param`` as a new parameter; the same one for a parameter split twice (tied)."""
        if param in self.replaced:
            shard = self.replaced[param]
            if self.splits[shard] != (dim, parts):
                raise ConfigError("the plan splits a tied parameter two different ways; split both alike")
            return shard
        local = shard_tensor(param.detach(), dim, parts, self.group.rank, self.group.size)
        shard = nn.Parameter(local.clone(), requires_grad=param.requires_grad)
        self.splits[shard] = (dim, parts)
        self.replaced[param] = shard
        return shard

    @contextlib.contextmanager
    def sharded_logits(self) -> Iterator[None]:
        """Inside, the vocabulary heads return (..., V/t) logit shards for :func:`vocab_parallel_cross_entropy`."""
        for head in self.heads:
            head.gather_output = False
        try:
            yield
        finally:
            for head in self.heads:
                head.gather_output = True

    def unshard_state(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Replace each shard in ``state`` (keyed as ``module``'s state dict) by the whole tensor.

        One all-gather over the group per sharded tensor: (t-1)/t x its full bytes per rank.
        """
        for name, param in module.named_parameters(remove_duplicate=False):
            if param in self.splits and name in state:
                dim, parts = self.splits[param]
                local = state[name].contiguous()
                shards = torch.empty(self.group.size * local.numel(), dtype=local.dtype, device=local.device)
                self.group.all_gather(shards, local.view(-1))
                state[name] = unshard_tensor(shards.view(self.group.size, *local.shape), dim, parts)


def apply_plan(model: nn.Module, plan: Mapping[str, str], group: Group) -> TensorParallelLayout:
    """Replace every module the plan names by its tensor-parallel version, in place (no communication)."""
    layout = TensorParallelLayout(group)
    for name, module, style in planned_modules(model, plan):
        if isinstance(module, nn.Embedding):
            new = VocabParallelEmbedding(layout.shard(module.weight, 0), group)
        elif style == "row":
            new = RowParallelLinear(layout.shard(module.weight, 1), module.bias, group)
        else:
            parts = 3 if style == "qkv" else 1
            bias = layout.shard(module.bias, 0, parts) if module.bias is not None else None
            new = ColumnParallelLinear(layout.shard(module.weight, 0, parts), bias, group, style == "vocab")
            if style == "vocab":
                layout.heads.append(new)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, new)
        if style == "qkv":
            parent.n_head //= group.size
    return layout


def resolve_plan(model: nn.Module, plan: Mapping[str, str] | None) -> Mapping[str, str]:
    """``plan``, or the model's own ``tensor_parallel_plan()`` when none is given."""
    if plan is not None:
        return plan
    if not hasattr(model, "tensor_parallel_plan"):
        raise ConfigError(
            f"{type(model).__name__} has no tensor_parallel_plan(); pass plan={{'module.path.*': 'col' | "
            "'row' | 'vocab' | 'qkv', ...}} to plait.TensorParallel"
        )
    return model.tensor_parallel_plan()


@dataclasses.dataclass(frozen=True)
class TensorParallel(Strategy):
    """Megatron tensor parallelism over groups of ``size`` ranks; data parallelism (DDP) across the groups."""

    name: ClassVar[str] = "tp"

    size: int = 2
    """Ranks each layer is split over (t); the world size must be a multiple of it."""
    plan: Mapping[str, str] | None = None
    """Module path glob -> style (see :data:`STYLES`); None: the model's ``tensor_parallel_plan()``."""

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"size={self.size!r} must be a positive integer")

    def _as_hybrid(self, ctx: Context) -> Strategy:
        from plait.strategies.hybrid import Hybrid  # hybrid composes this module with the others

        require_divisor("tp", self.size, ctx.world_size, "size")
        return Hybrid(dp=ctx.world_size // self.size, tp=self.size, plan=self.plan)

    def validate(self, ctx: Context, model: nn.Module) -> None:
        self._as_hybrid(ctx).validate(ctx, model)

    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx: Context) -> Runtime:
        return self._as_hybrid(ctx).apply(model, optimizer, ctx)
