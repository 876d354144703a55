"""The fp32 master copy a rank updates, and the optimizer rebuilt to step on it.

Under mixed precision (and under ZeRO, where a rank updates only its shard) the tensors the
optimizer steps on are not the model's parameters: they are fp32 "master" runs that mirror the
slices of the model's flat buffers this rank owns. :class:`MasterWeights` holds them as one
contiguous fp32 tensor (and one for their gradients), cut into runs:

    master.data = [ run | run | padding | run | ... ]      one run per (slice, optimizer group)

Padding mirrors the flat buffers' padding so a reduce-scatter can write a bucket's shard straight
into ``master.grad``; it belongs to no parameter and stays zero.

The user's optimizer was built (by the factory passed to ``plait.setup``) over the model's
parameters; it tells us its class, defaults and per-group hyperparameters. It is rebuilt with the
same class and hyperparameters over the master runs, group by group, so each group's runs form
one flat run and the update stays one fused call per group.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from plait.buffers import FlatBuffer, free_storage, restore_storage
from plait.checkpoint.format import Piece as CheckpointPiece
from plait.checkpoint.format import flat_range_pieces
from plait.comm import Group
from plait.errors import ConfigError
from plait.optim import FlatOptimizer
from plait.precision import DynamicLossScaler, unscale_and_check
from plait.strategies.base import regroup


@dataclasses.dataclass(frozen=True)
class Segment:
    """Elements [param_lo, param_lo + numel) of model parameter ``name`` live at ``master_lo`` in the master."""

    name: str
    shape: tuple[int, ...]
    param_lo: int
    master_lo: int
    numel: int


@dataclasses.dataclass(frozen=True)
class GroupRun:
    """``numel`` consecutive elements of the master, belonging to optimizer group ``group`` (None: padding)."""

    numel: int
    group: int | None


def rebuild_optimizer(
    user: torch.optim.Optimizer, params_by_group: list[list[nn.Parameter]]
) -> torch.optim.Optimizer:
    """The same optimizer class and hyperparameters as ``user``, over new parameters, group by group."""
    groups = regroup(user.param_groups, params_by_group)
    try:
        return type(user)(groups, **user.defaults)
    except TypeError as e:
        raise ConfigError(
            f"cannot rebuild {type(user).__name__} over the master shard ({e}); use plait.optim.AdamW/SGD "
            "or a torch.optim optimizer whose constructor takes its defaults as keyword arguments"
        ) from None


class MasterWeights:
    """fp32 runs this rank updates, their gradients, and the optimizer over them.

    ``chunks``: where the values live, when they are not a copy. ZeRO-1/2 in full precision step on
    the model's own shard of each bucket in place: a separate fp32 master would only duplicate it
    and add a copy to every all-gather. The chunks, in order, cover the runs (no run straddles
    two); the optimizer then steps run by run, one fused update per chunk and group. The gradient
    is always one contiguous tensor of this class's own.
    """

    def __init__(
        self,
        runs: list[GroupRun],
        user_optimizer: torch.optim.Optimizer,
        device: torch.device,
        group: Group,
        loss_scaler: DynamicLossScaler | None = None,
        release_grads: bool = False,
        chunks: list[torch.Tensor] | None = None,
    ) -> None:
        total = sum(r.numel for r in runs)
        self.grad = torch.zeros(total, dtype=torch.float32, device=device)
        if chunks is None:
            self.data: torch.Tensor | None = torch.zeros(total, dtype=torch.float32, device=device)
            chunks = [self.data]
        else:
            self.data = None  # no storage of its own: the values are the chunks
            if sum(c.numel() for c in chunks) != total or release_grads:
                raise ValueError(
                    "chunks must cover the runs exactly, and in-place values keep their gradients"
                )
        self.chunks = chunks
        self.chunk_starts = [0]
        for chunk in chunks[:-1]:
            self.chunk_starts.append(self.chunk_starts[-1] + chunk.numel())
        self.runs = runs
        self.buffers: list[FlatBuffer] = []
        by_group: list[list[nn.Parameter]] = [[] for _ in user_optimizer.param_groups]
        placed = [([], []) for _ in chunks]  # per chunk: parameters, their offsets in it
        offset = 0
        for run in runs:
            if run.group is not None:
                c = self._chunk_of(offset, offset + run.numel)
                lo = offset - self.chunk_starts[c]
                param = nn.Parameter(chunks[c][lo : lo + run.numel])
                placed[c][0].append(param)
                placed[c][1].append(lo)
                by_group[run.group].append(param)
            offset += run.numel
        for c, (params, offsets) in enumerate(placed):
            if params:
                start = self.chunk_starts[c]
                grad = self.grad[start : start + chunks[c].numel()]
                self.buffers.append(FlatBuffer.adopt(params, offsets, chunks[c], grad))
        if loss_scaler is not None and not isinstance(user_optimizer, FlatOptimizer):
            raise ConfigError(
                f"mixed_precision='fp16' skips steps with inf/nan gradients, which needs a plait optimizer; "
                f"got {type(user_optimizer).__name__}: use plait.optim.AdamW or plait.optim.SGD"
            )
        self.optimizer = rebuild_optimizer(user_optimizer, by_group)
        self.group = group
        self.loss_scaler = loss_scaler
        self._unscaled = False
        self._release = release_grads
        self.optimizer.register_step_pre_hook(lambda *_: self.unscale())
        self.optimizer.register_step_post_hook(lambda *_: self._after_step())

    def _chunk_of(self, lo: int, hi: int) -> int:
        """The chunk holding master elements [lo, hi)."""
        for c, (start, chunk) in enumerate(zip(self.chunk_starts, self.chunks)):
            if start <= lo and hi <= start + chunk.numel():
                return c
        raise ValueError(f"master elements [{lo}, {hi}) straddle two chunks")

    def values(self, lo: int, hi: int) -> torch.Tensor:
        """Master elements [lo, hi) (within one chunk): the fp32 values the optimizer steps on."""
        c = self._chunk_of(lo, hi)
        start = self.chunk_starts[c]
        return self.chunks[c][lo - start : hi - start]

    def own_tensors(self) -> list[torch.Tensor]:
        """The storage this master adds to the model's (none when it steps on the model's shards)."""
        return [self.data] if self.data is not None else []

    def attach_grads(self) -> None:
        """Point each run's ``.grad`` at ``master.grad`` again (a torch optimizer may have set it to None)."""
        for buffer in self.buffers:
            buffer.attach_grads()

    def state_views(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """The optimizer state of master elements [lo, hi): views, by state name ("step" is 0-d)."""
        materialize = getattr(self.optimizer, "materialize_state", None)
        if materialize is not None:
            materialize()
        c = self._chunk_of(lo, hi)
        first, last = lo - self.chunk_starts[c], hi - self.chunk_starts[c]  # within the chunk
        for buffer in self.buffers:
            if buffer.data is not self.chunks[c]:
                continue
            for param, start, numel in zip(buffer.params, buffer.offsets, buffer.numels):
                if start <= first and last <= start + numel:
                    return {
                        name: value if value.dim() == 0 else value.reshape(-1)[first - start : last - start]
                        for name, value in self.optimizer.state.get(param, {}).items()
                        if isinstance(value, torch.Tensor)
                    }
        raise ValueError(f"master elements [{lo}, {hi}) span more than one optimizer run")

    def checkpoint_pieces(self, segments: list[Segment], replicated: bool = False) -> list[CheckpointPiece]:
        """Model values (fp32) and optimizer state of every segment, as checkpoint pieces."""
        pieces = []
        for seg in segments:
            values = self.values(seg.master_lo, seg.master_lo + seg.numel)
            for piece in flat_range_pieces(f"model/{seg.name}", seg.shape, seg.param_lo, values):
                piece.replicated = replicated
                pieces.append(piece)
            for state, view in self.state_views(seg.master_lo, seg.master_lo + seg.numel).items():
                if view.dim() == 0:
                    pieces.append(CheckpointPiece(f"optim/{seg.name}/{state}", (), (), view, replicated=True))
                    continue
                for piece in flat_range_pieces(f"optim/{seg.name}/{state}", seg.shape, seg.param_lo, view):
                    piece.replicated = replicated
                    pieces.append(piece)
        return pieces

    def release_grads(self) -> None:
        """After the step the gradient shard is spent: free its storage until the next backward fills it.

        The tensor and its views stay; only the memory under them goes (``ensure_grads`` brings it back).
        """
        for buffer in self.buffers:
            for param in buffer.params:
                param.grad = None
        free_storage(self.grad)

    def ensure_grads(self) -> None:
        """Give ``master.grad`` its memory back if the last step released it.

        Not zeroed: the caller overwrites every element (each bucket's reduction writes its whole shard).
        """
        restore_storage(self.grad)

    def unscale(self) -> None:
        """fp16: divide the gradients by the loss scale once per step; if any rank saw inf/nan, skip the step.

        Runs before clipping (``clip_grad_norm_`` calls it) or else just before the step, like
        ``torch.amp.GradScaler.unscale_``; gradients of several backwards between two steps are
        unscaled together.
        """
        scaler = self.loss_scaler
        if scaler is None or self._unscaled:
            return
        self._unscaled = True
        self.ensure_grads()
        if unscale_and_check(self.grad, scaler, self.group):
            self.optimizer.skip_next_step()

    def _after_step(self) -> None:
        self._unscaled = False
        if self._release:
            self.release_grads()


def owned_runs(flat: FlatBuffer, owned: slice, group_of: dict[nn.Parameter, int]) -> list[GroupRun]:
    """The master layout of ``flat``'s elements ``owned``: runs of one optimizer group, then any padding."""
    runs: list[GroupRun] = []
    covered = 0
    for p, offset, numel in zip(flat.params, flat.offsets, flat.numels):
        overlap = min(offset + numel, owned.stop) - max(offset, owned.start)
        if overlap <= 0:
            continue
        covered += overlap
        group = group_of[p]
        if runs and runs[-1].group == group:
            runs[-1] = GroupRun(runs[-1].numel + overlap, group)
        else:
            runs.append(GroupRun(overlap, group))
    padding = (owned.stop - owned.start) - covered
    if padding:
        runs.append(GroupRun(padding, None))
    return runs


def pieces_of(flat: FlatBuffer, group_of: dict[nn.Parameter, int]) -> list[GroupRun]:
    """All of ``flat`` (its padding too) as master runs."""
    return owned_runs(flat, slice(0, flat.data.numel()), group_of)


def flat_segments(flat: FlatBuffer, lo: int, hi: int, master_lo: int) -> list[Segment]:
    """The parameters of ``flat`` overlapping its elements [lo, hi), held in a master from ``master_lo`` on."""
    segments = []
    for name, param, offset, numel in zip(flat.names, flat.params, flat.offsets, flat.numels):
        start, stop = max(lo, offset), min(hi, offset + numel)
        if start < stop:
            segments.append(
                Segment(name, tuple(param.shape), start - offset, master_lo + start - lo, stop - start)
            )
    return segments
