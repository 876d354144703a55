"""Asynchronous training: the parameter server and local SGD / DiLoCo.

Not the same updates as ddp by design, except at the synchronous ends: staleness 0 and period 1
(with SGD) must reproduce ddp exactly; otherwise they must converge, respect their staleness bound,
and fail by name, not hang, when a worker dies.
"""

import os
import time

import pytest
import torch

import plait
from tests.harness import RankFailure, run_ranks
from tests.reference import FP32, assert_matches_reference, distributed_run, reference_run

STEPS = 5


@pytest.mark.parametrize(
    ("world_size", "servers"),
    [(2, 0), (4, 0), (3, 1)],
    ids=["2-colocated", "4-colocated", "2-workers-1-server"],
)
def test_staleness_zero_is_ddp(world_size, servers):
    reference = reference_run(STEPS)
    results = run_ranks(distributed_run, world_size, plait.AsyncPS(staleness=0, servers=servers), STEPS)
    workers = results[: world_size - servers]
    for result in workers:
        assert_matches_reference(result, reference, **FP32)
    assert results[world_size - servers :] == [None] * servers  # dedicated servers end after the workers


@pytest.mark.parametrize("world_size", [2, 4])
def test_local_sgd_with_period_one_and_sgd_is_ddp(world_size):
    reference = reference_run(STEPS, optimizer="plain-sgd")
    results = run_ranks(distributed_run, world_size, plait.LocalSGD(period=1), STEPS, "plain-sgd")
    for result in results:
        assert_matches_reference(result, reference, **FP32)


def _regression(
    strategy: plait.Strategy, steps: int, slow_rank: int | None = None, die_at: int | None = None
) -> dict:
    """Linear regression y = X w* on each worker's own data; returns the distance to w* and the metrics."""
    ctx = plait.init()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1, bias=False)
    model, opt = plait.setup(model, strategy, lambda ps: plait.optim.SGD(ps, lr=0.05))
    target = torch.arange(1.0, 9.0).reshape(1, 8) / 8
    generator = torch.Generator().manual_seed(100 + ctx.rank)
    for step in range(steps):
        if die_at is not None and step == die_at and ctx.rank == slow_rank:
            os._exit(1)  # a worker crashes mid-training
        x = torch.randn(16, 8, generator=generator)
        loss = torch.nn.functional.mse_loss(model(x), x @ target.T)
        loss.backward()
        if slow_rank == ctx.rank:
            time.sleep(0.02)  # a straggler: its steps take several times as long
        opt.step()
        opt.zero_grad()
    runtime = model.plait_runtime
    return {
        "distance": float((model.weight.detach() - target).norm()),
        "metrics": runtime.metrics(),
    }


def test_async_sgd_converges_on_linear_regression():
    """Fully asynchronous (no staleness bound): within 0.05 of the optimum after 150 steps per worker."""
    results = run_ranks(_regression, 3, plait.AsyncPS(staleness=None), 150)
    for result in results:
        assert result["distance"] < 0.05, result


@pytest.mark.parametrize("staleness", [1, 2])
def test_observed_staleness_never_exceeds_the_bound(staleness):
    """Rank 2 is a straggler; the servers count how far ahead each released worker is: never more than s."""
    results = run_ranks(_regression, 3, plait.AsyncPS(staleness=staleness), 40, 2)
    seen = {}
    for result in results:
        for lead, count in result["metrics"]["staleness_histogram"].items():
            seen[int(lead)] = seen.get(int(lead), 0) + count
    assert max(seen) <= staleness, seen
    assert max(seen) == staleness, f"the straggler should push the fast workers to the bound: {seen}"
    for result in results:
        assert result["distance"] < 0.5


def test_unbounded_staleness_runs_ahead_of_a_straggler():
    results = run_ranks(_regression, 3, plait.AsyncPS(staleness=None), 40, 2)
    leads = {int(k) for r in results for k in r["metrics"]["staleness_histogram"]}
    assert max(leads) > 2, leads


def test_a_dead_worker_is_named_instead_of_a_hang():
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(_regression, 3, plait.AsyncPS(staleness=0, timeout_s=5), 50, 2, 5, timeout=60)
    text = str(info.value)
    assert "rank 2: died" in text
    assert "worker rank 2" in text  # the survivors say whom they lost
    assert time.monotonic() - start < 45


def test_local_sgd_and_diloco_converge():
    for strategy in (plait.LocalSGD(period=4), plait.LocalSGD(period=4, outer="nesterov", outer_lr=0.7)):
        results = run_ranks(_regression, 2, strategy, 120)
        for result in results:
            assert result["distance"] < 0.05, (strategy, result)
            assert result["metrics"]["synchronizations"] == 30


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(staleness=-1), "staleness=-1"),
        (dict(servers=-2), "servers=-2"),
        (dict(timeout_s=0), "timeout_s=0"),
    ],
)
def test_bad_async_arguments(kwargs, fragment):
    with pytest.raises(plait.ConfigError, match=fragment):
        plait.AsyncPS(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "fragment"), [(dict(period=0), "period=0"), (dict(outer="adam"), "outer='adam'")]
)
def test_bad_local_sgd_arguments(kwargs, fragment):
    with pytest.raises(plait.ConfigError, match=fragment):
        plait.LocalSGD(**kwargs)
