"""A parameter server's shard (its update rule) and the message loop that serves it."""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from plait.comm import Group
from plait.strategies.async_ps.protocol import ABORT, CHECKPOINT, DONE, PUSH, REPLY, InFlight, recv_request
from plait.strategies.master import MasterWeights

if TYPE_CHECKING:
    from plait.strategies.async_ps import AsyncPS


class Shard:
    """One server's shard and its update rule: master parameters, optimizer, clocks, held replies.

    No communication here: the server's loop (or a colocated worker) calls ``push`` / ``read`` /
    ``leave``; ``lock`` guards everything (``read`` expects the caller to hold it).
    """

    def __init__(self, master: MasterWeights, workers: list[int], strategy: AsyncPS) -> None:
        self.master = master
        self.strategy = strategy
        self.clock = {w: 0 for w in workers}
        self.active = set(workers)
        self.version = 0
        self.read_version = {w: 0 for w in workers}
        """The version each worker's current parameters are (all start from version 0)."""
        self.rules = strategy.rules()
        self.sent = {w: master.data.clone() for w in workers} if "dc" in self.rules else {}
        """DC-ASGD's w_then: the parameters each worker was last sent."""
        self.last_step = torch.zeros_like(master.data) if "lookahead" in self.rules else None
        """The look-ahead's prediction of one step: the last step's displacement w_v - w_(v-1)."""
        self.held: list[tuple[int, Callable[[], None]]] = []
        self.total = torch.zeros_like(master.data)
        self.count = 0
        self.weights = 0.0
        self.lrs: list[float] = []
        self.staleness_seen: collections.Counter[int] = collections.Counter()
        self.versions_behind: collections.Counter[int] = collections.Counter()
        self.pushes = 0
        self.lock = threading.Lock()

    def read(self, worker: int) -> tuple[torch.Tensor, int]:
        """The parameters and version sent to ``worker`` (caller holds ``lock``).

        Under the look-ahead, the parameters the shard will be at when this worker's next push
        lands, extrapolated from the last step: w + k x (w_v - w_(v-1)), k the steps expected
        before then (``steps_before_next_push``).
        """
        self.read_version[worker] = self.version
        params = self.master.data
        if self.last_step is not None:
            ahead = self.steps_before_next_push()
            if ahead:
                params = params + ahead * self.last_step
        if "dc" in self.rules:
            self.sent[worker].copy_(params)
        return params, self.version

    def steps_before_next_push(self) -> int:
        """Steps the shard makes before a worker answered now pushes again, if all workers run at one speed.

        Meanwhile each of the other N - 1 active workers pushes once: one step per push under
        ``"scale"``; under accumulate, one step per N pushes on top of the ``count`` already pending
        (1 when a step is filling, 0 right after the push that completed one: a synchronous reply).
        """
        others = len(self.active) - 1
        if self.strategy.update == "scale" and self.bound() != 0:
            return max(others, 0)
        return (self.count + others) // max(len(self.active), 1)

    def push(self, worker: int, grad: torch.Tensor, lrs: list[float], reply: Callable[[], None]) -> None:
        """Apply (or accumulate) ``worker``'s gradient; ``reply`` answers it when the bound allows."""
        with self.lock:
            self.pushes += 1
            self.clock[worker] += 1
            self.lrs = lrs
            grad, weight = self.compensate(worker, grad)
            if self.strategy.update == "scale" and self.bound() != 0:
                self._step(grad, weight / len(self.clock))
            else:
                self.total.add_(grad, alpha=weight)
                self.count += 1
                self.weights += weight
                if self.count >= len(self.active):
                    self._step_accumulated()
            self.held.append((worker, reply))
            self._release()

    def compensate(self, worker: int, grad: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The gradient to apply and its learning-rate weight, after the staleness compensation."""
        behind = self.version - self.read_version[worker]
        self.versions_behind[behind] += 1
        weight = 1.0
        if "staleness-lr" in self.rules:
            # tau as Zhang et al. count it: the version this push helps make (version + 1) minus
            # the version it was computed on; 1 for a synchronous step
            weight = 1.0 / (behind + 1)
        if "dc" in self.rules:
            drift = self.master.data - self.sent[worker]  # w_now - w_then
            grad = grad + self.strategy.dc_lambda * grad * grad * drift
        return grad, weight

    def _step_accumulated(self) -> None:
        """One step on the weighted mean of the accumulated pushes, at lr x their mean weight."""
        self._step(self.total / self.weights, self.weights / self.count)
        self.total.zero_()
        self.count, self.weights = 0, 0.0

    def _step(self, grad: torch.Tensor, lr_scale: float) -> None:
        self.master.ensure_grads()
        self.master.grad.copy_(grad)
        self.master.attach_grads()
        for group, lr in zip(self.master.optimizer.param_groups, self.lrs):
            group["lr"] = lr * lr_scale
        if self.last_step is not None:
            self.last_step.copy_(self.master.data)
        self.master.optimizer.step()
        if self.last_step is not None:
            torch.sub(self.master.data, self.last_step, out=self.last_step)
        self.version += 1

    def _slowest(self) -> int:
        """The fewest pushes any active worker has made."""
        return min((self.clock[w] for w in self.active), default=0)

    def bound(self) -> int | None:
        """The staleness bound in force: 0 (synchronous) until every active worker has made
        ``sync_steps`` pushes, then the strategy's."""
        return 0 if self._slowest() < self.strategy.sync_steps else self.strategy.staleness

    def _release(self) -> None:
        """Answer every held worker the staleness bound now lets go on."""
        slowest, bound = self._slowest(), self.bound()
        keep = []
        for worker, reply in self.held:
            lead = self.clock[worker] - slowest
            if bound is None or lead <= bound:
                # the staleness this worker computes at: how many steps it is ahead of the slowest
                self.staleness_seen[max(lead, 0)] += 1
                reply()
            else:
                keep.append((worker, reply))
        self.held = keep

    def after_load(self) -> None:
        """Forget what described the parameters before a checkpoint load (DC-ASGD's copies, the last step)."""
        for sent in self.sent.values():
            sent.copy_(self.master.data)
        if self.last_step is not None:
            self.last_step.zero_()

    def leave(self, worker: int) -> None:
        with self.lock:
            self.active.discard(worker)
            if self.count and self.count >= len(self.active):
                self._step_accumulated()
            self._release()


class Server:
    """The message loop of one shard: receive pushes from any worker, reply when the shard allows."""

    def __init__(
        self, shard: Shard, ps: Group, rank: int, workers: list[int], n_groups: int, timeout_s: float
    ) -> None:
        self.shard = shard
        self.ps = ps
        self.rank = rank
        self.remote = [w for w in workers if w != rank]
        self.dedicated = rank not in workers
        """A server only (``servers=k``), not a worker's colocated thread."""
        self.n_groups = n_groups
        self.timeout_s = timeout_s
        self.sends = InFlight()
        self.failure: str | None = None
        self.on_checkpoint: Callable[[dict], None] | None = None
        """A dedicated server's part in a checkpoint save or load the workers asked for (the request)."""

    def serve(self) -> None:
        """Answer pushes from any remote worker until every one has left; fail by name if one goes silent.

        A checkpoint request is carried out once every remaining worker has sent it: the workers
        then wait in the checkpoint's collectives, so no push comes meanwhile and the shard holds still.
        """
        size = self.shard.master.data.numel()
        remote = set(self.remote)
        last_heard = {w: time.monotonic() for w in remote}
        requests: dict[int, dict] = {}
        while remote:
            message = torch.empty(size + 1 + self.n_groups)
            handle = self.ps.recv(message, None, async_op=True, tag=PUSH)
            try:
                arrived, error = handle.wait_for(self.timeout_s), "silent"
            except RuntimeError as e:  # a worker's connection broke
                arrived, error = False, e
            if not arrived:
                silent = min(remote, key=last_heard.get)
                self._abort(
                    remote, silent, f"no push from worker rank {silent} in {self.timeout_s:g}s ({error})"
                )
            worker = handle.source()
            last_heard[worker] = time.monotonic()
            if message[size].item() == DONE:
                remote.discard(worker)
                self.shard.leave(worker)
                continue
            if message[size].item() == CHECKPOINT:
                requests[worker] = recv_request(self.ps, worker)
                if remote <= set(requests):
                    self._checkpoint(requests)
                    requests.clear()
                    last_heard = {w: time.monotonic() for w in remote}
                continue
            self.shard.push(worker, message[:size], message[size + 1 :].tolist(), self._replier(worker))
        if self.dedicated:
            self._send_final()

    def _send_final(self) -> None:
        """A dedicated server's last word: its final shard to every worker (``Worker.pull_final``).

        A worker that ended without asking for it (``plait.shutdown`` outside the trainer) has
        closed its connection: that send fails, and nothing else depends on it.
        """
        message = torch.cat([self.shard.master.data, torch.tensor([float(self.shard.version)])])
        sends = []
        for worker in self.remote:
            with contextlib.suppress(RuntimeError):  # gloo may refuse at once: the connection is closed
                sends.append(self.ps.send(message, worker, async_op=True, tag=REPLY))
        for send in sends:
            with contextlib.suppress(RuntimeError):
                send.wait()

    def _checkpoint(self, requests: dict[int, dict]) -> None:
        request = next(iter(requests.values()))
        if self.on_checkpoint is None:
            raise RuntimeError(
                f"parameter server rank {self.rank}: workers asked for a checkpoint ({request}), "
                "but only a dedicated server takes part in one (a colocated shard is saved by its worker)"
            )
        if any(r != request for r in requests.values()):
            raise RuntimeError(
                f"parameter server rank {self.rank}: workers asked for different checkpoints: {requests}"
            )
        self.on_checkpoint(request)

    def serve_in_thread(self) -> threading.Thread:
        """A colocated server: whatever stops it is kept in ``failure``, for this rank's worker to report."""

        def run() -> None:
            try:
                self.serve()
            except BaseException as e:
                self.failure = self.failure or f"the server thread failed: {e!r}"

        thread = threading.Thread(target=run, name="plait-ps-server", daemon=True)
        thread.start()
        return thread

    def _replier(self, worker: int) -> Callable[[], None]:
        def reply() -> None:  # called by the shard, under its lock
            params, version = self.shard.read(worker)
            message = torch.cat([params, torch.tensor([float(version)])])
            self.sends.track(self.ps.send(message, worker, async_op=True, tag=REPLY))

        return reply

    def _abort(self, workers: set[int], lost: int, why: str) -> None:
        """Tell every other worker waiting on this server which worker was lost, then fail."""
        for worker in workers - {lost}:
            message = torch.zeros(self.shard.master.data.numel() + 1)
            message[0], message[-1] = lost, ABORT
            with contextlib.suppress(RuntimeError):  # that worker may be gone too
                self.ps.send(message, worker, async_op=True, tag=REPLY).wait(timeout_s=self.timeout_s)
        self.failure = why
        raise RuntimeError(f"parameter server rank {self.rank}: {why}")
