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

Every collective runs on the tensor-parallel :class:`~plait.comm.Group` passed in; the operators f, g,
the gathers and the vocabulary-parallel cross-entropy are in :mod:`plait.strategies.tp_ops`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from plait.checkpoint.format import Piece
from plait.comm import Group
from plait.errors import ConfigError, divisors
from plait.models import hf
from plait.strategies.tp_ops import (
    copy_to_region,
    gather_from_region,
    reduce_from_region,
    scatter_to_region,
)

STYLES = ("col", "row", "vocab", "qkv")
"""Plan styles: column-parallel Linear; row-parallel Linear (its input already split); the vocabulary
split (an Embedding by rows, a Linear output head by columns, gathered for ``model(x)``); and a fused
q|k|v column split, each of q, k, v split by heads (the parent module's ``n_head``, or HF's ``num_heads``,
is divided by t, and so is GPT-2's ``split_size``, the width of each of q, k, v). Besides ``nn.Linear``
the Linear styles apply to GPT-2's ``Conv1D``, a Linear whose weight is stored transposed, as (in, out)."""


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
    ``transposed``: the weight is stored (in, out) as GPT-2's Conv1D stores it, its slice (in, out/t).
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        group: Group,
        gather_output: bool,
        transposed: bool = False,
    ) -> None:
        super().__init__()
        self.weight, self.bias, self.group, self.gather_output = weight, bias, group, gather_output
        self.transposed = transposed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.t() if self.transposed else self.weight
        y = F.linear(copy_to_region(x, self.group), weight, self.bias)
        return gather_from_region(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Y = XA + b, A is split along its first dimension: A = [A_1; ...; A_t], X = [X_1 ... X_t], Y = sum_i X_i A_i + b.

    ``weight`` is this rank's (out, in/t) slice. The input normally arrives split already (the output
    of a column-parallel layer, ``input_is_parallel``); else this rank's slice is taken (scatter).
    Forward: the local matmul, then g, an all-reduce of the (B, T, out) partial sums; the bias,
    replicated, is added once after it. Backward: no communication. ``transposed``: the weight is
    stored (in, out) as GPT-2's Conv1D stores it, its slice (in/t, out).
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        group: Group,
        input_is_parallel: bool = True,
        transposed: bool = False,
    ) -> None:
        super().__init__()
        self.weight, self.bias, self.group = weight, bias, group
        self.input_is_parallel, self.transposed = input_is_parallel, transposed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_region(x, self.group)
        weight = self.weight.t() if self.transposed else self.weight
        y = reduce_from_region(F.linear(x, weight), self.group)
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
        heads = next((a for a in _HEAD_COUNTS if hasattr(parent, a)), None)
        if heads is None:
            raise ConfigError(f"{name}: a 'qkv' split needs its parent module to have n_head or num_heads")
        return heads, getattr(parent, heads)
    if isinstance(module, nn.Embedding):
        return ("vocab_size", module.num_embeddings) if style == "vocab" else ("", 0)
    if not isinstance(module, nn.Linear) and not hf.is_conv1d(module):
        return "", 0
    out_features, in_features = module.weight.shape[::-1] if hf.is_conv1d(module) else module.weight.shape
    if style == "row":
        return "in_features", in_features
    return ("vocab_size" if style == "vocab" else "out_features"), out_features


_HEAD_COUNTS = ("n_head", "num_heads")
"""What an attention module calls its number of heads: plait's GPT, Hugging Face's."""
_PER_RANK = (*_HEAD_COUNTS, "split_size")
"""An attention module's sizes that a 'qkv' split divides by t (GPT-2's split_size: the width of q, k, v)."""


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
            transposed = hf.is_conv1d(module)
            weight = layout.shard(module.weight, 0 if transposed else 1)
            new = RowParallelLinear(weight, module.bias, group, transposed=transposed)
        else:
            parts, transposed = (3 if style == "qkv" else 1), hf.is_conv1d(module)
            bias = layout.shard(module.bias, 0, parts) if module.bias is not None else None
            weight = layout.shard(module.weight, 1 if transposed else 0, parts)
            new = ColumnParallelLinear(weight, bias, group, style == "vocab", transposed)
            if style == "vocab":
                layout.heads.append(new)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, new)
        if style == "qkv":
            for size in _PER_RANK:
                if hasattr(parent, size):
                    setattr(parent, size, getattr(parent, size) // group.size)
    return layout


def resolve_plan(model: nn.Module, plan: Mapping[str, str] | None) -> Mapping[str, str]:
    """``plan``, or the model's own ``tensor_parallel_plan()`` (an HF model's config's) when none is given."""
    if plan is not None:
        return plan
    if hf.is_hf_model(model):  # transformers models carry their plan in their config
        return hf.tensor_parallel_plan(model)
    if not hasattr(model, "tensor_parallel_plan"):
        raise ConfigError(
            f"{type(model).__name__} has no tensor_parallel_plan(); pass plan={{'module.path.*': 'col' | "
            "'row' | 'vocab' | 'qkv', ...}} to plait.TensorParallel"
        )
    return model.tensor_parallel_plan()


def shard_boxes(
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
