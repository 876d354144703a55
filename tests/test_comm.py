"""The comm layer: collectives give the right values, and count bytes and ops as documented."""

import os
import subprocess
import sys

import pytest
import torch

import plait
from plait.comm import bus_bytes
from plait.launch import LaunchConfig, torchrun_argv
from tests.harness import run_ranks


def _collectives() -> dict:
    ctx = plait.init()
    n, r = ctx.world_size, ctx.rank
    g = ctx.world
    out = {}

    t = torch.full((8,), float(r + 1))
    g.all_reduce(t)
    out["all_reduce"] = t.tolist()
    t = torch.full((8,), float(r + 1))
    g.all_reduce(t, op="avg")
    out["avg"] = t.tolist()

    full = torch.arange(4.0 * n) + r  # rank r contributes arange + r
    shard = torch.zeros(4)
    g.reduce_scatter(shard, full)
    out["reduce_scatter"] = shard.tolist()

    gathered = torch.zeros(3 * n)
    g.all_gather(gathered, torch.full((3,), float(r)))
    out["all_gather"] = gathered.tolist()

    b = torch.full((5,), float(r))
    g.broadcast(b, src=n - 1)
    out["broadcast"] = b.tolist()

    # async with a completion callback, then point to point around a ring, then receive from anyone
    seen = []
    handle = g.all_reduce(torch.ones(2), async_op=True).then(lambda: seen.append("done"))
    assert ctx.stats.pending(), "an async op is pending until waited"
    handle.wait()
    out["then"] = seen
    if n > 1:
        right, left = (r + 1) % n, (r - 1) % n
        send = g.send(torch.full((2,), float(r)), right, async_op=True)
        got = torch.zeros(2)
        g.recv(got, left)
        send.wait()
        out["ring"] = got.tolist()

    out["totals"] = {op: (t.calls, t.bytes_sent, t.bytes_received) for op, t in ctx.stats.totals.items()}
    out["log"] = [(rec.seq, rec.op, rec.shape, rec.dtype, rec.group) for rec in ctx.stats.log]
    out["pending"] = len(ctx.stats.pending())
    out["site"] = ctx.stats.log[0].site
    return out


@pytest.mark.parametrize("n", [2, 4])
def test_collectives_values_and_accounting(n):
    results = run_ranks(_collectives, n)
    total = n * (n + 1) / 2
    for r, out in enumerate(results):
        assert out["all_reduce"] == [total] * 8
        assert out["avg"] == pytest.approx([total / n] * 8)
        expected = [sum(float(i) + k for k in range(n)) for i in range(4 * r, 4 * r + 4)]
        assert out["reduce_scatter"] == expected
        assert out["all_gather"] == [float(k) for k in range(n) for _ in range(3)]
        assert out["broadcast"] == [float(n - 1)] * 5
        assert out["then"] == ["done"]
        assert out["ring"] == [float((r - 1) % n)] * 2
        totals = out["totals"]
        assert totals["all_reduce"] == (
            3,
            2 * bus_bytes("all_reduce", 32, n) + bus_bytes("all_reduce", 8, n),
            0,
        )
        assert totals["reduce_scatter"] == (1, (n - 1) * 16 * n // n, 0)
        assert totals["all_gather"] == (1, (n - 1) * 12 * n // n, 0)
        assert totals["broadcast"] == (1, 20 if r == n - 1 else 0, 0 if r == n - 1 else 20)
        assert totals["send"] == (1, 8, 0) and totals["recv"] == (1, 0, 8)
        ops = [entry[1] for entry in out["log"]]
        assert ops == [
            "all_reduce",
            "all_reduce",
            "reduce_scatter",
            "all_gather",
            "broadcast",
            "all_reduce",
            "send",
            "recv",
        ]
        assert [entry[0] for entry in out["log"]] == list(range(8))  # one sequence per group
        assert out["log"][2][2] == (4 * n,) and out["log"][0][3] == "float32" and out["log"][0][4] == "world"
        assert out["pending"] == 0
        assert out["site"].startswith("test_comm.py:")  # where the op was asked for, not inside plait.comm


def test_bus_bytes_convention():
    assert bus_bytes("all_reduce", 1000, 4) == 1500
    assert bus_bytes("reduce_scatter", 1000, 4) == 750
    assert bus_bytes("all_gather", 1000, 4) == 750
    assert bus_bytes("all_reduce", 1000, 1) == 0


def _clean_env() -> dict:
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }


def test_world_of_one_needs_no_environment():
    code = (
        "import torch, plait; ctx = plait.init(); t = torch.ones(3); ctx.world.all_reduce(t);"
        "print(ctx.world_size, ctx.rank, ctx.backend, t.tolist(), plait.init() is ctx)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_clean_env(), timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1 0 gloo [1.0, 1.0, 1.0] True"


def test_half_a_torchrun_environment_is_a_config_error():
    code = "import plait; plait.init()"
    env = {**_clean_env(), "RANK": "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode != 0 and "ConfigError: RANK=0 but WORLD_SIZE=None" in done.stderr


def test_torchrun_flags_pass_through():
    single = torchrun_argv(LaunchConfig(nproc=2), "train.py", ["--x", "1"])
    assert single == [
        "--nproc-per-node=2",
        "--nnodes=1",
        "--max-restarts=0",
        "--standalone",
        "train.py",
        "--x",
        "1",
    ]
    multi = torchrun_argv(
        LaunchConfig(
            nproc=8,
            nnodes="2",
            node_rank=1,
            rdzv_endpoint="host:29500",
            rdzv_id="job-7f3a9c1e2b4d",
            max_restarts=3,
        ),
        "m",
        [],
        module=True,
    )
    assert multi == [
        "--nproc-per-node=8",
        "--nnodes=2",
        "--max-restarts=3",
        "--rdzv-endpoint=host:29500",
        "--rdzv-backend=c10d",
        "--rdzv-id=job-7f3a9c1e2b4d",
        "--node-rank=1",
        "--module",
        "m",
    ]
    with pytest.raises(plait.ConfigError, match="rdzv-endpoint"):
        torchrun_argv(LaunchConfig(nproc=2, nnodes="2"), "train.py", [])


def test_multi_node_jobs_need_an_unguessable_rendezvous_id():
    no_id = LaunchConfig(nproc=1, nnodes="1:2", rdzv_endpoint="hosta:29500")
    with pytest.raises(plait.ConfigError, match=r"needs --rdzv-id.*e\.g\. --rdzv-id [0-9a-f]{32}$"):
        torchrun_argv(no_id, "train.py", [])
    for guessable in ["none", "job1", "a" * 15, "bad id with spaces!"]:
        with pytest.raises(plait.ConfigError, match=r"guessable or malformed.*--rdzv-id [0-9a-f]{32}$"):
            LaunchConfig(nnodes="2", rdzv_endpoint="hosta:29500", rdzv_id=guessable)
    with pytest.raises(plait.ConfigError, match="nproc=0"):
        LaunchConfig(nproc=0)


def test_thread_seconds_count_only_the_calling_threads_ops():
    """A straggler's busy time is its step less its own waits: a colocated server thread's receives,
    which overlap the worker's compute, are in the totals but not in the worker thread's seconds."""
    import threading

    from plait.comm.stats import CommStats

    stats = CommStats()
    stats.account("send", 10, 0, 2.0)
    server = threading.Thread(target=stats.account, args=("recv", 0, 10, 5.0))
    server.start()
    server.join()
    assert stats.thread_seconds() == 2.0 and stats.seconds == 7.0
