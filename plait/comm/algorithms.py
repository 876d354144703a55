"""Interchangeable ways to reduce-scatter and all-gather, and the measured choice between them.

Each candidate moves the same bytes per rank ((N-1)/N of the full tensor); they differ in how fast
a backend moves them. On gloo here the native reduce-scatter reaches about a third of what an
all-to-all followed by a local sum does (shared/FACTS.md; ``plait bench --comm`` re-measures), which is
much of why ZeRO-2/3 and FSDP trail DDP on CPU. So the comm layer measures the candidates once per
(op, dtype, message size class) on the job's own group, rank 0's choice is broadcast so every rank
runs the same algorithm, and the result is cached for the process. Candidates within 10% of the
fastest count as tied, and a fixed preference breaks the tie (``pick``). A table can be pinned instead
with ``PLAIT_COLLECTIVES`` (``"reduce_scatter=all_to_all,all_gather=native"``), which skips measuring.

    reduce_scatter  native      torch's reduce_scatter_single
                    all_to_all  all_to_all_single into a scratch tensor, then a local sum over ranks
                    p2p         one batch of isend/irecv: each rank's chunk j straight to rank j,
                                then the same local sum (two ranks: no copy, the peer's half added to ours)
    all_gather      native      torch's all_gather_single
                    all_to_all  every rank sends its chunk to every rank with all_to_all_single
                    p2p         one batch of isend/irecv: my chunk to every peer, theirs into place

Point-to-point messages carry a tag from the group's count of these ops, which is the same on every
rank (they issue the same collectives in the same order), so concurrent ops never cross.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from plait.comm.pool import BufferPool
from plait.errors import ConfigError

# torch 2.13 renamed the tensor collectives (the old names warn); older releases only have the old ones
all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)

REDUCE_OPS = {
    "sum": dist.ReduceOp.SUM,
    "avg": dist.ReduceOp.AVG,
    "max": dist.ReduceOp.MAX,
    "min": dist.ReduceOp.MIN,
}

Launch = Callable[[], tuple["Works | dist.Work | None", Callable[[], None] | None]]
"""Starts an op; returns its work handle and what to run once it completed (or None)."""


@dataclasses.dataclass(frozen=True)
class Route:
    """Where an op runs: the process group, its size, this rank in it, scratch memory, a message tag."""

    pg: dist.ProcessGroup | None
    size: int
    rank: int
    pool: BufferPool
    tag: int = 0

    def peer(self, rank: int) -> int:
        """The global rank of group rank ``rank`` (what point-to-point ops address)."""
        return dist.get_global_rank(self.pg, rank) if self.pg is not None else rank


class Works:
    """Several point-to-point works that complete together, behind the one-work interface."""

    def __init__(self, works: list[dist.Work]) -> None:
        self.works = works

    def wait(self) -> None:
        for work in self.works:
            work.wait()

    def is_completed(self) -> bool:
        return all(work.is_completed() for work in self.works)


def _exchange(route: Route, sends: list[torch.Tensor | None], recvs: list[torch.Tensor | None]) -> Works:
    """Post, at once, a send of ``sends[j]`` to and a receive into ``recvs[j]`` from every other rank j."""
    ops = []
    for j in range(route.size):
        if j != route.rank:
            ops.append(dist.P2POp(dist.isend, sends[j], route.peer(j), route.pg, route.tag))
            ops.append(dist.P2POp(dist.irecv, recvs[j], route.peer(j), route.pg, route.tag))
    return Works(dist.batch_isend_irecv(ops))


def _sum_into(output: torch.Tensor, contributions: torch.Tensor, op: str, size: int) -> None:
    """Sum the rows of ``contributions`` into ``output``, accumulating in fp32 (exact for bf16, fast on CPU)."""
    if output.dtype == torch.float32 and output.is_contiguous():
        torch.sum(contributions, 0, out=output.view(-1))
        total = output.view(-1)
    else:
        total = contributions.sum(0, dtype=torch.float32)
    if op == "avg":
        total.div_(size)
    if total is not output.view(-1):
        output.view(-1).copy_(total)


def reduce_scatter_launcher(
    algorithm: str, output: torch.Tensor, input: torch.Tensor, op: str, route: Route
) -> Launch:
    """How to reduce-scatter ``input`` into ``output`` with ``algorithm`` (nothing runs until called)."""
    size, pool = route.size, route.pool
    if algorithm == "native":
        return lambda: (
            reduce_scatter_single(output, input, op=REDUCE_OPS[op], group=route.pg, async_op=True),
            None,
        )
    if algorithm not in REDUCE_SCATTER:
        raise ConfigError(f"reduce_scatter algorithm {algorithm!r} is not known; use one of {REDUCE_SCATTER}")
    if op not in ("sum", "avg"):
        raise ValueError(f"{algorithm} reduce-scatter supports sum and avg, not {op}")

    if algorithm == "p2p" and size == 2 and output.dtype == input.dtype and output.is_contiguous():
        return _pairwise_reduce_scatter(output, input, op, route)

    def launch():
        scratch = pool.take(input.numel(), input.dtype, input.device)
        rows = scratch.view(size, -1)
        if algorithm == "all_to_all":
            work = dist.all_to_all_single(scratch, input.reshape(-1), group=route.pg, async_op=True)
        else:  # p2p: my chunk of everyone's input, straight from each peer
            chunks = input.reshape(size, -1)
            rows[route.rank].copy_(chunks[route.rank])
            work = _exchange(route, list(chunks), list(rows))

        def finish() -> None:
            _sum_into(output, rows, op, size)
            pool.give_back(scratch)

        return work, finish

    return launch


def _pairwise_reduce_scatter(output: torch.Tensor, input: torch.Tensor, op: str, route: Route) -> Launch:
    """Two ranks: swap the halves each other owns, the peer's arriving straight in ``output``; add ours.

    No scratch memory (unless ``output`` lies inside ``input``), no copy of our own half and no sum
    over stacked rows: five passes over a shard's bytes instead of seven, and no fresh receive
    buffer per bucket in flight (page faults on CPU). This matters here, where a 25 MiB bucket's
    reduction costs about as much as its transfer. The result is bit for bit the other algorithms'
    ``(a + b) / 2`` (addition commutes, halving is exact), so which one the measurement picks never
    changes a run; a one-pass ``lerp`` at 0.5 would round differently.
    """
    halves = input.reshape(2, -1)
    own, theirs = halves[route.rank], halves[1 - route.rank]
    out = output.view(-1)
    aliased = out.untyped_storage().data_ptr() == input.untyped_storage().data_ptr()

    def launch():
        received = route.pool.take(own.numel(), input.dtype, input.device) if aliased else out
        work = _exchange(route, [theirs] * 2, [received] * 2)

        def finish() -> None:
            torch.add(received, own, out=out)
            if op == "avg":
                out.mul_(0.5)
            if aliased:
                route.pool.give_back(received)

        return work, finish

    return launch


def all_gather_launcher(algorithm: str, output: torch.Tensor, input: torch.Tensor, route: Route) -> Launch:
    """How to all-gather ``input`` from every rank into ``output`` with ``algorithm``."""
    size, pool = route.size, route.pool
    if algorithm == "native":
        return lambda: (all_gather_single(output, input, group=route.pg, async_op=True), None)
    if algorithm == "all_to_all":

        def launch():
            copies = pool.take(input.numel() * size, input.dtype, input.device)
            copies.view(size, -1).copy_(input.reshape(1, -1).expand(size, -1))
            work = dist.all_to_all_single(output, copies, group=route.pg, async_op=True)
            return work, lambda: pool.give_back(copies)

        return launch
    if algorithm == "p2p":

        def launch():
            rows = output.view(size, -1)
            if rows[route.rank].data_ptr() != input.data_ptr():
                rows[route.rank].copy_(input.reshape(-1))
            return _exchange(route, [input.reshape(-1)] * size, list(rows)), None

        return launch
    raise ConfigError(f"all_gather algorithm {algorithm!r} is not known; use one of {ALL_GATHER}")


REDUCE_SCATTER = ("native", "all_to_all", "p2p")
ALL_GATHER = ("native", "all_to_all", "p2p")
CANDIDATES = {"reduce_scatter": REDUCE_SCATTER, "all_gather": ALL_GATHER}

PREFERENCE = ("p2p", "all_to_all", "native")
"""Among candidates measured within ``CLOSE`` of the fastest, the first of these wins: p2p needs no
scratch for an all-gather or a two-rank reduce-scatter, and p2p and all-to-all reduce in the same
order (bit for bit the same sums), which gloo's own reduce-scatter beyond two ranks does not."""
CLOSE = 0.1
"""Measured speeds this close (fraction of the fastest) count as a tie: a single measurement on busy
cores is noisier than that, and a coin toss between near-equals made runs differ from job to job."""


