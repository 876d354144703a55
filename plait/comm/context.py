"""``plait.init()``: one process group per job, from torchrun's environment.

torchrun (``torch.distributed.run``, which ``plait launch`` drives) sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every worker; ``init`` reads them and opens the
default process group: gloo on CPU, NCCL when CUDA is present. With none of them set, the process
is a world of one, backed by an in-memory store, so the same script runs unchanged on a laptop.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import gc
import io
import math
import os
import sys
import warnings

import torch
import torch.distributed as dist

from plait.comm.algorithms import AlgorithmTable
from plait.comm.group import Group
from plait.comm.stats import CommStats
from plait.comm.watchdog import Watchdog
from plait.errors import ConfigError, divisors

_current: Context | None = None
_shutdown_hooks: list = []


def on_shutdown(hook) -> None:
    """Run ``hook()`` at the start of ``shutdown()``, while the process group still works (newest first)."""
    _shutdown_hooks.append(hook)


@dataclasses.dataclass
class Context:
    """This process's place in the job and its handles on the wire."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    world: Group
    """Every rank: the group data parallelism uses when there is no mesh."""
    stats: CommStats
    """Bytes, time and the op log of every collective this process made."""
    algorithms: AlgorithmTable
    """Which reduce-scatter / all-gather algorithm each message size uses (measured or pinned)."""
    watchdog: Watchdog | None = None
    """Explains and ends a hang (a collective pending longer than its timeout); None in a world of one."""

    def split(self, partition: list[list[int]], name: str) -> Group:
        """One group per list of global ranks in ``partition``; returns the one holding this rank.

        Every rank of the world must call this with the same partition (torch's ``new_group`` is
        collective over the world even for ranks outside the new group).
        """
        mine = [ranks for ranks in partition if self.rank in ranks]
        if len(mine) != 1:
            raise ConfigError(
                f"rank {self.rank} is in {len(mine)} of the groups {partition}; it must be in exactly one"
            )
        pgs = {tuple(ranks): dist.new_group(ranks) for ranks in partition} if self.world_size > 1 else {}
        # a table of its own: algorithm choices are agreed within a group (its rank 0 decides), and
        # two groups measuring the same message size may decide differently
        table = AlgorithmTable(pinned=self.algorithms.pinned)
        hosts = [self.world.hosts[r] for r in mine[0]]
        return Group(pgs.get(tuple(mine[0])), name, self.stats, table, self.device, hosts)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def _env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(
            f"environment variable {name}={value!r} is not a number of seconds; use a number >= 0 (0: off)"
        )
    return seconds


def ranks_per_host(world_size: int, given: int | None = None) -> int:
    """``given``, else torchrun's ``LOCAL_WORLD_SIZE``, else every rank on one host; it must divide the world."""
    what = "local_world_size"
    if given is None:
        what, value = "LOCAL_WORLD_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "")
        try:
            given = int(value) if value else world_size
        except ValueError:
            raise ConfigError(f"environment variable LOCAL_WORLD_SIZE={value!r} is not an integer") from None
    if not isinstance(given, int) or given < 1 or world_size % given:
        raise ConfigError(
            f"{what}={given!r} does not divide the world size {world_size}: torchrun starts the same "
            f"number of ranks on every host; use one of {divisors(world_size)}"
        )
    return given


def host_of_ranks(world_size: int) -> list[int]:
    """The host (node) of every global rank: torchrun numbers ranks host by host, LOCAL_WORLD_SIZE each."""
    per_host = ranks_per_host(world_size)
    return [rank // per_host for rank in range(world_size)]


def attempt_prefix() -> str:
    """The store key prefix of this job and restart attempt: ``plait/<run id>/attempt<n>/``.

    After an elastic restart torch 2.13's agent keeps its store, and the keys a killed attempt
    wrote (the old ranks' gloo addresses) can be read by the new one, which then fails to
    connect (pytorch/pytorch#167288): a prefix per attempt keeps every attempt's keys apart. The run
    id (torchrun's ``--rdzv-id``, which ``plait launch`` requires to be unguessable on a multi-node
    job) keeps plait's keys out of reach of a client that does not know it.
    """
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "local")
    return f"plait/{run_id}/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"


def _agent_store(
    world_size: int,
    timeout: datetime.timedelta,
    prefix: str,
    connect_timeout: datetime.timedelta | None = None,
) -> dist.Store:
    """A client of the job's store at MASTER_ADDR:MASTER_PORT that sees only keys under ``prefix``.

    torchrun's agent store, or, when the agent does not share it (``plait launch`` on several
    nodes), the one rank 0 hosts for ``init_process_group``. ``timeout`` bounds each operation;
    ``connect_timeout`` (default: ``timeout``) bounds connecting, which on a busy machine can take
    longer than a short operation limit allows.
    """
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=connect_timeout or timeout,
    )
    store.set_timeout(timeout)
    return dist.PrefixStore(prefix, store)


