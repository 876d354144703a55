"""Asynchronous training with a parameter server and bounded staleness.

The flat parameters are cut into one shard per server; each server holds its shard's master copy
and optimizer (the user's optimizer, rebuilt over the shard). A worker's ``optimizer.step()`` is a
*push-pull*: it sends each server its shard of the gradient (and the learning rate of each group),
and waits for that server's reply, the shard's current parameters. No worker waits for another,
except as the staleness bound says:

* ``staleness=None``: fully asynchronous SGD. Each push is applied as it arrives, scaled by
  1/workers, and answered at once.
* ``staleness=s >= 1``: stale synchronous parallel (Ho et al., NIPS 2013). Pushes are applied as
  they arrive, but the reply to a worker more than ``s`` steps ahead of the slowest active worker
  is held back until the slowest catches up: no worker computes on parameters more than ``s``
  versions behind the fastest.
* ``staleness=0``: bulk synchronous. The server averages all workers' gradients for a version and
  steps once, which reproduces ddp exactly.

Placement (BytePS's two modes): ``servers=0`` colocates a server thread with every worker, one
shard each; ``servers=k`` makes the last k ranks servers only: their ``plait.setup`` serves until
every worker has finished, then ends the process, so one script runs on all ranks unchanged.

Messages (torch.distributed isend / irecv, a process group of their own, receive from any source):

    push   worker -> server   [gradient shard | worker's version | lr of each group]   tag PUSH
    reply  server -> worker   [parameter shard | server's version]                     tag REPLY

A worker that leaves calls ``plait.shutdown()``, which tells the servers (version -1). A server
that hears from no active worker for ``timeout_s`` seconds, or loses one, tells the others which
worker it lost (version -2) and fails; so does a worker whose server goes silent. No hang.
Communication per worker step: the gradient out and the parameters back, 2 x parameter bytes
(the push-pull does not shrink bytes; staleness only removes waiting).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from plait.buffers import FlatBuffer
from plait.checkpoint.format import Piece as CheckpointPiece
from plait.checkpoint.pieces import model_pieces
from plait.comm import Context
from plait.comm.context import on_shutdown
from plait.errors import ConfigError
from plait.strategies.base import Runtime, Strategy, group_ordered, parameter_names
from plait.strategies.ddp import replicate_from_rank0
from plait.strategies.master import MasterWeights, Piece, flat_segments

PUSH, REPLY = 11, 12
DONE, ABORT = -1.0, -2.0


@dataclasses.dataclass(frozen=True)
class AsyncPS(Strategy):
    """A sharded parameter server; workers push gradients and pull parameters without a global barrier."""

    name: ClassVar[str] = "async"

    staleness: int | None = None
    """Most steps the fastest worker may run ahead of the slowest; None: unbounded (async SGD); 0: synchronous."""
    servers: int = 0
    """0: every worker also serves one shard (colocated); k: the last k ranks only serve."""
    timeout_s: float = 60.0
    """A worker or server silent this long is reported by name and the job fails."""

    def __post_init__(self) -> None:
        if self.staleness is not None and (not isinstance(self.staleness, int) or self.staleness < 0):
            raise ConfigError(f"staleness={self.staleness!r} must be None (fully async) or an integer >= 0")
        if self.servers < 0:
            raise ConfigError(f"servers={self.servers} must be >= 0 (0: colocated with the workers)")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s={self.timeout_s} must be > 0")

    def validate(self, ctx: Context, model: nn.Module) -> None:
        if self.servers >= ctx.world_size:
            raise ConfigError(
                f"servers={self.servers} leaves no worker among {ctx.world_size} ranks; "
                f"use servers in 0..{ctx.world_size - 1}"
            )

    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx: Context) -> Runtime:
        if optimizer is None:
            raise ConfigError("the parameter server steps the optimizer: pass optimizer= to plait.setup")
        return PSRuntime(self, model, optimizer, ctx)


class Shard:
    """One server's shard: its master parameters, optimizer, the workers' clocks, replies held back."""

    def __init__(self, master: MasterWeights, workers: list[int], staleness: int | None) -> None:
        self.master = master
        self.staleness = staleness
        self.clock = {w: 0 for w in workers}
        self.active = set(workers)
        self.version = 0
        self.held: list[tuple[int, Callable[[], None]]] = []
        self.pending: dict[int, torch.Tensor] = {}
        self.staleness_seen: collections.Counter[int] = collections.Counter()
        self.pushes = 0
        self.lock = threading.Lock()

    def params(self) -> torch.Tensor:
        return self.master.data

    def push(
        self, worker: int, grad: torch.Tensor, version: int, lrs: list[float], reply: Callable[[], None]
    ) -> None:
        """Apply (or, synchronous, collect) ``worker``'s gradient; ``reply`` answers it when the bound allows."""
        with self.lock:
            self.pushes += 1
            self.clock[worker] += 1
            for group, lr in zip(self.master.optimizer.param_groups, lrs):
                group["lr"] = lr
            if self.staleness == 0:
                self.pending[worker] = grad.clone()
                self.held.append((worker, reply))
                if len(self.pending) == len(self.active):
                    self._step(torch.stack(list(self.pending.values())).mean(0))
                    self.pending.clear()
                    self._release(everyone=True)
                return
            self._step(grad / len(self.clock))
            self.held.append((worker, reply))
            self._release()

    def _step(self, grad: torch.Tensor) -> None:
        self.master.ensure_grads()
        self.master.grad.copy_(grad)
        self.master.attach_grads()
        self.master.optimizer.step()
        self.version += 1

    def _release(self, everyone: bool = False) -> None:
        """Answer every held worker the staleness bound now lets go on."""
        slowest = min((self.clock[w] for w in self.active), default=0)
        keep = []
        for worker, reply in self.held:
            lead = self.clock[worker] - slowest
            if everyone or self.staleness is None or lead <= self.staleness:
                # the staleness this worker computes at: how many steps it is ahead of the slowest
                self.staleness_seen[max(lead, 0)] += 1
                reply()
            else:
                keep.append((worker, reply))
        self.held = keep

    def leave(self, worker: int) -> None:
        with self.lock:
            self.active.discard(worker)
            if self.staleness == 0 and self.pending and len(self.pending) >= len(self.active):
                self._step(torch.stack(list(self.pending.values())).mean(0))
                self.pending.clear()
            self._release(everyone=self.staleness == 0)


