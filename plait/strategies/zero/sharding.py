"""What the ZeRO stages share: buckets padded to N, each rank's shard of them, its fp32 master.

Layout (Rajbhandari et al., SC'20; sharded per bucket as Megatron's distributed optimizer does, so a
bucket's reduce-scatter lands exactly on the shard its owner updates):

    bucket b = FlatBuffer of whole parameters, padded to a multiple of N
    rank r owns flat_b.data[r * S_b : (r + 1) * S_b], S_b = len(flat_b) / N, in every bucket
    master  = fp32 [ owned slice of bucket 0 | owned slice of bucket 1 | ... ]   (padding included)
              (ZeRO-1/2 in full precision: no copy, the master's values are the owned slices themselves)

so ``reduce_scatter(master.grad[offset_b : offset_b + S_b], flat_b.grad)`` averages bucket b's
gradient into the piece of the master that rank r's optimizer steps on, and
``all_gather(flat_b.data, master[offset_b : offset_b + S_b])`` brings the updated bucket back to
every rank. Parameters are ordered optimizer group by optimizer group (reverse model order within
a group, roughly the order backward produces gradients), so each group is one run of the master.
"""

from __future__ import annotations

import torch
from torch import nn

from plait.buffers import FlatBuffer, make_buckets
from plait.comm import Group, Handle
from plait.comm.pool import BufferPool
from plait.precision import DynamicLossScaler
from plait.strategies.base import clip_flat_grads_, group_ordered, parameter_names
from plait.strategies.master import MasterWeights, Piece, Segment, flat_segments

_MIB = 2**20


def group_major_order(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list[nn.Parameter], dict]:
    """Trainable parameters, optimizer group by group, reverse model order within each; and each one's group."""
    groups = group_ordered(module, optimizer)
    group_of = {p: g for g, members in enumerate(groups) for p in members}
    return [p for members in groups for p in reversed(members)], group_of


