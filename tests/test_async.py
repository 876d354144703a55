"""Asynchronous training: the parameter server and local SGD / DiLoCo.

Not the same updates as ddp by design, except at the synchronous ends: staleness 0 and period 1
(with SGD) must reproduce ddp exactly; otherwise they must converge, respect their staleness bound,
and fail by name, not hang, when a worker dies.
"""

import os
import re
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


@pytest.mark.parametrize("world_size", [2, 4])
def test_diloco_at_period_one_with_the_derived_outer_settings_is_ddp(world_size):
    """The rule gives H=1 outer lr 1 and no momentum: the outer step lands on the average, so this is ddp."""
    reference = reference_run(STEPS, optimizer="plain-sgd")
    strategy = plait.LocalSGD(period=1, outer="nesterov")
    results = run_ranks(distributed_run, world_size, strategy, STEPS, "plain-sgd")
    for result in results:
        assert_matches_reference(result, reference, **FP32)


def test_diloco_outer_settings_follow_the_period():
    """Local SGD's (1, 0) at H=1, the paper's (0.7, 0.9) from H=128 on; below, a unit steady-state gain."""
    from plait.strategies.local_sgd import outer_settings_for

    assert outer_settings_for(1) == (1.0, 0.0)
    assert outer_settings_for(128) == outer_settings_for(500) == (0.7, 0.9)
    momenta = [outer_settings_for(h)[1] for h in (4, 8, 16, 32, 64)]
    assert momenta == sorted(momenta) and momenta[0] > 0 and momenta[-1] < 0.9
    for period in (4, 8, 16, 32, 64):
        lr, momentum = outer_settings_for(period)
        assert lr / (1 - momentum) == pytest.approx(1.0)
    assert plait.LocalSGD(period=8, outer="nesterov", outer_lr=0.5).outer_settings() == (
        0.5,
        outer_settings_for(8)[1],
    )