def init(backend: str | None = None, timeout_s: float = 600.0, watchdog_s: float | None = None) -> Context:
    """Join the job's default process group (idempotent) and return this process's :class:`Context`.

    ``backend`` defaults to "nccl" when CUDA is available, else "gloo". ``timeout_s`` bounds how long
    any collective may wait before torch raises. ``watchdog_s`` (default: ``PLAIT_WATCHDOG_S``, else
    300) is how long an op may stay in flight before plait's watchdog explains the hang and ends
    the job; 0 turns it off.
    """
    global _current
    if _current is not None:
        return _current
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if (rank is None) != (world_size is None):
        raise ConfigError(
            f"RANK={rank} but WORLD_SIZE={world_size}: set both (torchrun or `plait launch` does) or neither"
        )
    world_size = world_size or 1
    rank = rank or 0
    if not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    local_rank = rank if local_rank is None else local_rank

    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ConfigError(f"backend={backend!r} is not supported; use 'gloo' (CPU) or 'nccl' (CUDA)")
    if backend == "nccl" and not cuda:
        raise ConfigError("backend='nccl' needs CUDA, and torch.cuda.is_available() is False; use 'gloo'")
    device = (
        torch.device("cuda", local_rank % torch.cuda.device_count())
        if backend == "nccl"
        else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)

    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        device_id = device if device.type == "cuda" else None
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            store = _agent_store(world_size, timeout, attempt_prefix())
            dist.init_process_group(
                backend, store=store, rank=rank, world_size=world_size, timeout=timeout, device_id=device_id
            )
        else:
            dist.init_process_group(
                backend,
                init_method="env://",
                rank=rank,
                world_size=world_size,
                timeout=timeout,
                device_id=device_id,
            )
    stats = CommStats()
    algorithms = AlgorithmTable()
    if watchdog_s is None:
        watchdog_s = _env_seconds("PLAIT_WATCHDOG_S", 300.0)
    watchdog = None
    if dist.get_world_size() > 1 and watchdog_s > 0 and "MASTER_ADDR" in os.environ:
        # a client of its own, with a short operation timeout: its thread must notice a lost store in
        # seconds; connecting may take longer (CI saw a 5 s connect time out with 4 ranks on 2 cores)
        store = _agent_store(
            world_size,
            datetime.timedelta(seconds=5),
            attempt_prefix() + "watchdog/",
            connect_timeout=datetime.timedelta(seconds=min(timeout_s, 60.0)),
        )
        address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        watchdog = Watchdog(stats, dist.get_rank(), dist.get_world_size(), watchdog_s, store, address)
    _current = Context(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        backend=dist.get_backend(),
        device=device,
        world=Group(None, "world", stats, algorithms, device, host_of_ranks(dist.get_world_size())),
        stats=stats,
        algorithms=algorithms,
        watchdog=watchdog,
    )
    return _current


def current() -> Context:
    """The context ``init`` made, initialising a world of one (or torchrun's world) on first use."""
    return _current if _current is not None else init()


def shutdown(exit_code: int | None = None) -> None:
    """Leave the process group; ``init`` may be called again afterwards.

    In a job of several ranks, this process then ends without interpreter teardown, keeping its
    exit status. Teardown can kill a rank that finished well with SIGABRT ("terminate called without
    an active exception"; 2 of 40 torchrun jobs of a 3-step gloo DDP script beside a busy core,
    benchmarks/teardown_abort.py). The cause, from core dumps: a gloo worker thread drops its last
    reference to a finished work while the main thread is in ``Py_FinalizeEx``; the work's captured
    thread-local state holds the ``contextvars.Context`` that torch stashes for every ``backward()``,
    and releasing it takes the GIL, which CPython refuses a thread during finalization by ending it
    with ``pthread_exit``; that unwind through a noexcept destructor calls ``std::terminate``
    (pytorch/pytorch#117762, #190489). While anything still holds the group (a DDP reducer, a
    strategy's runtime), ``destroy_process_group`` does not join gloo's worker threads, and a
    thread's last release of a work cannot be waited for from Python; not finalizing closes the window.
    So the first exit handler to run (the last registered) runs the others (logging's flush...),
    flushes every open file, and leaves with ``os._exit``: status 1 after an uncaught exception, the code given to ``sys.exit``, else 0.
    (``raise SystemExit(n)`` written out bypasses ``sys.exit`` and ends with 0: call ``sys.exit``;
    an exit handler registered after this call runs twice.)

    With ``exit_code``, end the process right here, with that status, the same way.
    """
    global _current
    while _shutdown_hooks:
        _shutdown_hooks.pop()()
    if _current is not None and _current.watchdog is not None:
        _current.watchdog.stop()
    several = dist.is_initialized() and dist.get_world_size() > 1
    if dist.is_initialized():
        dist.destroy_process_group()
    _current = None
    if exit_code is not None:
        _flush_everything()
        os._exit(exit_code)
    if several:
        _end_without_teardown()


_exit_status = 0


def _flush_everything() -> None:
    with warnings.catch_warnings():  # isinstance on every object touches deprecated module attributes
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, io.IOBase):
                with contextlib.suppress(Exception):  # closed, or not writable
                    obj.flush()
    sys.stdout.flush()
    sys.stderr.flush()


def _end_without_teardown() -> None:
    """At interpreter exit, run the exit handlers, flush, and ``os._exit`` with the process's status."""
    if getattr(_end_without_teardown, "armed", False):
        return
    _end_without_teardown.armed = True
    excepthook, exit_ = sys.excepthook, sys.exit

    def failed(*info) -> None:
        global _exit_status
        _exit_status = 1
        excepthook(*info)

    def exit_with(status: object = None) -> None:
        global _exit_status
        _exit_status = status if isinstance(status, int) else (0 if status is None else 1)
        exit_(status)

    def end() -> None:
        atexit.unregister(end)
        atexit._run_exitfuncs()  # the handlers registered before this one (they would run after it)
        _flush_everything()
        os._exit(_exit_status)

    sys.excepthook, sys.exit = failed, exit_with
    atexit.register(end)