class PSRuntime(Runtime):
    """This rank's side of the parameter server: a worker, a server, or both (colocated)."""

    synchronous = False

    def __init__(self, strategy: AsyncPS, module: nn.Module, optimizer: torch.optim.Optimizer, ctx: Context):
        super().__init__(strategy, module, optimizer)
        self.strategy = strategy
        n = ctx.world_size
        self.servers = list(range(n - strategy.servers, n)) if strategy.servers else list(range(n))
        self.workers = list(range(n - strategy.servers)) if strategy.servers else list(range(n))
        self.rank = ctx.rank
        self.is_worker = ctx.rank in self.workers
        self.dp_group = ctx.split([self.workers, *([self.servers] if strategy.servers else [])], "workers")
        self.ps = ctx.split(
            [list(range(n))], "ps"
        )  # all parameter-server traffic, apart from training collectives
        self.dp_rank, self.dp_size = self.workers.index(ctx.rank) if self.is_worker else 0, len(self.workers)

        names = parameter_names(module)
        groups = group_ordered(module, optimizer)
        params = [p for members in groups for p in members]
        self.flat = FlatBuffer(params, names=[names[p] for p in params])
        replicate_from_rank0(module, [self.flat], ctx.world)
        group_of = {p: g for g, members in enumerate(groups) for p in members}
        self.bounds = _shard_bounds(self.flat.numel, len(self.servers))
        self.n_groups = len(optimizer.param_groups)
        self.version = 0
        self.shard: Shard | None = None
        if ctx.rank in self.servers:
            self.shard = self._make_shard(self.servers.index(ctx.rank), group_of, optimizer, ctx)
        self.optimizer = _PushPull(self, optimizer) if self.is_worker else None
        self.pushes = self.pulls = 0
        self.wait_seconds = 0.0
        self._outstanding: list = []
        self._sending = threading.Lock()
        self._failure: str | None = None
        self._started = time.monotonic()
        if not self.is_worker:
            self.serve()  # a dedicated server: serve until every worker is done, then end the process
        elif self.shard is not None:
            self._server_thread = threading.Thread(
                target=self._serve_in_thread, name="plait-ps-server", daemon=True
            )
            self._server_thread.start()
        on_shutdown(self.leave)

    def _make_shard(self, index: int, group_of: dict, optimizer: Any, ctx: Context) -> Shard:
        lo, hi = self.bounds[index], self.bounds[index + 1]
        pieces = []
        for p, start, numel in zip(self.flat.params, self.flat.offsets, self.flat.numels):
            overlap = min(start + numel, hi) - max(start, lo)
            if overlap > 0:
                pieces.append(Piece(overlap, group_of[p]))
        master = MasterWeights(pieces, optimizer, self.flat.data.device, self.dp_group)
        master.data.copy_(self.flat.data[lo:hi])
        return Shard(master, self.workers, self.strategy.staleness)

    # -- worker side ------------------------------------------------------------------------------

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
                self.shard.push(self.rank, message[: hi - lo], self.version, lrs, event.set)
                replies.append((index, None, event))
            else:
                self._track(self.ps.send(message, server, async_op=True, tag=PUSH))
                reply = torch.empty(hi - lo + 1)
                replies.append((index, reply, self.ps.recv(reply, server, async_op=True, tag=REPLY)))
        for index, reply, waiting in replies:
            lo, hi = self.bounds[index], self.bounds[index + 1]
            if reply is None:
                self._wait_local(waiting)
                with self.shard.lock:
                    self.flat.data[lo:hi].copy_(self.shard.params())
                    self.version = self.shard.version
                continue
            self._wait(waiting, f"server rank {self.servers[index]}")
            if reply[-1].item() == ABORT:
                raise RuntimeError(f"parameter server rank {self.servers[index]} gave up: {_lost(reply)}")
            self.flat.data[lo:hi].copy_(reply[:-1])
            self.version = int(reply[-1].item())
        self.pushes += len(self.servers)
        self.pulls += len(self.servers)
        self.wait_seconds += time.perf_counter() - start

    def _wait_local(self, event: threading.Event) -> None:
        """Wait for this rank's own shard; fail with the server thread's reason if it gave up.

        Workers wait twice as long as servers listen: a server notices a lost worker first and says which.
        """
        deadline = time.monotonic() + 2 * self.strategy.timeout_s
        while not event.wait(0.5):  # polling the server thread's verdict; no rank waits on this
            if self._failure is not None or time.monotonic() > deadline:
                why = (
                    self._failure or f"no reply from the local shard within {2 * self.strategy.timeout_s:g}s"
                )
                raise RuntimeError(f"parameter server rank {self.rank}: {why}")

    def _wait(self, handle, who: str) -> None:
        try:
            arrived = handle.wait_for(2 * self.strategy.timeout_s)
        except RuntimeError as e:
            raise RuntimeError(f"parameter server: lost {who} ({e})") from None
        if not arrived:
            raise RuntimeError(f"parameter server: no reply from {who} in {2 * self.strategy.timeout_s:g}s")

    def leave(self) -> None:
        """Tell every server this worker is done (``plait.shutdown`` calls this)."""
        if not self.is_worker or getattr(self, "_left", False):
            return
        self._left = True
        for index, server in enumerate(self.servers):
            if server == self.rank:
                self.shard.leave(self.rank)
            else:
                size = self.bounds[index + 1] - self.bounds[index]
                message = torch.zeros(size + 1 + self.n_groups)
                message[size] = DONE
                self.ps.send(message, server, tag=PUSH)
        if getattr(self, "_server_thread", None) is not None:
            self._server_thread.join(self.strategy.timeout_s)

    # -- server side ------------------------------------------------------------------------------

    def serve(self) -> None:
        """Answer pushes from any worker until every remote worker has left."""
        shard = self.shard
        index = self.servers.index(self.rank)
        size = self.bounds[index + 1] - self.bounds[index]
        remote = {w for w in self.workers if w != self.rank}
        last_heard = {w: time.monotonic() for w in remote}
        while remote:
            message = torch.empty(size + 1 + self.n_groups)
            handle = self.ps.recv(message, None, async_op=True, tag=PUSH)
            try:
                arrived, error = handle.wait_for(self.strategy.timeout_s), "silent"
            except RuntimeError as e:  # a worker's connection broke
                arrived, error = False, e
            if not arrived:
                silent = min(remote, key=last_heard.get)
                self._abort(
                    remote,
                    silent,
                    f"no push from worker rank {silent} in {self.strategy.timeout_s:g}s ({error})",
                )
            worker = handle.source()
            last_heard[worker] = time.monotonic()
            version = message[size].item()
            if version == DONE:
                remote.discard(worker)
                shard.leave(worker)
                continue
            lrs = message[size + 1 :].tolist()
            shard.push(worker, message[:size], int(version), lrs, self._replier(worker, size))
        if not self.is_worker:
            from plait.comm.context import shutdown

            shutdown(exit_code=0)

    def _serve_in_thread(self) -> None:
        """A colocated server: whatever stops it is kept, for this rank's worker to report."""
        try:
            self.serve()
        except BaseException as e:
            self._failure = self._failure or f"the server thread failed: {e!r}"

    def _replier(self, worker: int, size: int) -> Callable[[], None]:
        def reply() -> None:
            message = torch.cat([self.shard.params(), torch.tensor([float(self.shard.version)])])
            self._track(self.ps.send(message, worker, async_op=True, tag=REPLY))

        return reply

    def _abort(self, workers: set[int], lost: int, why: str) -> None:
        """Tell every other worker waiting on this server which worker was lost, then fail."""
        index = self.servers.index(self.rank)
        for worker in workers - {lost}:
            message = torch.zeros(self.bounds[index + 1] - self.bounds[index] + 1)
            message[0], message[-1] = lost, ABORT
            with contextlib.suppress(RuntimeError):  # that worker may be gone too
                self.ps.send(message, worker, async_op=True, tag=REPLY).wait(
                    timeout_s=self.strategy.timeout_s
                )
        self._failure = why
        raise RuntimeError(f"parameter server rank {self.rank}: {why}")

    def _track(self, handle) -> None:
        """Keep a send in flight referenced until it completes (the worker and server threads both send)."""
        with self._sending:
            self._outstanding = [h for h in self._outstanding if not h.poll()]
            self._outstanding.append(handle)

    # -- Runtime interface ------------------------------------------------------------------------

    def checkpoint_guard(self) -> contextlib.AbstractContextManager:
        """Hold the shard still (no push applied) while a checkpoint copies it."""
        return self.shard.lock if self.shard is not None else contextlib.nullcontext()

    def replicated_tensors(self) -> dict[str, torch.Tensor]:
        """None: asynchronous replicas differ by design."""
        return {}

    def theory_bytes_per_step(self) -> int:
        """A worker sends its gradient and receives the parameters: the gradient bytes go out each step."""
        return self.flat.numel * self.flat.data.element_size()

    def metrics(self) -> dict[str, Any]:
        shard = self.shard
        elapsed = max(time.monotonic() - self._started, 1e-9)
        return {
            "pushes": self.pushes,
            "pulls": self.pulls,
            "pushes_per_s": self.pushes / elapsed,
            "pulls_per_s": self.pulls / elapsed,
            "ps_wait_s": self.wait_seconds,
            "version": self.version,
            "staleness_histogram": dict(shard.staleness_seen) if shard is not None else {},
        }

    def checkpoint_pieces(self, optimizer: object) -> list[CheckpointPiece]:
        """The servers' master shards (the parameters' truth) with their optimizer state; buffers whole.

        A worker's replica is only loaded into, never saved: it may be a few versions behind.
        """
        if self.strategy.servers:
            raise ConfigError(
                f"checkpoints of a parameter server with dedicated servers (servers={self.strategy.servers}) are "
                "not supported: the servers are busy serving; use servers=0 (colocated), whose ranks all save"
            )
        trainable = {id(p) for p in self.flat.params}
        pieces = model_pieces(self.module, trainable)
        if self.is_worker:
            replica = [
                p for p in model_pieces(self.module) if p.key.removeprefix("model/") in set(self.flat.names)
            ]
            for piece in replica:
                piece.save = False
            pieces += replica
        if self.shard is not None:
            index = self.servers.index(self.rank)
            segments = flat_segments(self.flat, self.bounds[index], self.bounds[index + 1], 0)
            pieces += self.shard.master.checkpoint_pieces(segments)
        return pieces


class _PushPull(torch.optim.Optimizer):
    """The worker's optimizer: ``step()`` pushes gradients and pulls parameters; the servers do the math.

    Its ``param_groups`` mirror the user's (a learning-rate scheduler works: each push carries the
    current learning rate of every group to the servers).
    """

    def __init__(self, runtime: PSRuntime, user: torch.optim.Optimizer) -> None:
        super().__init__(
            [
                {**{k: v for k, v in g.items() if k != "params"}, "params": g["params"]}
                for g in user.param_groups
            ],
            user.defaults,
        )
        self.runtime = runtime

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        self.runtime.push_pull([g["lr"] for g in self.param_groups])
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.runtime.flat.grad.zero_()
        self.runtime.flat.attach_grads()


def _shard_bounds(numel: int, shards: int) -> list[int]:
    """Cut ``numel`` elements into ``shards`` nearly equal consecutive ranges."""
    return [numel * i // shards for i in range(shards + 1)]


def _lost(reply: torch.Tensor) -> str:
    return f"worker rank {int(reply[0].item())} stopped"
