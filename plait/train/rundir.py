"""Run directories: a fresh one per run, ``runs/latest`` pointing at the newest, one job at a time in each.

A run directory holds ``run.toml`` (the settings its checkpoints were trained with, written when the run
starts), ``checkpoints/``, ``metrics.jsonl`` and ``summary.json``. While a job uses it, ``run.lock``
names the job's launcher (pid, host) and, for a multi-node job, its rendezvous (endpoint and id). A
second job on the same directory fails at once naming that holder. What is taken over, and why it is safe:

* a lock whose pid is dead on this host: its job is gone (a pid can be checked on its own host only);
* a lock of the same multi-node job: every host's launcher of one job shares the run dir, so the newest
  one records itself. A host that was SIGKILLed and comes back with the same rendezvous takes its lock
  back, wherever the dead launcher ran.

A lock of another job held on another host is never taken over: plait cannot tell a dead launcher there
from a live one, and two jobs writing one run dir would mix their checkpoints. The message names the
holder and the way out (rerun that job to continue it, or delete the lock if it is gone).

A single-node job releases its lock when it ends. A multi-node job's launcher releases it when the job
succeeded (then every host's part is over, whichever launcher the lock names); after a failure it is left,
since the other hosts may go on without this one: it is stale once that host's pid is dead.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from plait.errors import ConfigError

RUNS = Path("runs")
LATEST = RUNS / "latest"
LOCK = "run.lock"


def new_run_dir(strategy: str) -> str:
    """``runs/<UTC time>-<strategy>``, made now, with ``runs/latest`` re-pointed at it."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    for n in range(100):
        path = RUNS / (f"{stamp}-{strategy}" + (f"-{n}" if n else ""))
        try:
            path.mkdir(parents=True)
            break
        except FileExistsError:
            continue
    else:
        raise ConfigError(f"could not make a fresh run directory under {RUNS}/; give --run-dir")
    if LATEST.is_symlink() or not LATEST.exists():  # a real directory there is an older run's: keep it
        link = RUNS / f".latest-{os.getpid()}"
        link.unlink(missing_ok=True)
        link.symlink_to(path.name)
        os.replace(link, LATEST)
    return str(path)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Held for the block of ``with hold(run_dir, job) as lock``; set ``lock.succeeded`` to the job's outcome."""

    def __init__(self, path: Path, mine: dict) -> None:
        self.path, self.mine = path, mine
        self.succeeded = True
        """Whether the job ended well (a multi-node job's lock is released then only); the block sets it."""

    def release(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            holder, job = json.loads(self.path.read_text()), self.mine["job"]
            mine = job is None and holder == self.mine
            # a multi-node job is over on every host only when it succeeded
            finished = job is not None and self.succeeded and holder.get("job") == job
            if mine or finished:
                self.path.unlink()


@contextlib.contextmanager
def hold(run_dir: str, job: str | None = None) -> Iterator[RunLock]:
    """Hold ``run_dir``'s lock for the block; a ConfigError naming the holder if another job has it.

    ``job`` names a multi-node job (its rendezvous): a lock held under the same name is this job's own,
    and this launcher records itself in it.
    """
    path = Path(run_dir, LOCK)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = RunLock(path, {"pid": os.getpid(), "host": socket.gethostname(), "job": job})
    _take(path, run_dir, lock.mine)
    try:
        yield lock
    except BaseException:
        lock.succeeded = False
        raise
    finally:
        lock.release()


def _write(path: Path, mine: dict) -> None:
    """Replace the lock file by ``mine`` in one rename (a reader sees the old holder or the new)."""
    partial = path.with_name(f"{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(mine))
    os.replace(partial, path)


def _take(path: Path, run_dir: str, mine: dict) -> None:
    """Make the lock file ``mine`` (taking over a stale one or one of this same job), else a ConfigError."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            pid, host, job = holder.get("pid"), holder.get("host"), holder.get("job")
            if mine["job"] is not None and job == mine["job"]:
                _write(path, mine)  # another launcher of this job, alive or not: the run dir is the job's
                return
            if host == mine["host"] and isinstance(pid, int) and not pid_alive(pid):
                print(f"plait: taking over {path}: its holder, pid {pid}, has exited", file=sys.stderr)
                path.unlink(missing_ok=True)
                continue
            again = (
                f"rerun that job (--rdzv-endpoint and --rdzv-id of {job}) to continue it, "
                if job is not None
                else ""
            )
            raise ConfigError(
                f"run dir {run_dir!r} is in use by pid {pid} on host {host!r}"
                + (f" for the multi-node job {job}" if job is not None else "")
                + f" (lock file {path}); wait for that job, give another --run-dir, {again}or delete {path} if "
                "that job is gone (plait checks a holder's pid on this host only)"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        return
    raise ConfigError(f"could not take the lock {path}; delete it if no job uses {run_dir!r}")
