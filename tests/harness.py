"""The one way tests start ranks: N real processes over gloo on loopback.

``run_ranks(fn, world_size, *args)`` runs ``fn(*args)`` on every rank and returns the per-rank results
in rank order. What it guarantees:

* Rendezvous without a port race: this process hosts the TCPStore on a port the OS picked, and the
  ranks join it as torchrun's workers join their agent's store (``TORCHELASTIC_USE_AGENT_STORE``),
  so ``plait.init()`` reads the same environment variables it reads under ``plait launch``.
* ``OMP_NUM_THREADS=1`` and one torch thread per rank (2 cores, up to 4 ranks).
* A deadline: a rank that neither returns nor fails in time is reported as hung, with the end of
  its stderr and a Python stack dump (faulthandler dumps on SIGTERM, then the rank dies), and
  every rank is killed.
* A failure names the rank and carries its traceback; the other ranks get a short grace period and
  are then killed, so one error never turns into a hang.
* Each rank ends with ``destroy_process_group()`` then ``os._exit``: gloo can abort at interpreter exit
  ("terminate called without an active exception") otherwise, which would flake CI (shared/FACTS.md).

``fn`` must be importable (module level in a test module); ranks are forked from a forkserver that
has already imported torch and plait, so starting four ranks costs well under a second.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

_ctx = mp.get_context("forkserver")
_ctx.set_forkserver_preload(["torch", "torch._dynamo", "plait", "plait.models", "plait.data"])


class RankFailure(AssertionError):
    """One or more ranks failed, died or hung; the message says which and why."""


def _worker(
    fn: Callable, rank: int, world_size: int, port: int, args: tuple, conn, stderr_path: str, env: dict
) -> None:
    import faulthandler

    log = open(stderr_path, "w")  # noqa: SIM115 - must outlive this frame until os._exit
    os.dup2(log.fileno(), 2)
    faulthandler.register(signal.SIGTERM, file=log, all_threads=True, chain=True)
    per_host = int(env.get("LOCAL_WORLD_SIZE", world_size))  # a smaller one emulates several hosts
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank % per_host),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(per_host),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            "OMP_NUM_THREADS": "1",
            **env,
        }
    )
    import torch

    import plait

    torch.set_num_threads(1)
    code = 0
    try:
        # plain pickle copies tensors into the message; multiprocessing's own pickler would pass
        # shared-memory handles that die with this process before the parent reads them
        conn.send_bytes(pickle.dumps(("ok", fn(*args))))
    except BaseException:
        conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
        code = 1
    finally:
        try:
            plait.shutdown()
        finally:
            conn.close()
            log.flush()
            os._exit(code)


def _tail(path: str, limit: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    return text[-limit:]


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    grace: float = 10.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` ranks; return their results in rank order or raise RankFailure."""
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    tmp = tempfile.mkdtemp(prefix="plait-ranks-")
    procs, conns, logs = [], [], []
    for rank in range(world_size):
        receive, send = _ctx.Pipe(duplex=False)
        log = os.path.join(tmp, f"rank{rank}.stderr")
        p = _ctx.Process(
            target=_worker, args=(fn, rank, world_size, store.port, args, send, log, env or {}), daemon=True
        )
        p.start()
        send.close()
        procs.append(p)
        conns.append(receive)
        logs.append(log)

    results: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    first_failure: float | None = None
    while len(results) < world_size:
        now = time.monotonic()
        limit = deadline if first_failure is None else min(deadline, first_failure + grace)
        if now >= limit:
            break
        waiting = {conns[r]: r for r in range(world_size) if r not in results}
        for conn in mp.connection.wait(list(waiting), timeout=min(1.0, limit - now)):
            rank = waiting[conn]
            try:
                results[rank] = pickle.loads(conn.recv_bytes())
            except EOFError:
                procs[rank].join(5)
                if procs[rank].exitcode == 0:  # ended cleanly without a result (a parameter server does)
                    results[rank] = ("ok", None)
                else:
                    results[rank] = ("died", f"exited with code {procs[rank].exitcode} before returning")
            if results[rank][0] != "ok" and first_failure is None:
                first_failure = time.monotonic()

    for r, p in enumerate(procs):
        if r not in results and p.is_alive():
            p.terminate()  # faulthandler writes every thread's stack to the rank's log, then it dies
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()
    del store  # the ranks are gone: release the port

    if all(results.get(r, ("",))[0] == "ok" for r in range(world_size)):
        return [results[r][1] for r in range(world_size)]
    lines = [f"{world_size}-rank run of {fn.__module__}.{fn.__name__} failed:"]
    for r in range(world_size):
        status, detail = results.get(r, ("hung", None))
        if status == "ok":
            continue
        if status == "hung":
            cause = "did not finish" + (
                " after another rank failed" if first_failure else f" within {timeout:.0f}s"
            )
            detail = f"{cause}; stderr and stacks:\n{_tail(logs[r])}"
        elif status == "died":
            detail = f"{detail}; stderr:\n{_tail(logs[r])}"
        lines.append(f"--- rank {r}: {status}\n{detail}")
    raise RankFailure("\n".join(lines))