def pick(speeds: dict[str, float]) -> str:
    """The algorithm to use given each candidate's measured speed: the preferred among the near-fastest."""
    fastest = max(speeds.values())
    return next(a for a in PREFERENCE if a in speeds and speeds[a] >= (1 - CLOSE) * fastest)


def size_class(nbytes: int) -> int:
    """Messages are grouped by powers of 4 bytes: 64 KiB, 256 KiB, 1 MiB, ... share a measurement."""
    return 4 ** max(8, math.ceil(math.log(max(nbytes, 1), 4)))


@dataclasses.dataclass(frozen=True)
class Measurement:
    op: str
    dtype: str
    nbytes: int
    bus_gbps: dict[str, float]
    chosen: str


def pinned_from_env() -> dict[str, str]:
    """``PLAIT_COLLECTIVES="reduce_scatter=all_to_all,all_gather=native"`` as a dict (empty when unset)."""
    text = os.environ.get("PLAIT_COLLECTIVES", "").strip()
    pinned = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        op, _, algorithm = item.partition("=")
        if op not in CANDIDATES or algorithm not in CANDIDATES[op]:
            raise ConfigError(
                f"PLAIT_COLLECTIVES item {item!r} is not op=algorithm with op in {sorted(CANDIDATES)} "
                f"and algorithm in {CANDIDATES}"
            )
        pinned[op] = algorithm
    return pinned