def _regression(
    strategy: plait.Strategy,
    steps: int,
    slow_rank: int | None = None,
    die_at: int | None = None,
    final: bool = False,
) -> dict:
    """Linear regression y = X w* on each worker's own data; returns the distance to w* and the metrics
    (and, with ``final``, the weights after ``final_parameters``)."""
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
    if final:
        runtime.final_parameters()
    return {
        "distance": float((model.weight.detach() - target).norm()),
        "metrics": runtime.metrics(),
        "weight": model.weight.detach().flatten().tolist(),
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


@pytest.mark.parametrize("servers", [0, 1], ids=["colocated", "dedicated"])
def test_every_worker_ends_with_the_servers_final_parameters(servers):
    """The straggler (rank 1) pushes long after the fast workers' last replies: their replicas miss its
    last steps until ``final_parameters`` installs the servers' final state, the same in every worker."""
    strategy = plait.AsyncPS(staleness=None, servers=servers)
    results = run_ranks(_regression, 3, strategy, 20, 1, None, True)
    weights = [r["weight"] for r in results[: 3 - servers]]
    assert all(w == weights[0] for w in weights), weights


def test_a_dead_worker_is_named_instead_of_a_hang():
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(_regression, 3, plait.AsyncPS(staleness=0, timeout_s=5), 50, 2, 5, timeout=60)
    text = str(info.value)
    assert "rank 2: died" in text
    # the survivors say whom they lost: rank 2 was both a worker and a (colocated) server, and which
    # of the two a survivor notices first is a race
    survivors = text.split("--- rank 2: died")[0]
    assert re.search(r"(worker|server) rank 2\b", survivors), survivors
    assert time.monotonic() - start < 45


def _fit_with_a_straggler(run_dir: str) -> dict:
    """The trainer, 3 workers, rank 2 30x slow; then what this rank's colocated server knows."""
    from plait.train import Trainer
    from plait.train.config import build

    values = {
        "model": {"model": "gpt-tiny", "n_layer": 1, "n_embd": 32, "block_size": 16},
        "data": {"data": "synthetic", "synthetic_tokens": 20_000},
        "optim": {"warmup_steps": 1},
        "train": {
            "strategy": "async", "steps": 12, "batch_size": 6, "micro_batch": 2, "eval_every": 0,
            "progress": False, "run_dir": run_dir, "slow_rank": 2, "slow_factor": 30,
        },
        "strategy": {"timeout_s": 5.0},
    }  # fmt: skip
    trainer = Trainer(build(values))
    trainer.fit()
    runtime = trainer.runtime
    # the server thread ends once every other worker has said it is done
    runtime._server_thread.join(timeout=20)
    return {"serving": runtime._server_thread.is_alive(), "active": sorted(runtime.server.shard.active)}


def test_a_straggler_finishes_after_the_others_have_stopped_pushing(tmp_path):
    """Finished workers wait in the trainer's closing collective for the straggler: they must have told the
    servers by then, or the straggler's server takes them for silent after timeout_s (the 4x-slow race's job
    ended with exit 1 so: "Application timeout caused pair closure"). When fit returns, no server still
    expects a push."""
    results = run_ranks(_fit_with_a_straggler, 3, str(tmp_path / "run"), timeout=90)
    assert results == [{"serving": False, "active": []}] * 3


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
        (dict(sync_steps=-1), "sync_steps=-1"),
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


# -- the server's update rules on a tiny problem (one shard, no processes) ------------------------


def _shard(workers: int, optimizer: str = "sgd", **kwargs):
    """A shard of 4 parameters served to ``workers`` workers, and a way to push at it."""
    from plait.strategies.async_ps.server import Shard
    from plait.strategies.master import GroupRun, MasterWeights

    start = torch.tensor([1.0, -2.0, 0.5, 3.0])
    param = torch.nn.Parameter(start.clone())
    make = {"sgd": plait.optim.SGD, "adamw": plait.optim.AdamW}[optimizer]
    master = MasterWeights([GroupRun(4, 0)], make([param], lr=0.1), torch.device("cpu"), group=None)
    master.data.copy_(start)
    shard = Shard(master, list(range(workers)), plait.AsyncPS(**{"sync_steps": 0, **kwargs}))
    sent = {}

    def push(worker: int, grad: list[float]) -> None:
        def reply() -> None:
            sent[worker] = shard.read(worker)[0].clone()

        shard.push(worker, torch.tensor(grad), [0.1], reply)

    return shard, push, sent


def _adamw_replay(start: torch.Tensor, steps: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """torch.optim.AdamW (plait.optim.AdamW's defaults) from ``start`` through (gradient, lr) steps."""
    p = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.AdamW([p], lr=0.1, weight_decay=0.01)
    for grad, lr in steps:
        p.grad = grad.clone()
        optimizer.param_groups[0]["lr"] = lr
        optimizer.step()
    return p.detach()


GRADS = [[0.1, 0.2, -0.3, 0.4], [0.5, -0.1, 0.2, 0.0], [-0.2, 0.3, 0.1, 0.1], [0.3, 0.3, 0.3, -0.6]]


def test_accumulate_steps_once_per_n_pushes_on_their_mean():
    """AdamW is scale invariant: N pushes must make one step on their mean gradient, not N steps."""
    shard, push, _ = _shard(4, "adamw")
    start = shard.master.data.clone()
    for worker in range(3):
        push(worker, GRADS[worker])
    assert shard.version == 0 and torch.equal(shard.master.data, start)
    push(3, GRADS[3])
    assert shard.version == 1
    expected = _adamw_replay(start, [(torch.tensor(GRADS).mean(0), 0.1)])
    torch.testing.assert_close(shard.master.data, expected, rtol=1e-6, atol=1e-7)


def test_scale_steps_every_push_at_lr_over_n():
    shard, push, _ = _shard(4, "sgd", update="scale", compensation="none")
    start = shard.master.data.clone()
    push(0, GRADS[0])
    push(1, GRADS[1])
    assert shard.version == 2
    expected = start - 0.1 / 4 * (torch.tensor(GRADS[0]) + torch.tensor(GRADS[1]))
    torch.testing.assert_close(shard.master.data, expected, rtol=1e-6, atol=1e-7)


def test_staleness_lr_divides_each_gradients_lr_by_its_staleness():
    """Zhang et al.: with SGD, w <- w - lr / N x sum_i g_i / tau_i (tau: the version made minus the one read)."""
    shard, push, _ = _shard(2, "sgd", compensation="staleness-lr")
    for _ in range(4):  # worker 1 alone moves the shard two versions on; worker 0 still holds version 0
        push(1, GRADS[2])
    assert shard.version == 2
    before = shard.master.data.clone()
    push(1, GRADS[1])  # read version 2, makes version 3: tau 1, weight 1
    push(0, GRADS[0])  # read version 0: tau 3, weight 1/3
    assert shard.version == 3
    expected = before - 0.1 / 2 * (torch.tensor(GRADS[1]) + torch.tensor(GRADS[0]) / 3)
    torch.testing.assert_close(shard.master.data, expected, rtol=1e-6, atol=1e-7)
    assert shard.versions_behind == {0: 5, 2: 1}


def test_staleness_lr_scales_an_adaptive_step_not_the_gradient():
    """AdamW: one step on the weighted mean gradient, at lr x the mean weight."""
    shard, push, _ = _shard(2, "adamw", compensation="staleness-lr")
    start = shard.master.data.clone()
    for _ in range(4):
        push(1, GRADS[2])
    push(1, GRADS[1])  # weight 1
    push(0, GRADS[0])  # weight 1/3
    g2, g1, g0 = (torch.tensor(GRADS[i]) for i in (2, 1, 0))
    weights = 1 + 1 / 3
    expected = _adamw_replay(start, [(g2, 0.1), (g2, 0.1), ((g1 + g0 / 3) / weights, 0.1 * weights / 2)])
    torch.testing.assert_close(shard.master.data, expected, rtol=1e-6, atol=1e-7)


def test_dc_asgd_corrects_a_stale_gradient_by_its_formula():
    """Zheng et al.: g + lambda * g * g * (w_now - w_then), w_then being what that worker was sent."""
    shard, push, sent = _shard(2, "sgd", compensation="dc", dc_lambda=2.0)
    w_then = shard.master.data.clone()  # worker 0 computes on version 0
    push(1, GRADS[2])
    push(1, GRADS[3])  # one step: worker 1 moved the shard; worker 0 has not pulled since
    assert shard.version == 1 and torch.equal(sent[1], shard.master.data)
    w_now = shard.master.data.clone()
    g0, g1 = torch.tensor(GRADS[0]), torch.tensor(GRADS[1])
    push(0, GRADS[0])
    push(1, GRADS[1])  # worker 1 was sent w_now: no correction
    corrected = g0 + 2.0 * g0 * g0 * (w_now - w_then)
    expected = w_now - 0.1 * (corrected + g1) / 2
    torch.testing.assert_close(shard.master.data, expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(corrected, g0)


def test_lookahead_replies_the_parameters_extrapolated_by_the_last_step():
    """While a step is filling, a worker is sent w_v + (w_v - w_(v-1)): where its next push will land."""
    shard, push, sent = _shard(2, "sgd", compensation="lookahead")
    start = shard.master.data.clone()
    push(0, GRADS[0])  # the step is filling, but no step was made yet: nothing to extrapolate
    torch.testing.assert_close(sent[0], start)
    push(1, GRADS[1])  # completes the step: a synchronous reply, the parameters themselves
    w1 = shard.master.data.clone()
    torch.testing.assert_close(sent[1], w1)
    torch.testing.assert_close(w1, start - 0.1 * (torch.tensor(GRADS[0]) + torch.tensor(GRADS[1])) / 2)
    push(1, GRADS[2])  # one push of the next step pending: worker 1 gets w1 + (w1 - w0)
    torch.testing.assert_close(sent[1], w1 + (w1 - start))
    assert torch.equal(shard.master.data, w1)  # the shard itself is not moved
    push(0, GRADS[3])
    w2 = shard.master.data.clone()
    torch.testing.assert_close(sent[0], w2)
    assert shard.steps_before_next_push() == 0


def test_rules_joined_by_plus_apply_both():
    """lookahead+staleness-lr (the default): the extrapolated reply, and lr / tau for the stale push."""
    shard, push, sent = _shard(2, "sgd", compensation="lookahead+staleness-lr")
    start = shard.master.data.clone()
    push(0, GRADS[0])
    push(1, GRADS[1])  # version 1; both pushes read version 0 and make version 1: tau 1
    w1 = shard.master.data.clone()
    push(1, GRADS[2])  # read version 1, makes 2: tau 1; worker 1 is sent w1 + (w1 - w0)
    torch.testing.assert_close(sent[1], w1 + (w1 - start))
    push(0, GRADS[3])  # worker 0 read version 0 (it pushed before the step): tau 2, weight 1/2
    expected = w1 - 0.1 * (torch.tensor(GRADS[2]) + torch.tensor(GRADS[3]) / 2) / 2
    torch.testing.assert_close(shard.master.data, expected, rtol=1e-6, atol=1e-7)
    assert plait.AsyncPS().rules() == {"lookahead", "staleness-lr"}
    with pytest.raises(plait.ConfigError, match="lookahead\\+nope"):
        plait.AsyncPS(compensation="lookahead+nope")


def test_sync_steps_hold_every_reply_until_the_step_then_let_go():
    """sync_steps=2: a worker's first two pushes are answered only once every worker pushed (the
    synchronous step, version 0 behind); from the third on, at once, whoever else has pushed."""
    shard, push, sent = _shard(2, "sgd", compensation="none", sync_steps=2)
    for round_ in (1, 2):
        push(0, GRADS[0])
        assert 0 not in sent and shard.bound() == 0
        push(1, GRADS[1])
        assert shard.version == round_ and set(sent) == {0, 1}
        assert torch.equal(sent[0], shard.master.data) and torch.equal(sent[1], shard.master.data)
        sent.clear()
    push(0, GRADS[0])
    assert shard.bound() is None and 0 in sent and shard.version == 2  # answered before worker 1 pushed
    assert shard.versions_behind == {0: 5}


def test_a_checkpoint_request_to_a_server_that_takes_no_part_says_so():
    from plait.strategies.async_ps.server import Server

    server = Server(None, None, 0, [0, 1], 1, 1.0)
    request = {"kind": "save", "directory": "d", "step": 3}
    with pytest.raises(RuntimeError, match="only a dedicated server takes part"):
        server._checkpoint({1: request})
    server.on_checkpoint = lambda r: None
    with pytest.raises(RuntimeError, match="different checkpoints"):
        server._checkpoint({1: request, 2: {**request, "step": 4}})