def bucketed_buffers(
    module: nn.Module, params: list[nn.Parameter], bucket_mb: float, world: int, with_grad: bool
) -> list[FlatBuffer]:
    """Cut ``params`` (in order) into buckets of about ``bucket_mb``, one FlatBuffer each, padded to ``world``."""
    names = parameter_names(module)
    buckets = make_buckets(
        [p.numel() for p in params], max(1, int(bucket_mb * _MIB) // params[0].element_size())
    )
    out = []
    for bucket in buckets:
        members = [params[i] for i in bucket.params]
        out.append(FlatBuffer(members, pad_to=world, names=[names[p] for p in members], with_grad=with_grad))
    return out


def owned_pieces(flat: FlatBuffer, owned: slice, group_of: dict[nn.Parameter, int]) -> list[Piece]:
    """The master pieces of one owned slice: runs of one optimizer group, then any padding."""
    pieces: list[Piece] = []
    covered = 0
    for p, offset, numel in zip(flat.params, flat.offsets, flat.numels):
        overlap = min(offset + numel, owned.stop) - max(offset, owned.start)
        if overlap <= 0:
            continue
        covered += overlap
        group = group_of[p]
        if pieces and pieces[-1].group == group:
            pieces[-1] = Piece(pieces[-1].numel + overlap, group)
        else:
            pieces.append(Piece(overlap, group))
    padding = (owned.stop - owned.start) - covered
    if padding:
        pieces.append(Piece(padding, None))
    return pieces


class ShardedMaster:
    """A rank's shards of a list of buckets, and the fp32 master + optimizer stepping on them."""

    def __init__(
        self,
        buckets: list[FlatBuffer],
        group_of: dict[nn.Parameter, int],
        optimizer: torch.optim.Optimizer,
        group: Group,
        loss_scaler: DynamicLossScaler | None,
        release_grads: bool = False,
        in_place: bool = False,
    ) -> None:
        """``in_place``: step on each bucket's own shard of the model (full precision only) instead of a copy."""
        self.buckets = buckets
        self.group = group
        self.owned = [flat.shard(group.rank, group.size) for flat in buckets]
        self.offsets = []
        offset = 0
        for owned in self.owned:
            self.offsets.append(offset)
            offset += owned.stop - owned.start
        pieces = [
            piece for flat, owned in zip(buckets, self.owned) for piece in owned_pieces(flat, owned, group_of)
        ]
        chunks = [flat.data[owned] for flat, owned in zip(buckets, self.owned)] if in_place else None
        self.master = MasterWeights(
            pieces, optimizer, buckets[0].data.device, group, loss_scaler, release_grads, chunks
        )
        self.accumulating = False
        """True once a backward since the last step filled the gradient shard: the next one adds to it."""
        self.master.optimizer.register_step_post_hook(lambda *_: setattr(self, "accumulating", False))

    def master_slice(self, b: int, of: torch.Tensor | None = None) -> torch.Tensor:
        """Bucket ``b``'s shard in the master's values (by default) or in ``of`` (master.grad)."""
        size = self.owned[b].stop - self.owned[b].start
        if of is None:
            return self.master.values(self.offsets[b], self.offsets[b] + size)
        return of[self.offsets[b] : self.offsets[b] + size]

    def load_from(self, sources: list[torch.Tensor]) -> None:
        """Fill the master from each bucket's owned values (``sources[b]``: that bucket's full flat data)."""
        for b, source in enumerate(sources):
            shard = self.master_slice(b)
            if shard.data_ptr() != source[self.owned[b]].data_ptr():  # in place: already there
                shard.copy_(source[self.owned[b]])

    def reduce_scatter(self, b: int, gradient: torch.Tensor, then=None) -> Handle:
        """Average bucket ``b``'s full ``gradient`` over ranks into this rank's master gradient shard."""
        self.master.ensure_grads()
        target = self.master_slice(b, self.master.grad)
        op = "avg"
        if gradient.dtype == torch.float16:  # pre-divide: a sum of scaled fp16 gradients can overflow
            gradient.div_(self.group.size)
            op = "sum"
        if gradient.dtype == target.dtype and not self.accumulating:
            handle = self.group.reduce_scatter(target, gradient, op=op, async_op=True)
        else:  # a narrower dtype to widen, or a gradient to add to the one already there
            pool = self.group.scratch  # reused from bucket to bucket: a fresh shard costs page faults
            shard = pool.take(target.numel(), gradient.dtype, gradient.device)
            handle = self.group.reduce_scatter(shard, gradient, op=op, async_op=True)

            def land() -> None:
                if self.accumulating:
                    target.add_(shard)
                else:
                    target.copy_(shard)
                pool.give_back(shard)

            handle.then(land)
        if then is not None:
            handle.then(then)
        return handle

    def segments(self) -> list[Segment]:
        """Which elements of which parameters this rank's master holds (for checkpoints)."""
        return [
            segment
            for b, (flat, owned) in enumerate(zip(self.buckets, self.owned))
            for segment in flat_segments(flat, owned.start, owned.stop, self.offsets[b])
        ]

    def backward_done(self) -> None:
        """A synchronized backward finished: until the step, further backwards accumulate into the shard."""
        self.accumulating = True

    def all_gather(self, b: int, output: torch.Tensor) -> Handle:
        """Every rank's updated shard of bucket ``b`` into ``output`` (the bucket's full flat data).

        The shard is written (cast, under mixed precision) straight into this rank's own slice of
        ``output`` and gathered in place: no temporary, no second copy. In full precision the
        master's values already are that slice.
        """
        own = output[self.owned[b]]
        values = self.master_slice(b)
        if values.data_ptr() != own.data_ptr():
            own.copy_(values)
        return self.group.all_gather(output, own, async_op=True)

    def calibrate(self, dtype: torch.dtype) -> None:
        """Pick the fastest reduce-scatter / all-gather algorithm for these bucket sizes (collective)."""
        for nbytes in sorted({flat.data.numel() * dtype.itemsize for flat in self.buckets}):
            self.group.calibrate("reduce_scatter", dtype, nbytes)
            self.group.calibrate("all_gather", dtype, nbytes)


def clip_sharded_grads_(master: MasterWeights, group: Group, max_norm: float) -> torch.Tensor:
    """Clip by the global norm of gradients sharded over ``group``: local sums of squares, all-reduced."""
    master.unscale()

    def sum_squares(local: torch.Tensor) -> torch.Tensor:
        local = local.reshape(1)
        group.all_reduce(local)
        return local[0]

    return clip_flat_grads_([master.grad], max_norm, sum_squares)


class BucketPool:
    """Transient gradient buffers for the buckets being reduced (ZeRO-2/3).

    A buffer goes back to the pool when its reduce-scatter completes and serves any later bucket
    that fits in it. Taking a buffer first collects completed reductions; if none fits and
    ``limit`` buckets are still in flight, it waits for the oldest. Gradient memory during backward
    therefore stays at about ``limit`` + 1 buckets, however large the model. After backward stage 2
    keeps up to ``limit`` idle buffers for the next step (fresh ones would cost page faults); stage 3,
    which keeps memory lowest, releases them (``clear``).
    """

    def __init__(self, limit: int = 2) -> None:
        self.limit = limit
        self.buffers = BufferPool(keep=limit)
        self._in_flight: list[Handle] = []

    @property
    def peak_bytes(self) -> int:
        return self.buffers.peak_bytes

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        self._in_flight = [h for h in self._in_flight if not (h.poll() and h.wait() is None)]
        while not self.buffers.fits(numel, dtype) and len(self._in_flight) >= self.limit:
            self._in_flight.pop(0).wait()
        return self.buffers.take(numel, dtype, device)

    def release_after(self, handle: Handle, buffer: torch.Tensor) -> Handle:
        """Return ``buffer`` to the pool once ``handle`` completes."""
        self._in_flight.append(handle)
        return handle.then(lambda: self.buffers.give_back(buffer))

    def tensors(self) -> list[torch.Tensor]:
        return self.buffers.idle()

    def clear(self) -> None:
        """End of backward: every bucket is reduced; give the buffers back to the allocator."""
        for handle in self._in_flight:
            handle.wait()
        self._in_flight = []
        self.buffers.clear()


class TransientGradients:
    """Gradients collected bucket by bucket into pooled buffers, reduced and dropped (ZeRO-2 and -3).

    ``collect`` copies a parameter's fresh gradient into its bucket's buffer and drops ``param.grad``;
    ``reduce`` reduce-scatters a complete bucket into the master shard and returns its buffer to the
    pool once the reduction is done. Only the gradient shard outlives backward.
    """

    def __init__(self, shards: ShardedMaster) -> None:
        self.shards = shards
        self.pool = BucketPool()
        self._filling: dict[int, torch.Tensor] = {}

    def _slot(self, flat: FlatBuffer, b: int, i: int) -> torch.Tensor:
        if b not in self._filling:
            buffer = self.pool.take(flat.data.numel(), flat.data.dtype, flat.data.device)
            buffer[flat.numel :].zero_()  # padding contributes zeros
            self._filling[b] = buffer
        return self._filling[b][flat.offsets[i] : flat.offsets[i] + flat.numels[i]]

    def collect(self, flat: FlatBuffer, b: int, i: int) -> None:
        param = flat.params[i]
        self._slot(flat, b, i).copy_(param.grad.reshape(-1))
        param.grad = None

    def collect_unused(self, flat: FlatBuffer, b: int, i: int) -> None:
        """No gradient this backward: zero, or what accumulated under ``no_sync`` before."""
        param = flat.params[i]
        slot = self._slot(flat, b, i)
        if param.grad is None:
            slot.zero_()
        else:
            slot.copy_(param.grad.reshape(-1))
            param.grad = None

    def reduce(self, b: int) -> Handle:
        buffer = self._filling.pop(b)
        return self.pool.release_after(self.shards.reduce_scatter(b, buffer), buffer)
