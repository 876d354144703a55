"""Asynchronous training with a parameter server and bounded staleness.

The flat parameters are cut into one shard per server; each server holds its shard's master copy
and optimizer (the user's optimizer, rebuilt over the shard). A worker's ``optimizer.step()`` is a
*push-pull*: it sends each server its shard of the gradient (and the learning rate of each group),
and waits for that server's reply, the shard's current parameters. No worker waits for another,
except as the staleness bound says:

* ``staleness=None``: fully asynchronous. Every push is answered at once.
* ``staleness=s >= 1``: stale synchronous parallel (Ho et al., NIPS 2013). The reply to a worker
  more than ``s`` steps ahead of the slowest active worker is held back until the slowest catches
  up: no worker computes on parameters more than ``s`` of its steps ahead of the slowest.
* ``staleness=0``: bulk synchronous: every reply waits for every worker's push, which reproduces
  ddp exactly.

Whatever the bound, the first ``sync_steps`` steps of every worker (default 10) are synchronous:
from a random start, under the learning-rate warm-up, the gradients and the steps are largest and
a stale one costs most (post-local SGD, Lin et al., ICLR 2020, starts synchronous for the same
reason). It costs those few steps' waiting for the slowest worker.

How big an update a push makes (``update``). A synchronous step averages N workers' gradients and
steps once. Dividing each push's gradient by N is right for SGD only: Adam is invariant to the
gradient's scale, so every push would still move the parameters a whole step.

* ``"accumulate"`` (default): the server sums pushes, from whichever workers they come, and steps
  once per N of them on their mean: K-batch-async SGD (Dutta et al., AISTATS 2018) with K = N. Any
  optimizer then takes the synchronous number of steps on gradients of the synchronous batch;
  with staleness 0 these are exactly ddp's steps.
* ``"scale"``: every push is a step of its own, at learning rate lr / N (except at staleness 0,
  which always accumulates: that is the synchronous step).

Measured (gpt-tiny, 4 workers, 300 steps, AdamW lr 3e-3; docs/benchmarks.md, issue 16): ddp ends
at 2.380; scale at 2.606, accumulate at 2.714 alone. So accumulate is the default: with its
compensation it ends lowest, its servers run one optimizer step per N pushes instead of N (300
steps in 145 s against 183 s), and staleness 0 is the same code (2.326 through this path: ddp's
math but each worker's gradient clipped). What is left of the gap to ddp is the delay itself: a
push computed while the step before it is still filling lands one version after the parameters it
saw (about half the pushes; a tenth land 2-5 versions late).

Staleness compensation (``compensation``; rules joined by "+" all apply; default
``"lookahead+staleness-lr"``, the lowest measured: 2.480, against lookahead 2.532, staleness-lr
2.560, none 2.714; those runs evaluated a worker's last reply, with no synchronous steps; with
both, and the run's final parameters evaluated, the default ends at 2.406 on the mean of five
runs, ddp + 1.1%). A gradient's staleness tau (Zhang et al.'s count) is the version its step makes
minus the version it was computed on: 1 in a synchronous step, 2 for a push computed while the
step before was still filling.

* ``"staleness-lr"`` (Zhang et al., IJCAI 2016): the gradient's learning rate is divided by tau.
  Within one accumulated step: the gradient is the weighted mean of the pushes, with weights
  w_i = 1 / tau_i, and the step's learning rate is lr x mean(w_i): for SGD exactly
  lr / N x sum_i g_i / tau_i; for Adam it scales the step, not the gradient.
* ``"lookahead"`` (momentum-aware, after DANA, Hakimi et al. 2019, which sends workers the
  master's position predicted from its momentum): the reply is the shard extrapolated by its last
  step, w + k x (w_v - w_(v-1)), k the steps it will make before this worker pushes again (1
  while a step is filling, 0 right after one: a synchronous reply is unchanged). With Adam the
  last step is lr x m / sqrt(v), whose direction changes slowly (beta1 0.9), so the gradient is
  taken about where it will be applied.
* ``"dc"`` (DC-ASGD, Zheng et al., ICML 2017): g <- g + lambda x g * g * (w_now - w_then), a
  first-order Taylor correction of the stale gradient with g * g standing in for the Hessian
  diagonal; w_then is the shard the server last sent that worker (one copy per worker kept).
* ``"none"``.

Placement (BytePS's two modes): ``servers=0`` colocates a server thread with every worker, one
shard each; ``servers=k`` makes the last k ranks servers only: their ``plait.setup`` serves until
every worker has finished, then ends the process, so one script runs on all ranks unchanged.

Messages (torch.distributed isend / irecv, a process group of their own, receive from any source):

    push     worker -> server   [gradient shard | worker's version | lr of each group]   tag PUSH
    reply    server -> worker   [parameter shard | server's version]                     tag REPLY
    request  worker -> server   [byte count], then [JSON bytes]                          tag CONTROL

Checkpoints: a worker's ``plait.checkpoint.save`` / ``load`` first asks every dedicated server
(a CHECKPOINT push, then the request: kind, directory, step); once every remaining worker has
asked, the server takes its part in the same collective save or load with its shard and its
optimizer state, so dedicated servers checkpoint and resume like colocated ones (always blocking:
a server cannot join a background save's later completion).

A worker that leaves tells the servers (version -1): ``plait.shutdown()`` does, and the trainer
does as soon as its last step is taken (``finish_training``), before its closing all-gather, where
a worker waiting for a straggler would otherwise look silent to the straggler's server. The
trainer then installs the servers' final state in every worker (``final_parameters``: an
all-gather of the colocated shards, or a last reply from each dedicated server), so the model
that is evaluated at the end is the one the run produced, not a worker's last, older reply. A server
that hears from no active worker for ``timeout_s`` seconds, or loses one, tells the others which
worker it lost (version -2) and fails; so does a worker whose server goes silent. No hang.
Communication per worker step: the gradient out and the parameters back, 2 x parameter bytes
(the push-pull does not shrink bytes; staleness only removes waiting).
"""

