"""Two-level collectives: reduce within a host over the fast local link, cross hosts with the rest.

A data-parallel group of N = H x L ranks on H hosts (L each, torchrun's numbering: host h holds
ranks h L .. h L + L - 1) splits into two levels:

    intra  the L ranks of one host                     (one group per host)
    inter  the H ranks with the same local rank        (one group per local rank)

and an all-reduce of B bytes becomes (the hierarchical all-reduce of Horovod and NCCL's trees):

    1. intra reduce-scatter: local rank l gets chunk l (B / L) averaged over its host  (L-1)/L x B
    2. inter all-reduce of that chunk, averaged over the hosts                2(H-1)/H x B / L
    3. intra all-gather of the chunks                                          (L-1)/L x B

Cross-host bytes per rank: 2(H-1)/H x B / L, 1/L of a flat ring's 2(N-1)/N x B on the ranks whose
ring successor is on another host; over the job 2(H-1) x B against H x 2(N-1)/N x B (2 hosts x 2
ranks: 2B against 3B, 2/3). Step 2 can be compressed (it is the level that pays): a compressor on
``inter`` then averages the chunk in fewer bytes. Stages 1 and 2 alone (``reduce_scatter``) are
ZeRO-3's HSDP gradient reduction: each rank keeps the chunk it owns, averaged over every host.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from plait.comm.group import Group, Handle


class StagedHandle:
    """A collective in stages: ``first`` in flight; then ``finish`` (it may launch a second collective
    and return its handle); then, once that completed, ``last``.

    ``poll`` stays False until ``wait`` has run the last stage: the remaining collective must be
    issued at the same point of the program on every rank (when its caller advances or waits), never
    because a poll happened to see the first stage complete on one rank. A caller holding several
    handles may ``advance`` them all in order before waiting on any: each second collective is then
    in flight while the next handle's ``finish`` computes.
    """

    def __init__(
        self,
        first: Handle | None,
        finish: Callable[[], Handle | None],
        last: Callable[[], None] | None = None,
    ) -> None:
        self._first = first
        self._finish = finish
        self._last = last
        self._second: Handle | None = None
        self._advanced = False
        self._then: list[Callable[[], None]] = []
        self.done = False

    def then(self, fn: Callable[[], None]) -> StagedHandle:
        self._then.append(fn)
        return self

    def poll(self) -> bool:
        return self.done

    def advance(self) -> None:
        """Wait for the first collective and run ``finish`` (once), leaving its collective in flight."""
        if self._advanced:
            return
        self._advanced = True
        if self._first is not None:
            self._first.wait()
        self._second = self._finish()

    def wait(self) -> None:
        if self.done:
            return
        self.advance()
        if self._second is not None:
            self._second.wait()
        if self._last is not None:
            self._last()
        self.done = True
        for fn in self._then:
            fn()


class TwoLevel:
    """The within-host and across-host groups of one data-parallel group, and the two-level all-reduce.

    ``intra`` holds this rank's host's ranks of the group, ``inter`` the ranks at the same position
    on every other host (``plait.comm.Mesh.host_groups`` builds the pair for a mesh axis).
    """

    def __init__(self, intra: Group, inter: Group) -> None:
        self.intra = intra
        self.inter = inter
        self.per_host = intra.size
        self.hosts = inter.size

    def chunk(self, numel: int) -> tuple[int, int]:
        """Elements [lo, hi) of a ``numel``-element message whose cross-host stage this rank runs.

        The message is padded to a multiple of L; the last chunk may run past ``numel``.
        """
        size = -(-numel // self.per_host)
        return self.intra.rank * size, (self.intra.rank + 1) * size

    def reduce_scatter(
        self,
        tensor: torch.Tensor,
        chunk: torch.Tensor,
        compress: Callable[[torch.Tensor], None] | None = None,
    ) -> Handle | None:
        """Stages 1 and 2: ``chunk`` becomes elements ``chunk(numel)`` of ``tensor`` averaged over every rank.

        ``tensor``'s length is a multiple of L. Stage 1 runs now; stage 2 is launched now and its
        handle returned (``compress``, when given, runs it blocking on the ``inter`` group instead
        of a plain all-reduce, and None is returned). HSDP stops here: each rank keeps its chunk.
        """
        self.intra.reduce_scatter(chunk, tensor, op="avg")
        if compress is not None:
            compress(chunk)
            return None
        return self.inter.all_reduce(chunk, op="avg", async_op=True)

    def all_reduce(
        self, tensor: torch.Tensor, compress: Callable[[torch.Tensor], None] | None = None
    ) -> StagedHandle:
        """Average the 1-D ``tensor`` over every rank in three stages (module docstring).

        Stages 1 and 2 as ``reduce_scatter``; stage 3 and the copy back run in ``wait``.
        """
        numel = tensor.numel()
        lo, hi = self.chunk(numel)
        padded = (hi - lo) * self.per_host
        pool = self.intra.scratch
        work = tensor
        if padded != numel:
            work = pool.take(padded, tensor.dtype, tensor.device)
            work[:numel].copy_(tensor)
            work[numel:].zero_()
        chunk = torch.empty(hi - lo, dtype=tensor.dtype, device=tensor.device)
        first = self.reduce_scatter(work, chunk, compress)

        def copy_back() -> None:
            if work is not tensor:
                tensor.copy_(work[:numel])
                pool.give_back(work)

        return StagedHandle(first, lambda: self.intra.all_gather(work, chunk, async_op=True), copy_back)

    def theory_bytes(self, numel: int, itemsize: int, gather: bool = True) -> dict[str, int]:
        """Bytes one rank sends per link level for a two-level all-reduce of ``numel`` elements
        (``gather=False``: stages 1 and 2 only, ``reduce_scatter``)."""
        L, H = self.per_host, self.hosts
        chunk = -(-numel // L) * itemsize
        return {
            "intra-host": (2 if gather else 1) * (L - 1) * chunk,
            "inter-host": 2 * (H - 1) * chunk // H,
        }
