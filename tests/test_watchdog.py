"""Hang diagnosis and replica checks: a stuck collective, a silent peer or a lost store is explained, not a silent hang."""

import datetime
import re
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

import plait
from plait.comm.context import attempt_prefix
from plait.comm.stats import CommStats
from plait.comm.watchdog import Watchdog
from plait.metrics import read_metrics
from plait.train import Trainer
from plait.train.config import build
from tests.harness import RankFailure, run_ranks
from tests.reference import make_model


def _rank_0_skips_a_collective() -> None:
    ctx = plait.init()
    ctx.world.all_reduce(torch.ones(4))  # #0: everyone
    if ctx.rank == 0:
        ctx.world.all_gather(torch.zeros(4), torch.ones(2))  # #1 on rank 0 is another op and shape
    else:
        ctx.world.all_reduce(torch.ones(256))  # #1 on rank 1


def test_a_rank_that_skips_a_collective_is_named():
    with pytest.raises(RankFailure) as info:
        run_ranks(_rank_0_skips_a_collective, 2, timeout=60, env={"PLAIT_WATCHDOG_S": "3"})
    text = str(info.value)
    # whichever rank's watchdog fires first explains both sides, then ends its process with code 3
    gather, reduce = "all_gather #1 on world [4] float32", "all_reduce #1 on world [256] float32"
    assert (f"plait watchdog: rank 1 waits in {reduce}" in text and f"rank 0: in {gather}" in text) or (
        f"plait watchdog: rank 0 waits in {gather}" in text and f"rank 1: in {reduce}" in text
    ), text
    assert "(a different op)" in text and "test_watchdog.py:" in text  # the call site of each op
    assert "exited with code 3" in text


def _rank_1_stays_behind() -> None:
    ctx = plait.init()
    if ctx.rank == 0:
        ctx.world.all_reduce(torch.ones(4))
    else:
        ctx.world.recv(torch.zeros(1), src=0)  # waits for a message rank 0 never sends


def test_a_rank_stuck_elsewhere_is_reported_behind():
    with pytest.raises(RankFailure) as info:
        run_ranks(_rank_1_stays_behind, 2, timeout=60, env={"PLAIT_WATCHDOG_S": "3"})
    text = str(info.value)
    assert ("plait watchdog: rank 0 waits in all_reduce #0" in text and "rank 1: in recv #0" in text) or (
        "plait watchdog: rank 1 waits in recv #0" in text and "rank 0: in all_reduce #0" in text
    ), text


def _drift(strategy: str) -> str:
    ctx = plait.init()
    model, _ = plait.setup(make_model(), strategy, lambda ps: plait.optim.SGD(ps, lr=0.1))
    plait.check_replicas(model)  # equal after setup
    if ctx.rank == 1:
        with torch.no_grad():
            model.transformer.h[1].mlp.c_fc.weight[0, 0] += 1e-3
    try:
        plait.check_replicas(model)
    except plait.DesyncError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("strategy", ["ddp", "zero1"])
def test_desync_check_names_the_tensor_and_rank(strategy):
    for message in run_ranks(_drift, 2, strategy):
        assert "'transformer.h.1.mlp.c_fc.weight' on rank(s) [1]" in message


def _rank_1_goes_silent() -> None:
    ctx = plait.init()
    ctx.world.all_reduce(torch.ones(4))
    if ctx.rank == 1:
        ctx.watchdog.stop()  # from now on it looks like a frozen process or a host cut off
        ctx.world.recv(torch.zeros(1), src=0)  # never sent: rank 0 waits in all_reduce #1 meanwhile
    else:
        ctx.world.all_reduce(torch.ones(4))


def test_a_silent_peer_is_named_long_before_the_limit():
    # the limit is 60 s and the harness gives up at 45 s: only the heartbeat check can end it in time
    with pytest.raises(RankFailure) as info:
        run_ranks(_rank_1_goes_silent, 2, timeout=45, env={"PLAIT_WATCHDOG_S": "60"})
    text = str(info.value)
    assert "plait watchdog: rank 0 waits in all_reduce #1 on world [4] float32" in text, text
    assert "rank 1: silent for" in text and "heartbeat stopped" in text
    assert "rank 0: died" in text and "exited with code 3" in text


