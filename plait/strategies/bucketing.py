"""Launching one collective per bucket as backward completes it: the machinery DDP and ZeRO share.

Backward produces gradients parameter by parameter, roughly in reverse model order. A hook on each
parameter reports it ready; once every parameter of a bucket is ready, the strategy's ``launch``
starts that bucket's collective asynchronously (DDP: all-reduce; ZeRO: reduce-scatter), and
backward carries on with earlier layers meanwhile.

Invariants that keep ranks in step:

* Buckets launch in one fixed order (``launch_order``), a bucket only after all before it: every
  rank issues the same collectives in the same sequence even if its hooks fire in another order.
  After the first synchronized backward, the order becomes the one in which rank 0's buckets
  actually completed (broadcast from rank 0), so the buckets that are ready first go first.
* At the end of backward (an autograd callback), buckets not yet launched are launched and every
  handle is waited on; a parameter that got no gradient is an error naming it, unless tolerated.
* Under ``no_sync`` nothing is launched: gradients accumulate locally until a synchronized backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from plait.buffers import FlatBuffer
from plait.comm import Group, Handle


class GradientBuckets:
    """Readiness counting and in-order launching of per-bucket gradient collectives for one model.

    ``bucket_of[(b, i)]`` is the bucket of parameter ``i`` of ``buffers[b]`` (None: each buffer is one
    bucket, as ZeRO's are). ``launch(k)`` starts
    bucket ``k``'s collective and returns its handle. ``on_ready(b, i)`` runs for each gradient of a
    synchronized backward before it is counted (ZeRO-2 copies it into its bucket there);
    ``on_unused(b, i)`` for a tolerated parameter without gradient; ``on_synced()`` once all handles
    of a synchronized backward are complete. ``max_in_flight``: launching one more first waits for
    the oldest (a collective that takes scratch memory then reuses it instead of faulting in more).
    """

    def __init__(
        self,
        buffers: list[FlatBuffer],
        bucket_of: dict[tuple[int, int], int] | None,
        group: Group,
        launch: Callable[[int], Handle | None],
        find_unused_parameters: bool = False,
        on_ready: Callable[[int, int], None] | None = None,
        on_unused: Callable[[int, int], None] | None = None,
        on_synced: Callable[[], None] | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        self.buffers = buffers
        self.max_in_flight = max_in_flight
        if bucket_of is None:
            bucket_of = {(b, i): b for b, flat in enumerate(buffers) for i in range(len(flat.params))}
        self.bucket_of = bucket_of
        self.group = group
        self._launch = launch
        self.find_unused_parameters = find_unused_parameters
        self._on_ready = on_ready
        self._on_unused = on_unused
        self._on_synced = on_synced
        self.size = [0] * (max(bucket_of.values()) + 1 if bucket_of else 0)
        for k in bucket_of.values():
            self.size[k] += 1
        self.launch_order = list(range(len(self.size)))
        self._observed: list[int] | None = []
        self.sync = True
        self._reset()
        for b, flat in enumerate(buffers):
            flat.install_grad_hooks(on_ready=self._hook(b))

    def _reset(self) -> None:
        self._pending = list(self.size)
        self._seen: set[tuple[int, int]] = set()
        self._next = 0
        self._handles: list[Handle] = []
        self._callback_queued = False

    def _hook(self, b: int) -> Callable[[int], None]:
        return lambda i: self._param_ready(b, i)

    def _param_ready(self, b: int, i: int) -> None:
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._callback_queued = True
        if not self.sync or (b, i) in self._seen:
            return
        self._seen.add((b, i))
        if self._on_ready is not None:
            self._on_ready(b, i)
        self._count(self.bucket_of[(b, i)])

    def _count(self, k: int) -> None:
        self._pending[k] -= 1
        if self._pending[k] == 0:
            if self._observed is not None:
                self._observed.append(k)
            self._launch_ready()

    def _launch_ready(self) -> None:
        """Launch, in ``launch_order``, every complete bucket up to the first incomplete one.

        Buckets whose collective has already completed are finished first (without blocking), so
        their scratch memory serves the buckets launched now.
        """
        for handle in self._handles:
            if not handle.done and handle.poll():
                handle.wait()
        while self._next < len(self.launch_order) and self._pending[self.launch_order[self._next]] == 0:
            in_flight = [h for h in self._handles if not h.done]
            if self.max_in_flight is not None and len(in_flight) >= self.max_in_flight:
                in_flight[0].wait()  # the oldest: collectives complete in launch order
            handle = self._launch(self.launch_order[self._next])
            if handle is not None:
                self._handles.append(handle)
            self._next += 1

    def _finish(self) -> None:
        """End of backward: account for unused parameters, wait for every bucket, reset."""
        try:
            if not self.sync:
                return
            if len(self._seen) != len(self.bucket_of):
                self._unused([key for key in self.bucket_of if key not in self._seen])
            for handle in self._handles:  # every staged bucket's second collective in flight first
                handle.advance()
            for handle in self._handles:
                handle.wait()
            if self._observed is not None:
                order = torch.tensor(self._observed, dtype=torch.int64)
                self.group.broadcast(order, src=0)
                self.launch_order = order.tolist()
                self._observed = None
            if self._on_synced is not None:
                self._on_synced()
        finally:
            self._reset()

    def _unused(self, missing: list[tuple[int, int]]) -> None:
        names = [self.buffers[b].names[i] for b, i in missing]
        if not self.find_unused_parameters:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise RuntimeError(
                f"{len(names)} parameter(s) received no gradient in this backward: {shown}. "
                "Every rank must produce a gradient for every trainable parameter; if some are unused by "
                "design, set requires_grad=False on them or pass find_unused_parameters=True to the strategy."
            )
        for b, i in missing:
            if self._on_unused is not None:
                self._on_unused(b, i)
            self._count(self.bucket_of[(b, i)])

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        previous, self.sync = self.sync, False
        try:
            yield
        finally:
            self.sync = previous
