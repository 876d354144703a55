"""Hang diagnosis: a collective that does not finish in time is explained, then the job fails.

A daemon thread looks at this rank's op log (``CommStats``) once a second. When the oldest op still
in flight has waited longer than ``timeout_s``, it asks every rank, through the rendezvous store
(not a collective: those are what hangs), for the ops each is in or last finished, waits a few
seconds for the answers, prints what it learned and ends the process with exit code 3:

    plait watchdog: rank 1 waits in all_reduce #42 on world [1024] float32 (0.00 MiB) at train.py:88 for 10 s
      rank 0: in all_gather #42 on world [2048] float32 (0.01 MiB) at zero.py:118 (a different op)
      rank 2: last finished all_reduce #41; it never reached #42 (behind)

Every rank's watchdog thread also answers such requests, even when its own collectives are fine,
so a rank that skipped a collective shows where it went instead.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import threading
import time

import torch.distributed as dist

from plait.comm.stats import CommStats, OpRecord

EXIT_CODE = 3
_REQUEST = "plait/watchdog/request"


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
    """Watches one rank's op log; on a stuck op, gathers every rank's state and fails loudly."""

    def __init__(
        self, stats: CommStats, rank: int, world_size: int, timeout_s: float, poll_s: float = 1.0
    ) -> None:
        self.stats = stats
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            world_size,
            is_master=False,
            timeout=datetime.timedelta(seconds=30),
            wait_for_workers=False,
        )
        self._stop = threading.Event()
        self._answered = set()
        self.thread = threading.Thread(target=self._run, name="plait-watchdog", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _state(self) -> dict:
        pending = self.stats.pending()
        done = [r for r in self.stats.records() if r.finished is not None]
        return {"rank": self.rank, "pending": _describe(pending[0] if pending else None),
                "last_done": _describe(done[-1] if done else None)}  # fmt: skip

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._answer_requests()
                pending = self.stats.pending()
                if pending and time.perf_counter() - pending[0].started > self.timeout_s:
                    self._diagnose(pending[0])
            except Exception:  # the store going away at shutdown must not kill the process
                if self._stop.is_set():
                    return

    def _answer_requests(self) -> None:
        if not self.store.check([_REQUEST]):
            return
        request = self.store.get(_REQUEST).decode()
        if request not in self._answered:
            self._answered.add(request)
            self.store.set(f"plait/watchdog/{request}/rank{self.rank}", json.dumps(self._state()))

    def _diagnose(self, stuck: OpRecord) -> None:
        request = f"{self.rank}-{stuck.seq}-{time.time():.0f}"
        self.store.set(_REQUEST, request)
        self._answer_requests()
        deadline = time.monotonic() + max(3 * self.poll_s, 3.0)
        states = {}
        while time.monotonic() < deadline and len(states) < self.world_size:
            for rank in range(self.world_size):
                key = f"plait/watchdog/{request}/rank{rank}"
                if rank not in states and self.store.check([key]):
                    states[rank] = json.loads(self.store.get(key))
            time.sleep(0.1)  # polling the store for answers; no rank waits on this one
        lines = [
            f"plait watchdog: rank {self.rank} waits in {_text(_describe(stuck))} for {self.timeout_s:g} s"
        ]
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            lines.append(f"  rank {rank}: {self._explain(stuck, states.get(rank))}")
        sys.stderr.write("\n".join(lines) + "\n")
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
