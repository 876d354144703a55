"""Hang diagnosis: a collective that does not finish, a silent peer or a lost store is explained, then the job fails.

A thread looks at this rank's op log (``CommStats``) once a second and talks to the other ranks'
watchdogs through the job's store (not a collective: those are what hangs), under this attempt's
key prefix (``plait/<run id>/attempt<n>/watchdog/``). Three things end the process with exit code 3
after a message on stderr that names the rank and the op:

* **An op in flight longer than ``timeout_s``.** The watchdog asks every rank for the op it is in or
  last finished, waits a few seconds for the answers and prints what it learned::

    plait watchdog: rank 1 waits in all_reduce #42 on world [1024] float32 (0.00 MiB) at train.py:88 for 10 s
      rank 0: in all_gather #42 on world [2048] float32 (0.01 MiB) at zero.py:118 (a different op)
      rank 2: last finished all_reduce #41; it never reached #42 (behind)

* **A silent peer.** Every watchdog bumps a heartbeat counter in the store each second. Once an op
  has waited ``check_peers_after_s``, the waiting rank watches its peers' counters; one that does not
  move for ``silent_after_s`` belongs to a process that is dead, frozen or cut off (a lost host:
  no connection reset reaches gloo, which would wait for its own timeout), and is named at once.
* **The store gone** for ``store_lost_after_s``: what hosted it is lost (torchrun's agent on the
  rendezvous node, or on a multi-node ``plait launch`` rank 0's worker), so this attempt cannot go
  on; waiting would only hide it, and torchrun's agent may re-form the job without that node.

Every rank's watchdog also answers requests, even when its own collectives are fine, so a rank that
skipped a collective shows where it went instead. Only an op some thread waits on can be stuck
(``OpRecord.blocking``): an async send the parameter server never waits for is not (a gloo send's
work did not report completion to ``is_completed`` here, so its op stayed "pending"). ``stop`` ends the thread, joins it (no
thread of plait's is inside the store client when the interpreter tears down) and removes this
rank's keys.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time

import torch.distributed as dist

from plait.comm.stats import CommStats, OpRecord

EXIT_CODE = 3
_REQUESTS = "requests"
"""A counter: request n (1, 2, ...) is the key ``request/<n>``. Numbered, so two ranks that diagnose at
once do not overwrite each other's request, and each answers the other's while it waits for answers."""


def _describe(record: OpRecord | None) -> dict | None:
    if record is None:
        return None
    return {
        "seq": record.seq,
        "op": record.op,
        "group": record.group,
        "shape": list(record.shape),
        "dtype": record.dtype,
        "mib": record.nbytes / 2**20,
        "site": record.site,
        "pending": record.finished is None,
        "waited": time.perf_counter() - record.started,
    }


def _text(op: dict) -> str:
    return f"{op['op']} #{op['seq']} on {op['group']} {op['shape']} {op['dtype']} ({op['mib']:.2f} MiB) at {op['site']}"


class Watchdog:
    """Watches one rank's op log and its peers' heartbeats; on a hang, explains it and ends the process."""

    def __init__(
        self,
        stats: CommStats,
        rank: int,
        world_size: int,
        timeout_s: float,
        store: dist.Store,
        address: str = "?",
        poll_s: float = 1.0,
        silent_after_s: float = 10.0,
        store_lost_after_s: float = 10.0,
    ) -> None:
        self.stats = stats
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.store = store
        """This attempt's watchdog keys: a PrefixStore on a client of the job's store of its own."""
        self.address = address
        """host:port of that store, for the messages."""
        self.poll_s = poll_s
        self.silent_after_s = silent_after_s
        self.check_peers_after_s = min(5.0, timeout_s)
        self.store_lost_after_s = store_lost_after_s
        self._stop = threading.Event()
        self._seen_requests = 0
        """The number of the last request this rank has answered."""
        self._beats: dict[int, tuple[int, float]] = {}
        """Peer rank -> (its heartbeat count, when this rank saw that count first)."""
        self._store_lost_at: float | None = None
        self.thread = threading.Thread(target=self._run, name="plait-watchdog", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """End the thread, wait for it, and remove this rank's heartbeat (idempotent)."""
        self._stop.set()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(self.poll_s + 10.0)
        with contextlib.suppress(Exception):  # the store may already be gone at the end of a job
            self.store.delete_key(f"beat/{self.rank}")

    def _state(self) -> dict:
        pending = self._stuck_candidates()
        done = [r for r in self.stats.records() if r.finished is not None]
        return {"rank": self.rank, "pending": _describe(pending[0] if pending else None),
                "last_done": _describe(done[-1] if done else None)}  # fmt: skip

    def _stuck_candidates(self) -> list[OpRecord]:
        return [r for r in self.stats.pending() if r.blocking]

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._check()
            except Exception as e:  # any store error counts toward "the store is gone"
                if self._stop.is_set():
                    return
                self._store_failed(e)
            else:
                self._store_lost_at = None

    def _check(self) -> None:
        """One round: beat, answer any request, then judge this rank's oldest op in flight."""
        self.store.add(f"beat/{self.rank}", 1)
        self._answer_requests()
        pending = self._stuck_candidates()
        if not pending:
            return
        waited = time.perf_counter() - pending[0].started
        if waited > self.timeout_s:
            self._diagnose(pending[0], f"for {self.timeout_s:g} s")
        elif waited > self.check_peers_after_s:
            silent = self._silent_peers()
            if silent:
                self._diagnose(pending[0], f"for {waited:.0f} s", silent)

    def _store_failed(self, error: Exception) -> None:
        now = time.monotonic()
        self._store_lost_at = self._store_lost_at or now
        if now - self._store_lost_at < self.store_lost_after_s:
            return
        pending = self._stuck_candidates()
        where = f"waits in {_text(_describe(pending[0]))}" if pending else "is in no collective"
        self._exit(
            f"plait watchdog: rank {self.rank} cannot reach the job's store at {self.address} for "
            f"{now - self._store_lost_at:.0f} s ({error}); the node that hosts it (torchrun's agent on the "
            f"rendezvous node) is gone, so the job cannot go on. This rank {where}."
        )

    def _silent_peers(self) -> dict[int, float]:
        """Peers whose heartbeat has not moved for ``silent_after_s``: rank -> seconds silent."""
        now, silent = time.monotonic(), {}
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            key = f"beat/{rank}"
            count = int(self.store.get(key)) if self.store.check([key]) else -1
            seen = self._beats.get(rank)
            if seen is None or seen[0] != count:
                self._beats[rank] = (count, now)
            elif now - seen[1] >= self.silent_after_s:
                silent[rank] = now - seen[1]
        return silent

    def _answer_requests(self) -> None:
        """Answer every request made since the last call: this rank's state under ``<request>/rank<r>``."""
        count = int(self.store.add(_REQUESTS, 0))
        while self._seen_requests < count:
            key = f"request/{self._seen_requests + 1}"
            if not self.store.check([key]):  # numbered, not yet written: the next round answers it
                return
            request = self.store.get(key).decode()
            self.store.set(f"{request}/rank{self.rank}", json.dumps(self._state()))
            self._seen_requests += 1

    def _gather_states(self, stuck: OpRecord) -> tuple[dict[int, dict], str | None]:
        """Every rank's answer to a request about ``stuck`` (keys removed after); the store error, if any."""
        request = f"answers/{self.rank}-{stuck.seq}-{time.time():.0f}"
        states: dict[int, dict] = {}
        try:
            number = int(self.store.add(_REQUESTS, 1))
            self.store.set(f"request/{number}", request)
            deadline = time.monotonic() + max(3 * self.poll_s, 3.0)
            # stay until every answer is in and every request numbered so far is answered: a rank
            # asking at the same moment may have taken its number but not yet written its request,
            # and this rank (about to exit) would otherwise never answer it
            while time.monotonic() < deadline and (
                len(states) < self.world_size or self._seen_requests < int(self.store.add(_REQUESTS, 0))
            ):
                self._answer_requests()  # this one, and another rank's made at the same time
                for rank in range(self.world_size):
                    key = f"{request}/rank{rank}"
                    if rank not in states and self.store.check([key]):
                        states[rank] = json.loads(self.store.get(key))
                time.sleep(0.1)  # polling the store for answers; no rank waits on this one
            for rank in states:  # the answers go; the request stays, for a rank that reads it late
                self.store.delete_key(f"{request}/rank{rank}")
        except Exception as e:  # explain what is known without the store
            return states, str(e)
        return states, None

    def _diagnose(self, stuck: OpRecord, how_long: str, silent: dict[int, float] | None = None) -> None:
        silent = silent or {}
        states, store_error = self._gather_states(stuck)
        lines = [f"plait watchdog: rank {self.rank} waits in {_text(_describe(stuck))} {how_long}"]
        if store_error is not None:
            lines.append(f"  (the job's store failed while asking the other ranks: {store_error})")
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            if rank in silent:
                lines.append(
                    f"  rank {rank}: silent for {silent[rank]:.0f} s (its watchdog's heartbeat stopped): "
                    "the process is dead or frozen, or its host is down or cut off"
                )
            else:
                lines.append(f"  rank {rank}: {self._explain(stuck, states.get(rank))}")
        self._exit("\n".join(lines))

    def _exit(self, message: str) -> None:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)

    @staticmethod
    def _explain(stuck: OpRecord, state: dict | None) -> str:
        if state is None:
            return "did not answer (dead, or stuck outside plait's collectives)"
        pending, done = state["pending"], state["last_done"]
        if pending is not None:
            if pending["group"] == stuck.group and pending["seq"] == stuck.seq:
                same = pending["op"] == stuck.op and pending["shape"] == list(stuck.shape)
                verdict = (
                    "waiting too: the op matches, so look for a rank missing from the group"
                    if same
                    else "a different op"
                )
                return f"in {_text(pending)} ({verdict})"
            return f"in {_text(pending)} (pending {pending['waited']:.0f} s)"
        if done is None:
            return "has run no collective yet (behind)"
        if done["group"] == stuck.group and done["seq"] < stuck.seq:
            return f"last finished {_text(done)}; it never reached #{stuck.seq} (behind)"
        return f"last finished {_text(done)}; it is not in a collective"
