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

from collections.abc import Callable

import torch
from torch import nn

from plait.buffers import FlatBuffer, make_buckets
from plait.comm import Group, Handle
from plait.comm.pool import BufferPool
from plait.precision import DynamicLossScaler
from plait.strategies.base import group_index, group_ordered, parameter_names, sum_of_squares
from plait.strategies.compression.reducer import GradientReducer
from plait.strategies.data_parallel import DataParallelRuntime
from plait.strategies.master import MasterWeights, Segment, flat_segments, owned_runs

_MIB = 2**20


def group_major_order(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list[nn.Parameter], dict]:
    """Trainable parameters, optimizer group by group, reverse model order within each; and each one's group."""
    groups = group_ordered(module, optimizer)
    group_of = group_index(groups)
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
        skip_group: Group | None = None,
    ) -> None:
        """``in_place``: step on each bucket's own shard of the model (full precision only) instead of a copy.
        ``skip_group``: the ranks that agree whether an fp16 step is skipped (default ``group``)."""
        self.buckets = buckets
        self.group = group
        self.owned = [flat.shard(group.rank, group.size) for flat in buckets]
        self.offsets = []
        offset = 0
        for owned in self.owned:
            self.offsets.append(offset)
            offset += owned.stop - owned.start
        runs = [run for flat, owned in zip(buckets, self.owned) for run in owned_runs(flat, owned, group_of)]
        chunks = [flat.data[owned] for flat, owned in zip(buckets, self.owned)] if in_place else None
        self.master = MasterWeights(
            runs, optimizer, buckets[0].data.device, skip_group or group, loss_scaler, release_grads, chunks
        )
        self.accumulating = False
        """True once a backward since the last step filled the gradient shard: the next one adds to it."""
        self.reducer: GradientReducer | None = None
        """Compressed or hierarchical averaging of whole buckets (each rank then keeps its shard); with
        ``reducer.hsdp``, of each bucket straight into the shard (``group`` is then the host's ranks)."""
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
        if self.reducer is not None and not self.reducer.hsdp:
            return self._reduce_whole(b, gradient, target, then)
        if self.reducer is not None:  # HSDP: averaged over every host into our within-host shard

            def reduce(out: torch.Tensor):
                return self.reducer.reduce_scatter(b, gradient, out)

        else:
            op = "avg"
            if gradient.dtype == torch.float16:  # pre-divide: a sum of scaled fp16 gradients can overflow
                gradient.div_(self.group.size)
                op = "sum"

            def reduce(out: torch.Tensor):
                return self.group.reduce_scatter(out, gradient, op=op, async_op=True)

        if gradient.dtype == target.dtype and not self.accumulating:
            handle = reduce(target)
        else:  # a narrower dtype to widen, or a gradient to add to the one already there
            pool = self.group.scratch  # reused from bucket to bucket: a fresh shard costs page faults
            shard = pool.take(target.numel(), gradient.dtype, gradient.device)
            handle = reduce(shard)

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

    def _reduce_whole(self, b: int, gradient: torch.Tensor, target: torch.Tensor, then=None):
        """Average the whole bucket with the reducer (compressed, two-level), then keep our shard of it."""
        handle = self.reducer.all_reduce(b, gradient)
        own = gradient[self.owned[b]]
        handle.then(lambda: target.add_(own) if self.accumulating else target.copy_(own))
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


class ShardedRuntime(DataParallelRuntime):
    """What ZeRO's runtimes share once ``self.shards`` (a :class:`ShardedMaster`) exists: the gradient norm."""

    shards: ShardedMaster

    def gradient_squares(self, counted: Callable[[nn.Parameter], bool] | None = None) -> torch.Tensor:
        """This rank's master gradient shard's sum of squares, all-reduced over the shard group (4 bytes).

        With ``counted``, only the elements of the parameters it accepts (padding never counts).
        """
        self.master.unscale()
        grad = self.master.grad
        if counted is None:
            local = sum_of_squares([grad])
        else:
            if getattr(self, "_counted", (None,))[0] is not counted:
                self._counted = (counted, self._counted_mask(counted))
            local = sum_of_squares([grad * self._counted[1]])
        local = local.reshape(1)
        self.shards.group.all_reduce(local)  # the ranks sharing one copy (HSDP: the host's)
        return local[0]

    def _counted_mask(self, counted: Callable[[nn.Parameter], bool]) -> torch.Tensor:
        """1 where an element of the master gradient shard belongs to a counted parameter, 0 elsewhere."""
        params = dict(self.module.named_parameters(remove_duplicate=False))
        mask = torch.zeros_like(self.master.grad, dtype=torch.float32)
        for segment in self.shards.segments():
            if counted(params[segment.name]):
                mask[segment.master_lo : segment.master_lo + segment.numel] = 1
        return mask

    def scale_gradients_(self, coef: torch.Tensor) -> None:
        self.master.grad.mul_(coef.to(self.master.grad.dtype))


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
