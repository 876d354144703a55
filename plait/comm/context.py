"""``plait.init()``: one process group per job, from torchrun's environment.

torchrun (``torch.distributed.run``, which ``plait launch`` drives) sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every worker; ``init`` reads them and opens the
default process group: gloo on CPU, NCCL when CUDA is present. With none of them set, the process
is a world of one, backed by an in-memory store, so the same script runs unchanged on a laptop.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys

import torch
import torch.distributed as dist

from plait.comm.algorithms import AlgorithmTable
from plait.comm.group import Group
from plait.comm.stats import CommStats
from plait.comm.watchdog import Watchdog
from plait.errors import ConfigError

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
        return Group(pgs.get(tuple(mine[0])), name, self.stats, table, self.device)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def _attempt_store(world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """torchrun's agent store, with keys of their own for this restart attempt.

    After an elastic restart torch 2.13's agent keeps its store, and the keys a killed attempt
    wrote (the old ranks' gloo addresses) can be read by the new one, which then fails to
    connect (pytorch/pytorch#167288). A prefix per attempt keeps every attempt's keys apart.
    """
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"plait/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


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
            store = _attempt_store(world_size, timeout)
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
        watchdog_s = float(os.environ.get("PLAIT_WATCHDOG_S", "300"))
    watchdog = None
    if dist.get_world_size() > 1 and watchdog_s > 0 and "MASTER_ADDR" in os.environ:
        watchdog = Watchdog(stats, dist.get_rank(), dist.get_world_size(), watchdog_s)
    _current = Context(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        backend=dist.get_backend(),
        device=device,
        world=Group(None, "world", stats, algorithms, device),
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

    With ``exit_code``, end the process right after, skipping interpreter teardown: gloo's threads
    can abort a process at exit ("terminate called without an active exception", seen here in about
    1 run of 8 of a 2-rank DDP script), and leaving with ``os._exit`` after destroying the group
    avoids it. Standard streams are flushed first.
    """
    global _current
    while _shutdown_hooks:
        _shutdown_hooks.pop()()
    if _current is not None and _current.watchdog is not None:
        _current.watchdog.stop()
    if dist.is_initialized():
        dist.destroy_process_group()
    _current = None
    if exit_code is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
