"""A parameter-server worker: push gradient shards to every server, install the parameters they reply."""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from plait.buffers import FlatBuffer
from plait.comm import Group
from plait.strategies.async_ps.protocol import (
    ABORT,
    CHECKPOINT,
    DONE,
    PUSH,
    REPLY,
    InFlight,
    lost,
    send_request,
)
from plait.strategies.async_ps.server import Server
from plait.strategies.base import regroup


class Worker:
    """A worker's side: push its gradient shards to every server, install the parameters they reply."""

    def __init__(
        self, flat: FlatBuffer, bounds: list[int], servers: list[int], ps: Group, rank: int, timeout_s: float
    ) -> None:
        self.flat = flat
        self.bounds = bounds
        self.servers = servers
        self.ps = ps
        self.rank = rank
        self.timeout_s = timeout_s
        self.local: Server | None = None
        """This rank's own (colocated) server, pushed to by a direct call instead of a message."""
        self.version = 0
        self.pushes = 0
        self.wait_seconds = 0.0
        self.sends = InFlight()
        self.left = False

    def push_pull(self, lrs: list[float]) -> None:
        """Send every server its gradient shard, wait for each one's parameters, install them."""
        start = time.perf_counter()
        replies = []
        for index, server in enumerate(self.servers):
            lo, hi = self.bounds[index], self.bounds[index + 1]
            header = torch.tensor([float(self.version), *lrs])
            message = torch.cat([self.flat.grad[lo:hi], header])
            if server == self.rank:
                event = threading.Event()
                self.local.shard.push(self.rank, message[: hi - lo], lrs, event.set)
                replies.append((index, None, event))
            else:
                self.sends.track(self.ps.send(message, server, async_op=True, tag=PUSH))
                reply = torch.empty(hi - lo + 1)
                replies.append((index, reply, self.ps.recv(reply, server, async_op=True, tag=REPLY)))
        for index, reply, waiting in replies:
            lo, hi = self.bounds[index], self.bounds[index + 1]
            if reply is None:
                self._wait_local(waiting)
                with self.local.shard.lock:
                    params, self.version = self.local.shard.read(self.rank)
                    self.flat.data[lo:hi].copy_(params)
                continue
            self._wait(waiting, f"server rank {self.servers[index]}")
            if reply[-1].item() == ABORT:
                raise RuntimeError(f"parameter server rank {self.servers[index]} gave up: {lost(reply)}")
            self.flat.data[lo:hi].copy_(reply[:-1])
            self.version = int(reply[-1].item())
        self.pushes += len(self.servers)
        self.wait_seconds += time.perf_counter() - start

    def _wait_local(self, event: threading.Event) -> None:
        """Wait for this rank's own shard; fail with the server thread's reason if it gave up.

        Workers wait twice as long as servers listen: a server notices a lost worker first and says which.
        """
        deadline = time.monotonic() + 2 * self.timeout_s
        while not event.wait(0.5):  # polling the server thread's verdict; no rank waits on this
            if self.local.failure is not None or time.monotonic() > deadline:
                why = self.local.failure or f"no reply from the local shard within {2 * self.timeout_s:g}s"
                raise RuntimeError(f"parameter server rank {self.rank}: {why}")

    def _wait(self, handle, who: str) -> None:
        try:
            arrived = handle.wait_for(2 * self.timeout_s)
        except RuntimeError as e:
            raise RuntimeError(f"parameter server: lost {who} ({e})") from None
        if not arrived:
            raise RuntimeError(f"parameter server: no reply from {who} in {2 * self.timeout_s:g}s")

    def leave(self, n_groups: int) -> None:
        """Tell every server this worker is done (once)."""
        if self.left:
            return
        self.left = True
        for index, server in enumerate(self.servers):
            if server == self.rank:
                self.local.shard.leave(self.rank)
            else:
                size = self.bounds[index + 1] - self.bounds[index]
                message = torch.zeros(size + 1 + n_groups)
                message[size] = DONE
                self.ps.send(message, server, tag=PUSH)

    def pull_final(self) -> None:
        """Install every (dedicated) server's final shard, sent once the last worker has left.

        Waits as long as the slowest worker takes (up to the process group's timeout): a server
        that loses a worker meanwhile replies ABORT instead.
        """
        for index, server in enumerate(self.servers):
            lo, hi = self.bounds[index], self.bounds[index + 1]
            reply = torch.empty(hi - lo + 1)
            try:
                self.ps.recv(reply, server, tag=REPLY)
            except RuntimeError as e:
                raise RuntimeError(f"parameter server: lost server rank {server} ({e})") from None
            if reply[-1].item() == ABORT:
                raise RuntimeError(f"parameter server rank {server} gave up: {lost(reply)}")
            self.flat.data[lo:hi].copy_(reply[:-1])
            self.version = int(reply[-1].item())

    def request_checkpoint(self, request: dict, n_groups: int) -> None:
        """Ask every (dedicated) server to take its part in a checkpoint save or load."""
        for index, server in enumerate(self.servers):
            size = self.bounds[index + 1] - self.bounds[index]
            message = torch.zeros(size + 1 + n_groups)
            message[size] = CHECKPOINT
            self.ps.send(message, server, tag=PUSH)
            send_request(self.ps, request, server)


class PushPull(torch.optim.Optimizer):
    """The worker's optimizer: ``step()`` pushes gradients and pulls parameters; the servers do the math.

    Its ``param_groups`` mirror the user's (a learning-rate scheduler works: each push carries the
    current learning rate of every group to the servers).
    """

    def __init__(self, worker: Worker, flat: FlatBuffer, user: torch.optim.Optimizer) -> None:
        super().__init__(regroup(user.param_groups, [g["params"] for g in user.param_groups]), user.defaults)
        self.worker = worker
        self.flat = flat

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        self.worker.push_pull([g["lr"] for g in self.param_groups])
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.flat.grad.zero_()
        self.flat.attach_grads()