from __future__ import annotations

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
from plait.comm.context import on_shutdown, shutdown
from plait.errors import ConfigError
from plait.strategies.async_ps.server import Server, Shard
from plait.strategies.async_ps.worker import PushPull, Worker
from plait.strategies.base import Runtime, Strategy, adopt, group_index, group_ordered, parameter_names
from plait.strategies.data_parallel import replicate_from_rank0
from plait.strategies.master import MasterWeights, flat_segments, owned_runs

UPDATES = ("accumulate", "scale")
COMPENSATIONS = ("none", "staleness-lr", "dc", "lookahead")


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
    update: str = "accumulate"
    """"accumulate": one optimizer step per N pushes, on their mean; "scale": a step of lr / N per push."""
    compensation: str = "lookahead+staleness-lr"
    """Stale gradients: "staleness-lr" (lr / staleness, Zhang et al.), "dc" (DC-ASGD, Zheng et al.),
    "lookahead" (reply the parameters extrapolated to where the push will land), several joined by "+", or "none"."""
    dc_lambda: float = 1.0
    """compensation="dc": lambda in g + lambda * g * g * (w_now - w_then)."""
    sync_steps: int = 10
    """The first this many steps of every worker are synchronous (staleness 0), then ``staleness``
    applies: stale gradients cost most in the first steps from a random start."""

    def __post_init__(self) -> None:
        if self.staleness is not None and (not isinstance(self.staleness, int) or self.staleness < 0):
            raise ConfigError(f"staleness={self.staleness!r} must be None (fully async) or an integer >= 0")
        if self.servers < 0:
            raise ConfigError(f"servers={self.servers} must be >= 0 (0: colocated with the workers)")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s={self.timeout_s} must be > 0")
        if self.update not in UPDATES:
            raise ConfigError(f"update={self.update!r} is not known; use one of {', '.join(UPDATES)}")
        if self.compensation != "none" and not set(self.compensation.split("+")) <= set(COMPENSATIONS[1:]):
            raise ConfigError(
                f"compensation={self.compensation!r} is not known; use one of {', '.join(COMPENSATIONS)} "
                "or several joined by '+' (lookahead+staleness-lr)"
            )
        if not isinstance(self.sync_steps, int) or self.sync_steps < 0:
            raise ConfigError(f"sync_steps={self.sync_steps!r} must be an integer >= 0")
        if self.dc_lambda < 0:
            raise ConfigError(f"dc_lambda={self.dc_lambda} must be >= 0")

    def rules(self) -> set[str]:
        """The compensation rules in force (``"a+b"`` applies both; ``"none"``: the empty set)."""
        return set() if self.compensation == "none" else set(self.compensation.split("+"))

    def validate(self, ctx: Context, model: nn.Module) -> None:
        if self.servers >= ctx.world_size:
            raise ConfigError(
                f"servers={self.servers} leaves no worker among {ctx.world_size} ranks; "
                f"use servers in 0..{ctx.world_size - 1}"
            )

    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx: Context) -> Runtime:
        if optimizer is None:
            raise ConfigError("the parameter server steps the optimizer: pass optimizer= to plait.setup")
        runtime = PSRuntime(self, model, optimizer, ctx)
        if runtime.worker is None:
            # a dedicated server: serve until every worker is done, then end the process, so the
            # user's training loop never runs here (one script for all ranks)
            runtime.server.on_checkpoint = _checkpointer(adopt(model, runtime), optimizer)
            runtime.server.serve()
            shutdown(exit_code=0)
        return runtime


