"""Collectives over one process group, each one counted and logged.

Strategies reach ``torch.distributed`` only through :class:`Group`. Every call records the bytes
this rank sends (see :mod:`plait.comm.stats` for the convention), the time the caller spent blocked
in it (launch plus ``wait``), and an :class:`~plait.comm.stats.OpRecord` in the op log, so a hang
can later be explained by what each rank was doing.

On a group of one rank every collective is the identity and nothing is sent.

A group knows which host each of its ranks is on (``hosts``), so its bytes are also counted per
link level (see :mod:`plait.comm.stats`): what a ring op sends goes to this rank's successor.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from plait.comm.algorithms import (
    REDUCE_OPS,
    AlgorithmTable,
    Launch,
    Route,
    all_gather_launcher,
    reduce_scatter_launcher,
)
from plait.comm.pool import BufferPool
from plait.comm.stats import INTER_HOST, INTRA_HOST, CommStats, OpRecord, bus_bytes


class Handle:
    """An op in flight. ``wait()`` blocks until it is complete, then runs the ``then`` callbacks once."""

    def __init__(
        self,
        work: dist.Work | None,
        record: OpRecord,
        stats: CommStats,
        op: str,
        finish: Callable[[], None] | None = None,
        link: str = INTRA_HOST,
    ) -> None:
        self._link = link
        self._work = work
        self._record = record
        self._stats = stats
        self._op = op
        self._then: list[Callable[[], None]] = [finish] if finish is not None else []
        self._source = -1
        self.done = False

    def then(self, fn: Callable[[], None]) -> Handle:
        """Run ``fn`` right after the op completes (inside ``wait``): e.g. copy a bf16 result back."""
        self._then.append(fn)
        return self

    def advance(self) -> None:
        """Nothing to start before ``wait``: one collective (``StagedHandle.advance`` has stages)."""

    def poll(self) -> bool:
        """True once the op has completed, which then counts as finished (the callbacks run, as in
        ``wait``, and the op log shows it done); never blocks. A failed op raises here."""
        if self.done:
            return True
        if self._work is None or self._work.is_completed():
            self.wait()
            return True
        return False

    def wait_for(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s``; True once complete (callbacks run), False if still in flight.

        Unlike a timeout inside gloo, giving up here leaves the op and its connections intact, so
        the caller can still tell its peers what went wrong. (The wait runs on a helper thread:
        gloo's point-to-point works have no future to attach to.)
        """
        if self.done or self._work is None:
            self.wait()
            return True
        start = time.perf_counter()
        outcome: list[BaseException | None] = []

        def wait() -> None:
            try:
                self._work.wait()
                outcome.append(None)
            except BaseException as e:  # handed to the caller below
                outcome.append(e)

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        self._record.blocking = True
        waiter.join(timeout_s)
        self._record.blocking = False
        if not outcome:
            return False
        if outcome[0] is not None:
            raise outcome[0]
        self._complete(start)
        return True

    def source(self) -> int:
        """The group rank a receive from any source got its message from (after ``wait``)."""
        return self._source

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until complete (at most ``timeout_s`` seconds: then RuntimeError), then run the callbacks."""
        if self.done:
            return
        start = time.perf_counter()
        if self._work is not None:
            self._record.blocking = True
            try:
                if timeout_s is None:
                    self._work.wait()
                else:
                    self._work.wait(datetime.timedelta(seconds=timeout_s))
            finally:
                self._record.blocking = False
        self._complete(start)

    def _complete(self, start: float) -> None:
        """The op is done: note when, where a receive came from, and run the callbacks, once."""
        if self._work is not None and self._record.op == "recv":
            self._source = self._work._source_rank()
        self.done = True
        self._record.finished = time.perf_counter()
        self._stats.account(self._op, 0, 0, self._record.finished - start, calls=0, link=self._link)
        for fn in self._then:
            fn()


class Group:
    """A process group plus the accounting of everything sent through it.

    ``pg`` is a ``torch.distributed`` process group (``None`` means the default, world group).
    ``name`` labels the group in logs ("world", "dp", "tp", "pp", ...). ``hosts[i]`` is the host
    of group rank i (None: all on one host).
    """

    def __init__(
        self,
        pg: dist.ProcessGroup | None,
        name: str,
        stats: CommStats,
        algorithms: AlgorithmTable | None = None,
        device: torch.device | None = None,
        hosts: list[int] | None = None,
    ) -> None:
        self.pg = pg
        self.name = name
        self.stats = stats
        self.algorithms = algorithms if algorithms is not None else AlgorithmTable(pinned={})
        self.device = device or torch.device("cpu")
        self.scratch = BufferPool(keep=2)
        self._tag = 0
        """Receive and copy buffers the all-to-all algorithms reuse from call to call."""
        self.size = dist.get_world_size(pg) if dist.is_initialized() else 1
        self.rank = dist.get_rank(pg) if dist.is_initialized() else 0
        self.hosts = list(hosts) if hosts is not None else [0] * self.size
        self.link = self.link_to((self.rank + 1) % self.size)
        """The link level a ring op's bytes take: to this rank's successor in the group."""

    def __repr__(self) -> str:
        return f"Group({self.name}, rank={self.rank}, size={self.size})"

    def link_to(self, rank: int) -> str:
        """The link level between this rank and group rank ``rank``."""
        return INTRA_HOST if self.hosts[rank] == self.hosts[self.rank] else INTER_HOST

    @property
    def host_count(self) -> int:
        """How many hosts this group's ranks are on."""
        return len(set(self.hosts))

    # -- the bookkeeping shared by every op ------------------------------------------------------

    def _run(
        self,
        op: str,
        tensor: torch.Tensor,
        launch: Callable[[], dist.Work | None] | Launch,
        async_op: bool,
        sent: int,
        received: int = 0,
        algorithm: str | None = None,
        link: str | None = None,
    ) -> Handle | None:
        """Log, launch (skipped on a group of one), account bytes and launch time, and wait unless async.

        ``launch`` returns a work handle or, for ops with an ``algorithm``, a work handle and a
        completion step to run once the work is done. ``link``: the level the bytes take (default:
        the ring successor's).
        """
        link = link or self.link
        nbytes = tensor.numel() * tensor.element_size()
        record = self.stats.begin(
            op, self.name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), nbytes
        )
        record.algorithm = algorithm
        start = time.perf_counter()
        work, finish = None, None
        if self.size > 1 or op in ("send", "recv"):
            work, finish = launch() if algorithm is not None else (launch(), None)
        self.stats.account(op, sent, received, time.perf_counter() - start, link=link)
        handle = Handle(work, record, self.stats, op, finish, link)
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
            lambda: dist.all_reduce(tensor, op=REDUCE_OPS[op], group=self.pg, async_op=True),
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
        algorithm = self.algorithms.choose("reduce_scatter", input.dtype, nbytes)
        return self._run(
            "reduce_scatter",
            input,
            reduce_scatter_launcher(algorithm, output, input, op, self.route()),
            async_op,
            bus_bytes("reduce_scatter", nbytes, self.size),
            algorithm=algorithm,
        )

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False) -> Handle | None:
        """``output`` (numel = N x input.numel()) gets every rank's ``input`` in rank order."""
        if self.size == 1:
            output.view_as(input).copy_(input)
        nbytes = output.numel() * output.element_size()
        algorithm = self.algorithms.choose("all_gather", output.dtype, nbytes)
        return self._run(
            "all_gather",
            output,
            all_gather_launcher(algorithm, output, input, self.route()),
            async_op,
            bus_bytes("all_gather", nbytes, self.size),
            algorithm=algorithm,
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

    def release_scratch(self) -> None:
        """Hand the idle scratch buffers back to the allocator (a strategy that keeps memory low calls this)."""
        self.scratch.clear()

    def route(self) -> Route:
        """This group's route for the next reduce-scatter / all-gather, with a fresh message tag."""
        self._tag = (self._tag + 1) % 2**20
        return Route(self.pg, self.size, self.rank, self.scratch, 1 + self._tag)

    def calibrate(self, op: str, dtype: torch.dtype, nbytes: int) -> None:
        """Measure and fix the fastest algorithm for ``op`` on messages like this one (collective)."""
        self.algorithms.calibrate(self, op, dtype, nbytes)

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
            link=self.link_to(dst),
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
            link=self.link_to(src) if src is not None else None,
        )
