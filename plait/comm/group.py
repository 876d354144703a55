"""Collectives over one process group, each one counted and logged.

Strategies reach ``torch.distributed`` only through :class:`Group`. Every call records the bytes
this rank sends (see :mod:`plait.comm.stats` for the convention), the time the caller spent blocked
in it (launch plus ``wait``), and an :class:`~plait.comm.stats.OpRecord` in the op log, so a hang
can later be explained by what each rank was doing.

On a group of one rank every collective is the identity and nothing is sent.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from plait.comm.stats import CommStats, OpRecord, bus_bytes

# torch 2.13 renamed the tensor collectives (the old names warn); older releases only have the old ones
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)

_REDUCE_OPS = {
    "sum": dist.ReduceOp.SUM,
    "avg": dist.ReduceOp.AVG,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
}


class Handle:
    """An op in flight. ``wait()`` blocks until it is complete, then runs the ``then`` callbacks once."""

    def __init__(self, work: dist.Work | None, record: OpRecord, stats: CommStats, op: str) -> None:
        self._work = work
        self._record = record
        self._stats = stats
        self._op = op
        self._then: list[Callable[[], None]] = []
        self.done = False

    def then(self, fn: Callable[[], None]) -> Handle:
        """Run ``fn`` right after the op completes (inside ``wait``): e.g. copy a bf16 result back."""
        self._then.append(fn)
        return self

    def wait(self) -> None:
        if self.done:
            return
        start = time.perf_counter()
        if self._work is not None:
            self._work.wait()
        self.done = True
        self._record.finished = time.perf_counter()
        self._stats.account(self._op, 0, 0, self._record.finished - start, calls=0)
        for fn in self._then:
            fn()


class Group:
    """A process group plus the accounting of everything sent through it.

    ``pg`` is a ``torch.distributed`` process group (``None`` means the default, world group).
    ``name`` labels the group in logs ("world", "dp", "tp", "pp", ...).
    """

    def __init__(self, pg: dist.ProcessGroup | None, name: str, stats: CommStats) -> None:
        self.pg = pg
        self.name = name
        self.stats = stats
        self.size = dist.get_world_size(pg) if dist.is_initialized() else 1
        self.rank = dist.get_rank(pg) if dist.is_initialized() else 0

    def __repr__(self) -> str:
        return f"Group({self.name}, rank={self.rank}, size={self.size})"

    # -- the bookkeeping shared by every op ------------------------------------------------------

    def _run(
        self,
        op: str,
        tensor: torch.Tensor,
        launch: Callable[[], dist.Work | None],
        async_op: bool,
        sent: int,
        received: int = 0,
    ) -> Handle | None:
        nbytes = tensor.numel() * tensor.element_size()
        record = self.stats.begin(
            op, self.name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), nbytes
        )
        start = time.perf_counter()
        work = launch() if self.size > 1 or op in ("send", "recv") else None
        self.stats.account(op, sent, received, time.perf_counter() - start)
        handle = Handle(work, record, self.stats, op)
        if async_op:
            return handle
        handle.wait()
        return None

    # -- collectives ------------------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", async_op: bool = False) -> Handle | None:
        """In place: every rank ends with the reduction of all ranks' ``tensor``. Sends 2(N-1)/N x bytes."""
        nbytes = tensor.numel() * tensor.element_size()
        return self._run(
            "all_reduce",
            tensor,
            lambda: dist.all_reduce(tensor, op=_REDUCE_OPS[op], group=self.pg, async_op=True),
            async_op,
            bus_bytes("all_reduce", nbytes, self.size),
        )

    def reduce_scatter(
        self, output: torch.Tensor, input: torch.Tensor, op: str = "sum", async_op: bool = False
    ) -> Handle | None:
        """``output`` (numel = input.numel() / N) gets this rank's 1/N of the reduced ``input``."""
        if self.size == 1:
            output.copy_(input.view_as(output))
        nbytes = input.numel() * input.element_size()
        return self._run(
            "reduce_scatter",
            input,
            lambda: _reduce_scatter_single(output, input, op=_REDUCE_OPS[op], group=self.pg, async_op=True),
            async_op,
            bus_bytes("reduce_scatter", nbytes, self.size),
        )

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False) -> Handle | None:
        """``output`` (numel = N x input.numel()) gets every rank's ``input`` in rank order."""
        if self.size == 1:
            output.view_as(input).copy_(input)
        nbytes = output.numel() * output.element_size()
        return self._run(
            "all_gather",
            output,
            lambda: _all_gather_single(output, input, group=self.pg, async_op=True),
            async_op,
            bus_bytes("all_gather", nbytes, self.size),
        )

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False) -> Handle | None:
        """Rank i's j-th 1/N chunk of ``input`` lands in rank j's i-th chunk of ``output``."""
        if self.size == 1:
            output.copy_(input)
        nbytes = input.numel() * input.element_size()
        return self._run(
            "all_to_all",
            input,
            lambda: dist.all_to_all_single(output, input, group=self.pg, async_op=True),
            async_op,
            bus_bytes("all_to_all", nbytes, self.size),
        )

    def broadcast(self, tensor: torch.Tensor, src: int = 0, async_op: bool = False) -> Handle | None:
        """In place: every rank gets ``src``'s tensor (``src`` is a rank within this group)."""
        nbytes = tensor.numel() * tensor.element_size()
        global_src = dist.get_global_rank(self.pg, src) if self.pg is not None and self.size > 1 else src
        return self._run(
            "broadcast",
            tensor,
            lambda: dist.broadcast(tensor, src=global_src, group=self.pg, async_op=True),
            async_op,
            nbytes if self.rank == src else 0,
            0 if self.rank == src else nbytes,
        )

    def barrier(self) -> None:
        """Every rank of the group reaches this point before any leaves it (a tiny all_reduce)."""
        self.all_reduce(torch.zeros(1))

    # -- point to point ---------------------------------------------------------------------------

    def _global(self, rank: int | None) -> int | None:
        if rank is None or self.pg is None:
            return rank
        return dist.get_global_rank(self.pg, rank)

    def send(self, tensor: torch.Tensor, dst: int, async_op: bool = False, tag: int = 0) -> Handle | None:
        """Send ``tensor`` to group rank ``dst`` (``isend`` when ``async_op``)."""
        nbytes = tensor.numel() * tensor.element_size()
        return self._run(
            "send",
            tensor,
            lambda: dist.isend(tensor, dst=self._global(dst), group=self.pg, tag=tag),
            async_op,
            nbytes,
        )

    def recv(
        self, tensor: torch.Tensor, src: int | None = None, async_op: bool = False, tag: int = 0
    ) -> Handle | None:
        """Receive into ``tensor`` from group rank ``src``, or from any rank when ``src`` is None."""
        nbytes = tensor.numel() * tensor.element_size()
        return self._run(
            "recv",
            tensor,
            lambda: dist.irecv(tensor, src=self._global(src), group=self.pg, tag=tag),
            async_op,
            0,
            nbytes,
        )