class PSRuntime(Runtime):
    """This rank's place in the parameter server: a ``worker``, a ``server``, or both (colocated)."""

    synchronous = False

    def __init__(self, strategy: AsyncPS, module: nn.Module, optimizer: torch.optim.Optimizer, ctx: Context):
        super().__init__(strategy, module, optimizer)
        self.strategy = strategy
        n = ctx.world_size
        self.servers = list(range(n - strategy.servers, n)) if strategy.servers else list(range(n))
        self.workers = list(range(n - strategy.servers)) if strategy.servers else list(range(n))
        self.rank = ctx.rank
        is_worker = ctx.rank in self.workers
        self.dp_group = ctx.split([self.workers, *([self.servers] if strategy.servers else [])], "workers")
        ps = ctx.split(
            [list(range(n))], "ps"
        )  # all parameter-server traffic, apart from training collectives
        self.dp_rank, self.dp_size = self.workers.index(ctx.rank) if is_worker else 0, len(self.workers)

        names = parameter_names(module)
        groups = group_ordered(module, optimizer)
        params = [p for members in groups for p in members]
        self.flat = FlatBuffer(params, names=[names[p] for p in params])
        replicate_from_rank0(module, [self.flat], ctx.world)
        self.bounds = _shard_bounds(self.flat.numel, len(self.servers))
        self.n_groups = len(optimizer.param_groups)
        self.server: Server | None = None
        if ctx.rank in self.servers:
            group_of = group_index(groups)
            shard = self._make_shard(self.servers.index(ctx.rank), group_of, optimizer)
            self.server = Server(shard, ps, ctx.rank, self.workers, self.n_groups, strategy.timeout_s)
        self.worker: Worker | None = None
        self.optimizer = None
        self._server_thread: threading.Thread | None = None
        self._final = False
        self._started = time.monotonic()
        if is_worker:
            self.worker = Worker(self.flat, self.bounds, self.servers, ps, ctx.rank, strategy.timeout_s)
            self.worker.local = self.server
            self.optimizer = PushPull(self.worker, self.flat, optimizer)
            if self.server is not None:
                self._server_thread = self.server.serve_in_thread()
            on_shutdown(self.leave)

    def _make_shard(self, index: int, group_of: dict, optimizer: Any) -> Shard:
        owned = slice(self.bounds[index], self.bounds[index + 1])
        master = MasterWeights(
            owned_runs(self.flat, owned, group_of), optimizer, self.flat.data.device, self.dp_group
        )
        master.data.copy_(self.flat.data[owned])
        return Shard(master, self.workers, self.strategy)

    def leave(self) -> None:
        """Tell every server this worker is done (``plait.shutdown`` calls this); a colocated server then ends.

        The colocated server serves until every other worker has left too, however long a
        straggler takes: its thread ends by itself, at the latest ``timeout_s`` after the last
        message it heard (it then fails, naming the silent worker).
        """
        self.worker.leave(self.n_groups)
        if self._server_thread is not None:
            self._server_thread.join()

    def finish_training(self) -> None:
        """Tell every server this worker is done, without waiting for the other workers.

        Until then a server expects this worker's pushes: a worker that only waited (in a closing
        collective, say) would look silent to a straggler's server after ``timeout_s``.
        """
        if self.worker is not None:
            self.worker.leave(self.n_groups)

    def final_parameters(self) -> None:
        """Install the servers' final shards once every worker is done (the model a checkpoint saves).

        Colocated: this rank's shard is final once its server thread has ended (every other
        worker left) and this worker has left; the workers then all-gather their shards. Dedicated
        servers send each worker their final shard when the last worker has left.
        """
        if self.worker is None or self._final:
            return
        self._final = True
        self.finish_training()
        if self.strategy.servers:
            self.worker.pull_final()
            return
        self._server_thread.join()
        widths = [hi - lo for lo, hi in zip(self.bounds, self.bounds[1:])]
        width, data = max(widths), self.flat.data
        mine = torch.zeros(width, dtype=data.dtype)
        mine[: widths[self.dp_rank]].copy_(self.server.shard.master.data)
        every = torch.empty(width * len(widths), dtype=data.dtype)
        self.dp_group.all_gather(every, mine)
        for index, lo in enumerate(self.bounds[:-1]):
            data[lo : lo + widths[index]].copy_(every[index * width : index * width + widths[index]])

    # -- Runtime interface ------------------------------------------------------------------------

    @property
    def optimizer_state_elsewhere(self) -> bool:
        """A worker without a shard of its own: the servers hold the optimizer state."""
        return self.server is None

    @property
    def saves_in_background(self) -> bool:
        """Not with dedicated servers: they write their shards inside their serve loop, at once."""
        return not self.strategy.servers

    def begin_checkpoint(self, kind: str, directory: str, step: int) -> None:
        """A worker asks every dedicated server to take its part (colocated servers are this rank)."""
        if self.strategy.servers and self.worker is not None:
            request = {"kind": kind, "directory": directory, "step": step}
            self.worker.request_checkpoint(request, self.n_groups)

    def after_checkpoint_load(self) -> None:
        if self.server is not None:
            self.server.shard.after_load()

    def checkpoint_guard(self) -> contextlib.AbstractContextManager:
        """Hold the shard still (no push applied) while a checkpoint copies it."""
        return self.server.shard.lock if self.server is not None else contextlib.nullcontext()

    def replicated_tensors(self) -> dict[str, torch.Tensor]:
        """None: asynchronous replicas differ by design."""
        return {}

    def theory_bytes_per_step(self) -> int:
        """A worker sends its gradient and receives the parameters: the gradient bytes go out each step."""
        return self.flat.numel * self.flat.data.element_size()

    def metrics(self) -> dict[str, Any]:
        worker, shard = self.worker, self.server.shard if self.server is not None else None
        elapsed = max(time.monotonic() - self._started, 1e-9)
        pushes = worker.pushes if worker is not None else 0
        return {
            "pushes": pushes,
            "pulls": pushes,
            "pushes_per_s": pushes / elapsed,
            "pulls_per_s": pushes / elapsed,
            "ps_wait_s": worker.wait_seconds if worker is not None else 0.0,
            "version": worker.version if worker is not None else 0,
            "staleness_histogram": dict(shard.staleness_seen) if shard is not None else {},
            "versions_behind_histogram": dict(shard.versions_behind) if shard is not None else {},
        }

    def checkpoint_pieces(self, optimizer: object) -> list[CheckpointPiece]:
        """The servers' master shards (the parameters' truth) with their optimizer state; buffers whole.

        A worker's replica is only loaded into, never saved: it may be a few versions behind.
        """
        trainable = {id(p) for p in self.flat.params}
        pieces = model_pieces(self.module, trainable)
        if self.worker is not None:
            replica = [
                p for p in model_pieces(self.module) if p.key.removeprefix("model/") in set(self.flat.names)
            ]
            for piece in replica:
                piece.save = False
            pieces += replica
        if self.server is not None:
            index = self.servers.index(self.rank)
            segments = flat_segments(self.flat, self.bounds[index], self.bounds[index + 1], 0)
            pieces += self.server.shard.master.checkpoint_pieces(segments)
        return pieces


def _checkpointer(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[dict], None]:
    """A dedicated server's part in the checkpoint its workers asked for: the same collective save or load."""
    from plait.checkpoint import CheckpointError, load, save

    def checkpoint(request: dict) -> None:
        try:
            if request["kind"] == "save":
                save(request["directory"], model, optimizer, step=request["step"])
            else:
                load(request["directory"], model, optimizer)
        except CheckpointError:
            pass  # every worker raised the same error and decides what comes next (an older checkpoint)

    return checkpoint


def _shard_bounds(numel: int, shards: int) -> list[int]:
    """Cut ``numel`` elements into ``shards`` nearly equal consecutive ranges."""
    return [numel * i // shards for i in range(shards + 1)]