def _the_store_goes_away() -> str:
    """Both ranks' watchdogs on a store in a child process; it is killed while both wait in an op."""
    ctx = plait.init()
    port = torch.zeros(1, dtype=torch.int64)
    if ctx.rank == 0:
        code = (
            "import sys, torch.distributed as d; s = d.TCPStore('127.0.0.1', 0, 2, True, wait_for_workers=False);"
            "print(s.port, flush=True); sys.stdin.read()"
        )
        host = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        port[0] = int(host.stdout.readline())
    ctx.world.broadcast(port, src=0)
    client = dist.TCPStore("127.0.0.1", int(port), 2, False, datetime.timedelta(seconds=2))
    store = dist.PrefixStore(attempt_prefix() + "watchdog/", client)
    Watchdog(ctx.stats, ctx.rank, 2, 60.0, store, f"127.0.0.1:{int(port)}")
    ctx.world.all_reduce(torch.ones(1))  # both watchdogs are up
    if ctx.rank == 0:
        host.kill()
        host.wait()
        ctx.world.all_reduce(torch.ones(2))  # rank 1 never joins this one
    else:
        ctx.world.recv(torch.zeros(1), src=0)


def test_a_lost_store_is_diagnosed_and_ends_the_job():
    with pytest.raises(RankFailure) as info:
        run_ranks(_the_store_goes_away, 2, timeout=45, env={"PLAIT_WATCHDOG_S": "60"})
    text = str(info.value)
    # Whichever rank notices first ends its process; the other may then see gloo's "connection
    # closed" before its own watchdog speaks. Either way one rank names the store and its wait.
    waits = {
        "0": "This rank waits in all_reduce #2 on world [2] float32",
        "1": "This rank waits in recv #2 on world [1]",
    }
    named = re.findall(r"plait watchdog: rank (\d) cannot reach the job's store at 127\.0\.0\.1:", text)
    assert named, text
    assert any(waits[rank] in text for rank in named), text
    assert "exited with code 3" in text


def _async_with_a_straggler(run_dir: str) -> list[float]:
    values = {
        "model": {"model": "gpt-tiny", "n_layer": 2, "n_embd": 64, "block_size": 32},
        "data": {"data": "synthetic", "synthetic_tokens": 20_000},
        "train": {"strategy": "async", "steps": 60, "batch_size": 8, "micro_batch": 4, "eval_every": 0, "progress": False,
                  "slow_rank": 1, "slow_factor": 4.0, "run_dir": run_dir},
        "strategy": {"staleness": 1},
    }  # fmt: skip
    Trainer(build(values)).fit()
    return [r["loss"] for r in read_metrics(run_dir, "step") if r["rank"] == plait.current().rank]


def test_no_false_alarm_in_an_async_run_with_a_straggler(tmp_path):
    """A 1 s limit, a 4x straggler, a run of several seconds: sends that completed must not count as stuck.

    Staleness 1 keeps every real wait within about one straggler step (~0.1 s; fully asynchronous,
    the fast worker would wait most of the run for the straggler at the end, a real wait). Before
    the fix the first push send stayed "pending" in the op log and the watchdog fired after 1 s.
    """
    losses = run_ranks(_async_with_a_straggler, 2, str(tmp_path), timeout=120, env={"PLAIT_WATCHDOG_S": "1"})
    assert all(len(rank_losses) == 60 for rank_losses in losses)


def _ops_that_nobody_waits_for() -> None:
    ctx = plait.init()
    polled = ctx.world.all_reduce(torch.ones(4), async_op=True)
    while not polled.poll():  # as bucketed gradients are finished: poll, then no wait
        pass
    tracked = [ctx.world.send(torch.ones(4), dst=1 - ctx.rank, async_op=True)]  # as the parameter server does
    ctx.world.recv(torch.zeros(4), src=1 - ctx.rank)
    time.sleep(3)  # a long step with nothing waited on: three watchdog limits
    ctx.world.all_reduce(torch.ones(1))
    tracked.clear()


def test_ops_that_nobody_waits_for_are_not_stuck():
    run_ranks(_ops_that_nobody_waits_for, 2, timeout=60, env={"PLAIT_WATCHDOG_S": "1"})


def test_two_ranks_that_diagnose_at_once_answer_each_other():
    """Both watchdogs ask at the same moment (as when both ranks' ops pass the limit together): each
    must still get the other's state, where one shared request key let the second ask overwrite the first."""
    store = dist.HashStore()
    dogs, stuck = [], []
    for rank, op in enumerate(["all_gather", "all_reduce"]):
        stats = CommStats()
        record = stats.begin(op, "world", (4,), "float32", 16)
        record.blocking = True
        dogs.append(Watchdog(stats, rank, 2, 3600.0, store, poll_s=3600.0))  # its own thread stays idle
        stuck.append(record)
    barrier = threading.Barrier(2)
    states: list[dict] = [{}, {}]

    def diagnose(rank: int) -> None:
        barrier.wait()
        states[rank], _ = dogs[rank]._gather_states(stuck[rank])

    threads = [threading.Thread(target=diagnose, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for dog in dogs:
        dog.stop()
    assert states[0][1]["pending"]["op"] == "all_reduce", states[0]
    assert states[1][0]["pending"]["op"] == "all_gather", states[1]
