"""Every reduce-scatter / all-gather algorithm gives the native op's values; the choice is measured and agreed."""

import os
import subprocess
import sys

import pytest
import torch

import plait
from plait.comm.algorithms import (
    ALL_GATHER,
    REDUCE_SCATTER,
    AlgorithmTable,
    pick,
    pinned_from_env,
    size_class,
)
from tests.harness import run_ranks


def _every_algorithm(dtype_name: str) -> dict:
    ctx = plait.init()
    n, r = ctx.world_size, ctx.rank
    dtype = getattr(torch, dtype_name)
    out = {}
    for algorithm in REDUCE_SCATTER:
        ctx.world.algorithms = AlgorithmTable(pinned={"reduce_scatter": algorithm})
        full = (torch.arange(6.0 * n) * (r + 1)).to(dtype)
        shard = torch.zeros(6, dtype=dtype)
        ctx.world.reduce_scatter(shard, full, op="avg")
        out[("rs", algorithm)] = shard.float().clone()
        handle = ctx.world.reduce_scatter(shard, full, op="sum", async_op=True)
        handle.wait()
        out[("rs-async", algorithm)] = shard.float()
        noisy = _noise(r, 64 * n).to(dtype)  # cancellations and magnitudes real gradients have
        average = torch.zeros(64, dtype=dtype)
        ctx.world.reduce_scatter(average, noisy, op="avg")
        out[("rs-noisy", algorithm)] = average.float()
        inside = _noise(r, 64 * n).to(dtype)  # the result written over this rank's own chunk of the input
        ctx.world.reduce_scatter(inside[64 * r : 64 * r + 64], inside, op="avg")
        out[("rs-inplace", algorithm)] = inside[64 * r : 64 * r + 64].float()
    for algorithm in ALL_GATHER:
        ctx.world.algorithms = AlgorithmTable(pinned={"all_gather": algorithm})
        gathered = torch.zeros(5 * n, dtype=dtype)
        ctx.world.all_gather(gathered, torch.full((5,), float(r + 1), dtype=dtype))
        out[("ag", algorithm)] = gathered.float()
        inplace = torch.zeros(5 * n, dtype=dtype)
        inplace[5 * r : 5 * r + 5] = r + 1
        ctx.world.all_gather(inplace, inplace[5 * r : 5 * r + 5])  # input inside output, as ZeRO-3 does
        out[("ag-inplace", algorithm)] = inplace.float()
    ctx.world.algorithms = AlgorithmTable(pinned={})
    ctx.world.calibrate("reduce_scatter", torch.float32, 2**20)
    ctx.world.calibrate("all_gather", torch.float32, 2**20)
    out["idle scratch"] = sum(t.numel() for t in ctx.world.scratch.idle())
    out["chosen"] = (
        ctx.world.algorithms.choose("reduce_scatter", torch.float32, 2**20),
        ctx.world.algorithms.choose("all_gather", torch.float32, 2**20),
    )
    return out


def _noise(rank: int, numel: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(rank)) * 10.0 ** torch.randint(
        -6, 3, (numel,), generator=torch.Generator().manual_seed(100 + rank)
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n", [2, 4])
def test_every_algorithm_matches_the_definition(n, dtype):
    results = run_ranks(_every_algorithm, n, dtype)
    scale = sum(k + 1 for k in range(n))
    for r, out in enumerate(results):
        expected_sum = torch.arange(6.0 * r, 6.0 * r + 6) * scale
        for algorithm in REDUCE_SCATTER:
            torch.testing.assert_close(out[("rs", algorithm)], expected_sum / n, rtol=1e-2, atol=1e-2)
            torch.testing.assert_close(out[("rs-async", algorithm)], expected_sum, rtol=1e-2, atol=1e-2)
        exact = torch.stack([_noise(k, 64 * n).to(getattr(torch, dtype)).double() for k in range(n)]).mean(0)
        exact = exact[64 * r : 64 * r + 64]
        for algorithm in REDUCE_SCATTER:  # within one rounding of the larger input
            error = (out[("rs-noisy", algorithm)].double() - exact).abs()
            ulp = torch.finfo(getattr(torch, dtype)).eps * torch.stack(
                [_noise(k, 64 * n)[64 * r : 64 * r + 64].double().abs() for k in range(n)]
            ).amax(0)
            assert (error <= ulp).all(), (algorithm, (error / ulp).max())
        if n == 2:  # every algorithm rounds alike, so the measured choice never changes a run's bits
            assert all(torch.equal(out[("rs-noisy", a)], out[("rs-noisy", "native")]) for a in REDUCE_SCATTER)
        for algorithm in REDUCE_SCATTER:
            torch.testing.assert_close(
                out[("rs-inplace", algorithm)], out[("rs-noisy", algorithm)], rtol=0, atol=0
            )
        expected_gather = torch.tensor([float(k + 1) for k in range(n) for _ in range(5)])
        for algorithm in ALL_GATHER:
            assert torch.equal(out[("ag", algorithm)], expected_gather), algorithm
            assert torch.equal(out[("ag-inplace", algorithm)], expected_gather), algorithm
    assert all(out["idle scratch"] == 0 for out in results)  # the losers' scratch does not stay resident
    assert len({out["chosen"] for out in results}) == 1  # rank 0's measurement decides for everyone
    assert results[0]["chosen"][0] in REDUCE_SCATTER and results[0]["chosen"][1] in ALL_GATHER


def test_near_ties_go_to_the_preferred_algorithm():
    """A clear winner wins; within 10% of it, p2p before all-to-all before gloo's own op."""
    assert pick({"native": 0.5, "all_to_all": 1.6, "p2p": 2.4}) == "p2p"
    assert pick({"native": 0.55, "all_to_all": 0.68, "p2p": 0.65}) == "p2p"  # a near tie, measured here
    assert pick({"native": 1.15, "all_to_all": 1.37, "p2p": 1.21}) == "all_to_all"  # p2p 12% behind
    assert pick({"native": 2.0, "all_to_all": 1.0, "p2p": 1.0}) == "native"
    assert pick({"native": 1.0, "all_to_all": 0.95, "p2p": 0.5}) == "all_to_all"


def test_pinning_and_size_classes(monkeypatch):
    monkeypatch.setenv("PLAIT_COLLECTIVES", "reduce_scatter=p2p, all_gather=native")
    assert pinned_from_env() == {"reduce_scatter": "p2p", "all_gather": "native"}
    assert AlgorithmTable().choose("reduce_scatter", torch.float32, 123) == "p2p"
    monkeypatch.setenv("PLAIT_COLLECTIVES", "reduce_scatter=telepathy")
    with pytest.raises(plait.ConfigError, match="telepathy"):
        pinned_from_env()
    assert size_class(1) == size_class(65536) == 65536
    assert size_class(65537) == 262144 and size_class(2**20) == 2**20


def test_plait_bench_comm_prints_the_table():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "plait.cli",
            "bench",
            "--comm",
            "--nproc",
            "2",
            "--sizes-mb",
            "0.25",
            "--dtypes",
            "fp32",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for word in ("reduce_scatter", "all_gather", "native", "all_to_all", "p2p", "chosen"):
        assert word in done.stdout