class AlgorithmTable:
    """The algorithm to use per (op, dtype, size class): pinned, measured, or native until measured."""

    def __init__(self, pinned: dict[str, str] | None = None) -> None:
        self.pinned = pinned if pinned is not None else pinned_from_env()
        self.chosen: dict[tuple[str, str, int], str] = {}
        self.measurements: list[Measurement] = []

    def choose(self, op: str, dtype: torch.dtype, nbytes: int) -> str:
        if op in self.pinned:
            return self.pinned[op]
        return self.chosen.get((op, str(dtype), size_class(nbytes)), "native")

    def calibrate(self, group, op: str, dtype: torch.dtype, nbytes: int, repeats: int = 2) -> None:
        """Time every candidate on ``group`` for this message size (collective: every rank must call it)."""
        key = (op, str(dtype), size_class(nbytes))
        if op in self.pinned or key in self.chosen or group.size == 1:
            return
        numel = max(
            group.size, nbytes // torch.tensor([], dtype=dtype).element_size() // group.size * group.size
        )
        full = torch.randn(numel, device=group.device).to(dtype)
        shard = torch.empty(numel // group.size, dtype=dtype, device=group.device)
        moved = (group.size - 1) * full.numel() * full.element_size() / group.size
        speeds = {}
        for algorithm in CANDIDATES[op]:
            route = group.route()
            if op == "reduce_scatter":
                launch = reduce_scatter_launcher(algorithm, shard, full, "sum", route)
            else:
                launch = all_gather_launcher(algorithm, full, shard, route)
            seconds = min(_time(launch, group) for _ in range(repeats + 1))
            speeds[algorithm] = moved / seconds / 1e9
        decision = torch.tensor([CANDIDATES[op].index(pick(speeds))])
        dist.broadcast(
            decision, src=dist.get_global_rank(group.pg, 0) if group.pg is not None else 0, group=group.pg
        )
        chosen = CANDIDATES[op][int(decision)]
        self.chosen[key] = chosen
        group.release_scratch()  # the losing candidates' scratch would otherwise stay resident
        self.measurements.append(
            Measurement(
                op, str(dtype).removeprefix("torch."), full.numel() * full.element_size(), speeds, chosen
            )
        )


def _time(launch: Launch, group) -> float:
    dist.barrier(group=group.pg)
    start = time.perf_counter()
    work, finish = launch()
    work.wait()
    if finish is not None:
        finish()
    return time.perf_counter() - start
