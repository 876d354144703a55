"""What went through the wire: bytes and time per collective, and a bounded log of recent ops.

Bytes are counted the way nccl-tests counts "bus bytes": what one rank sends under the
bandwidth-optimal algorithm for the op, computed from the tensors the comm layer actually passed:

    all_reduce       2(N-1)/N x B   (ring: reduce-scatter then all-gather)
    reduce_scatter    (N-1)/N x B   (B = the full input)
    all_gather        (N-1)/N x B   (B = the full output)
    all_to_all        (N-1)/N x B
    broadcast         B on the source rank, 0 elsewhere
    send / recv       B sent / B received

so the per-step totals can be set beside the theory (DDP sends 2(N-1)/N of the gradient bytes) and
any extra collective, padding or duplicate reduction shows up as a difference.

Across hosts the same bytes are also split by *link level* (``links``): "intra-host" or
"inter-host". A ring op's bytes go to this rank's successor in the group, so they count as
inter-host exactly when that successor is on another host (a flat ring over A0 A1 B0 B1 crosses
the hosts on 2 of its 4 links); a point-to-point op counts by its peer's host.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
import threading
import time

_PLAIT_COMM_DIR = os.path.dirname(os.path.abspath(__file__))

INTRA_HOST = "intra-host"
INTER_HOST = "inter-host"


def bus_bytes(op: str, nbytes: int, world: int) -> int:
    """Bytes one rank sends for ``op`` on a payload of ``nbytes`` over ``world`` ranks."""
    if world <= 1:
        return 0
    if op == "all_reduce":
        return 2 * (world - 1) * nbytes // world
    if op in ("reduce_scatter", "all_gather", "all_to_all"):
        return (world - 1) * nbytes // world
    return nbytes


@dataclasses.dataclass
class OpTotals:
    """Running totals for one kind of op on one rank."""

    calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0


@dataclasses.dataclass
class OpRecord:
    """One collective or point-to-point op, as the hang watchdog will want to print it."""

    seq: int
    op: str
    shape: tuple[int, ...]
    dtype: str
    group: str
    nbytes: int
    site: str
    started: float
    finished: float | None = None
    algorithm: str | None = None
    blocking: bool = False
    """A thread of this rank waits on it right now (``Handle.wait`` / ``wait_for``; a blocking call
    waits inside): only such an op can hang the rank, so only such an op can be called stuck."""

    def describe(self) -> str:
        state = "done" if self.finished is not None else "pending"
        return (
            f"{self.op} #{self.seq} on {self.group} {list(self.shape)} {self.dtype} "
            f"({self.nbytes / 2**20:.2f} MiB) at {self.site} [{state}]"
        )


def _call_site() -> str:
    """file:line of the first frame outside plait/comm (the strategy that asked for the op)."""
    frame = sys._getframe(2)
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _PLAIT_COMM_DIR:
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"


class CommStats:
    """Per-rank counters of every op, plus the last ``log_size`` ops in order.

    One instance per process, owned by the :class:`~plait.comm.context.Context`; every
    :class:`~plait.comm.group.Group` of that process writes into it.
    """

    def __init__(self, log_size: int = 256) -> None:
        self.totals: dict[str, OpTotals] = collections.defaultdict(OpTotals)
        self.links: dict[str, OpTotals] = collections.defaultdict(OpTotals)
        """The same bytes and seconds by link level (:data:`INTRA_HOST`, :data:`INTER_HOST`)."""
        self.log: collections.deque[OpRecord] = collections.deque(maxlen=log_size)
        self._seq: dict[str, int] = collections.defaultdict(int)
        self._thread_seconds: dict[int, float] = {}
        """Seconds per thread (its ident) spent in ops: each thread writes only its own entry."""

    def begin(self, op: str, group: str, shape: tuple[int, ...], dtype: str, nbytes: int) -> OpRecord:
        seq = self._seq[group]
        self._seq[group] = seq + 1
        record = OpRecord(seq, op, shape, dtype, group, nbytes, _call_site(), time.perf_counter())
        self.log.append(record)
        return record

    def account(
        self, op: str, sent: int, received: int, seconds: float, calls: int = 1, link: str = INTRA_HOST
    ) -> None:
        for totals in (self.totals[op], self.links[link]):
            totals.calls += calls
            totals.bytes_sent += sent
            totals.bytes_received += received
            totals.seconds += seconds
        me = threading.get_ident()
        self._thread_seconds[me] = self._thread_seconds.get(me, 0.0) + seconds

    def thread_seconds(self) -> float:
        """Seconds the calling thread has spent in ops (launching them and waiting on them).

        The totals also hold other threads' waits, a colocated parameter server's receives say,
        which overlap this thread's work.
        """
        return self._thread_seconds.get(threading.get_ident(), 0.0)

    def snapshot(self) -> dict[str, OpTotals]:
        """A copy of the totals, to subtract from a later snapshot (see :func:`delta`)."""
        return {op: dataclasses.replace(t) for op, t in self.totals.items()}

    def link_snapshot(self) -> dict[str, OpTotals]:
        """A copy of the totals by link level (subtract two with :func:`delta`)."""
        return {link: dataclasses.replace(t) for link, t in self.links.items()}

    @property
    def bytes_sent(self) -> int:
        return sum(t.bytes_sent for t in self.totals.values())

    @property
    def seconds(self) -> float:
        return sum(t.seconds for t in self.totals.values())

    def records(self) -> list[OpRecord]:
        """A copy of the op log, safe to take from another thread (the watchdog's) while ops are logged."""
        for _ in range(10):
            try:
                return list(self.log)
            except RuntimeError:  # the deque changed while being copied: try again
                continue
        return []

    def pending(self) -> list[OpRecord]:
        """Ops launched but not yet seen complete, oldest first."""
        return [r for r in self.records() if r.finished is None]


def delta(after: dict[str, OpTotals], before: dict[str, OpTotals]) -> dict[str, OpTotals]:
    """Totals accrued between two snapshots, per op."""
    out = {}
    for op, a in after.items():
        b = before.get(op, OpTotals())
        out[op] = OpTotals(
            a.calls - b.calls,
            a.bytes_sent - b.bytes_sent,
            a.bytes_received - b.bytes_received,
            a.seconds - b.seconds,
        )
    return out
