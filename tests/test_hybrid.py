"""Data x tensor x pipeline parallelism on a mesh: parity of every pair of axes with the single-process
GPT, ZeRO within the dp axis, the mesh's rank layout, gradient clipping, train_step everywhere, errors."""

import types

import pytest
import torch
from torch.testing import assert_close

import plait
from tests.harness import run_ranks
from tests.reference import (
    FP32,
    GLOBAL_BATCH,
    assert_matches_reference,
    distributed_run,
    global_batches,
    loss_fn,
    make_model,
    reference_run,
    train_step_run,
)

STEPS = 4
OPTIMIZER = "sgd"  # linear in the gradient: see test_tensor_parallel.test_adamw_parity for Adam


@pytest.fixture(scope="module")
def reference():
    return reference_run(STEPS, OPTIMIZER)


@pytest.mark.parametrize("zero", [0, 2])
def test_dp2_x_tp2_plain_loop(zero, reference):
    """model(x) and loss.backward(): tp's collectives in forward/backward, then DDP / ZeRO-2 on the dp axis."""
    results = run_ranks(distributed_run, 4, plait.Hybrid(dp=2, tp=2, zero=zero), STEPS, OPTIMIZER)
    for result in results:
        assert_matches_reference(result, reference, **FP32)


@pytest.mark.parametrize("zero", [0, 1])
def test_dp2_x_pp2(zero, reference):
    strategy = plait.Hybrid(dp=2, pp=2, zero=zero, microbatches=2)
    for result in run_ranks(train_step_run, 4, strategy, STEPS, OPTIMIZER):
        assert_matches_reference(result, reference, **FP32)


def test_tp2_x_pp2(reference):
    """Vocabulary-parallel loss on the last stage; the tied vocabulary shard summed across stages."""
    strategy = plait.Hybrid(tp=2, pp=2, microbatches=4, schedule="gpipe")
    for result in run_ranks(train_step_run, 4, strategy, STEPS, OPTIMIZER):
        assert_matches_reference(result, reference, **FP32)


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "zero3", "none"])
def test_train_step_for_data_parallel_strategies(strategy, reference):
    world = 1 if strategy == "none" else 2
    for result in run_ranks(train_step_run, world, strategy, STEPS, OPTIMIZER):
        assert_matches_reference(result, reference, **FP32)


def _mesh_layout() -> dict:
    ctx = plait.init()
    model, _ = plait.setup(make_model(), plait.Hybrid(dp=2, tp=2, pp=2, microbatches=2))
    runtime = model.plait_runtime
    return {
        "rank": ctx.rank,
        "coords": runtime.mesh.coords,
        "sizes": {axis: group.size for axis, group in runtime.mesh.groups.items()},
        "dp": (model.dp_rank, model.dp_size),
    }


def test_mesh_puts_tp_fastest_then_pp_then_dp():
    for layout in run_ranks(_mesh_layout, 8, timeout=180):
        rank = layout["rank"]
        assert layout["coords"] == {"dp": rank // 4, "pp": rank // 2 % 2, "tp": rank % 2}
        assert layout["sizes"] == {"dp": 2, "pp": 2, "tp": 2}
        assert layout["dp"] == (rank // 4, 2)


def _clipped_norm(strategy: plait.Strategy | None) -> tuple[float, float]:
    """The gradient norm of the first step's global batch as clip_grad_norm_ reports it, and the norm
    after clipping to half of it."""
    x, y = next(global_batches(1))
    if strategy is None:
        model = make_model()
        loss_fn(model, x, y).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9).item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), norm / 2)
        return norm, torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9).item()
    plait.init()
    model, _ = plait.setup(make_model(), strategy, lambda ps: torch.optim.SGD(ps, lr=0.1))
    local = GLOBAL_BATCH // model.dp_size
    mine = slice(model.dp_rank * local, (model.dp_rank + 1) * local)
    model.train_step(x[mine], y[mine])
    norm = plait.clip_grad_norm_(model, 1e9).item()
    plait.clip_grad_norm_(model, norm / 2)
    return norm, plait.clip_grad_norm_(model, 1e9).item()


@pytest.mark.parametrize(
    "strategy",
    [
        plait.Hybrid(tp=2, pp=2, microbatches=2),
        plait.Hybrid(dp=2, tp=2),
        plait.Hybrid(dp=2, tp=2, zero=1),
        plait.Hybrid(dp=2, pp=2, zero=2, microbatches=2),
    ],
    ids=["tp2xpp2", "dp2xtp2", "dp2xtp2-zero1", "dp2xpp2-zero2"],
)
def test_clip_grad_norm_counts_each_element_once(strategy):
    """Replicated parameters once across tp, the tied weight once across stages, tp and ZeRO shards
    all summed; clipping to half the norm halves it."""
    expected, halved = _clipped_norm(None)
    assert_close(halved, expected / 2, rtol=1e-5, atol=0)
    for norm, after in run_ranks(_clipped_norm, 4, strategy):
        assert_close(norm, expected, rtol=1e-5, atol=0)
        assert_close(after, halved, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    ("world", "arguments", "fragment"),
    [
        (4, dict(dp=2, tp=2, pp=2), r"dp=2 x tp=2 x pp=2 = 8 ranks, but the world has 4; use dp=1"),
        (6, dict(dp=1, tp=4), r"tp x pp=4 must divide the world size; tp x pp in \{1, 2, 3, 6\}"),
        (4, dict(dp=2, tp=2, zero=3), r"zero=3 is not supported in a mesh; use zero in \{0, 1, 2\}"),
        (4, dict(tp=2, pp=2, microbatches=1), r"microbatches=1 is fewer than pp=2"),
        (
            2,
            dict(tp=2, pp=1, plan={"lm_head": "col", "nothing.*": "row"}),
            r"\['nothing.\*'\] match no module",
        ),
    ],
)
def test_configuration_errors(world, arguments, fragment):
    with pytest.raises(plait.ConfigError, match=fragment):
        plait.Hybrid(**arguments).validate(types.SimpleNamespace(world_size=world), make_model())
