"""Pipeline parallelism: the schedules, parity with the single-process GPT at pp=2 and pp=4 under GPipe
and 1F1B, the measured bubble against (p-1)/(m+p-1), and the configuration errors."""

import types

import pytest
import torch
from torch.testing import assert_close

import plait
from plait.models import GPT, GPTConfig
from plait.strategies.pipeline import balance, schedule_actions
from tests.harness import RankFailure, run_ranks
from tests.reference import (
    FP32,
    assert_matches_reference,
    make_model,
    reference_eval,
    reference_run,
    train_step_run,
)

STEPS = 4
OPTIMIZER = "sgd"  # linear in the gradient: see test_tensor_parallel.test_adamw_parity for Adam


def _simulate(
    kind: str, stages: int, microbatches: int, forward_s: float = 1.0, backward_s: float = 2.0
) -> tuple[list[list[tuple[str, int]]], float]:
    """Run every stage's action list against the data dependencies, each forward taking ``forward_s``
    and each backward ``backward_s`` on every stage; fail on a deadlock. Returns the programs and the
    bubble (1 - busy / wall) the schedule itself leaves, free of any machine's timing."""
    programs = [schedule_actions(kind, s, stages, microbatches) for s in range(stages)]
    finished: dict[tuple[str, int, int], float] = {}
    free = [0.0] * stages
    position = [0] * stages
    while any(position[s] < len(programs[s]) for s in range(stages)):
        progressed = False
        for s in range(stages):
            if position[s] == len(programs[s]):
                continue
            kind_, i = programs[s][position[s]]
            needs = [("F", s - 1, i)] if kind_ == "F" and s > 0 else []
            if kind_ == "B":
                needs = [("F", s, i)] + ([("B", s + 1, i)] if s < stages - 1 else [])
            if all(n in finished for n in needs):
                start = max([free[s]] + [finished[n] for n in needs])
                free[s] = finished[(kind_, s, i)] = start + (forward_s if kind_ == "F" else backward_s)
                position[s] += 1
                progressed = True
        assert progressed, f"{kind} deadlocks at {position}"
    return programs, 1 - microbatches * (forward_s + backward_s) / max(free)


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("stages", "microbatches"), [(2, 2), (2, 5), (4, 4), (4, 9)])
def test_schedules_run_every_microbatch_and_cannot_deadlock(kind, stages, microbatches):
    for s, actions in enumerate(_simulate(kind, stages, microbatches)[0]):
        assert sorted(actions) == sorted(
            [("F", i) for i in range(microbatches)] + [("B", i) for i in range(microbatches)]
        )
        alive, peak = 0, 0
        for action, _ in actions:
            alive += 1 if action == "F" else -1
            peak = max(peak, alive)
        assert peak == (microbatches if kind == "gpipe" else stages - s)


def test_balance_minimizes_the_largest_stage():
    assert balance([10, 50, 50, 20], 2) == (2,)
    assert balance([10, 50, 50, 50, 50, 20], 4) == (2, 3, 4)
    assert balance([1, 1, 1, 100], 2) == (3,)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize(("stages", "config"), [(2, "default"), (4, "deep")])
def test_pp_matches_single_process(stages, config, schedule):
    reference = reference_run(STEPS, OPTIMIZER, config)
    strategy = plait.Pipeline(stages=stages, microbatches=4, schedule=schedule)
    results = run_ranks(train_step_run, stages, strategy, STEPS, OPTIMIZER, config)
    for s, result in enumerate(results):
        assert_matches_reference(result, reference, **FP32)
        assert_close(result["eval"], reference_eval(reference[1], config), **FP32)
        # 1F1B holds the activations of at most p - s micro-batches, GPipe all m
        assert result["metrics"]["in_flight"] == (stages - s if schedule == "1f1b" else 4)


def test_explicit_boundaries():
    """Stage 0 holds only the embedding (and the tied weight); stage 1 both blocks and the head."""
    reference = reference_run(STEPS, OPTIMIZER)
    strategy = plait.Pipeline(stages=2, microbatches=2, boundaries=(1,))
    for result in run_ranks(train_step_run, 2, strategy, STEPS, OPTIMIZER):
        assert_matches_reference(result, reference, **FP32)


# two equal stages (a small vocabulary keeps the head stage as fast as the other)
BUBBLE_MODEL = GPTConfig(vocab_size=64, block_size=64, n_layer=2, n_head=4, n_embd=256, bias=False)


def _bubble(microbatches: int) -> dict:
    """The pipeline bubble measured in the last of a few GPipe steps, and its theory."""
    plait.init()
    torch.manual_seed(0)
    model, opt = plait.setup(
        GPT(BUBBLE_MODEL),
        plait.Pipeline(stages=2, microbatches=microbatches, schedule="gpipe", boundaries=(2,)),
        lambda ps: torch.optim.SGD(ps, lr=0.01),
    )
    tokens = torch.randint(0, 64, (32, 65), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model.train_step(tokens[:, :-1], tokens[:, 1:])
        opt.step()
        opt.zero_grad()
        metrics = model.plait_runtime.metrics()
    return {"bubble": metrics["bubble"], "bubble_theory": metrics["bubble_theory"]}


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("stages", "microbatches"), [(2, 2), (2, 8), (4, 4), (4, 9)])
def test_schedules_leave_the_theoretical_bubble(kind, stages, microbatches):
    """(p-1)/(m+p-1) with equally fast stages, whatever backward costs against forward. The bubble a
    run measures (wall-clock on a shared CPU) is a benchmark's figure, not a test's."""
    theory = (stages - 1) / (microbatches + stages - 1)
    for backward_s in (1.0, 2.0, 3.5):
        assert _simulate(kind, stages, microbatches, backward_s=backward_s)[1] == pytest.approx(theory)


def test_a_run_reports_its_bubble_and_the_theory():
    """Every stage reports the same measured figure, a fraction, beside the formula for its m."""
    for microbatches in (2, 8):
        ranks = run_ranks(_bubble, 2, microbatches)
        assert ranks[0] == ranks[1]
        assert 0.0 <= ranks[0]["bubble"] < 1.0
        assert ranks[0]["bubble_theory"] == pytest.approx(1 / (microbatches + 1))


def _forward_with_grad() -> None:
    plait.init()
    model, _ = plait.setup(make_model(), "pp")
    model(torch.zeros(2, 4, dtype=torch.long))


def test_forward_outside_no_grad_points_to_train_step():
    with pytest.raises(RankFailure, match=r"model.train_step"):
        run_ranks(_forward_with_grad, 2)


@pytest.mark.parametrize(
    ("world", "arguments", "fragment"),
    [
        (5, dict(stages=5, microbatches=5), r"pp=5 stages need at least 5 layers.*has 4.*\{1, 2, 3, 4\}"),
        (4, dict(stages=4, microbatches=2), r"microbatches=2 is fewer than pp=4.*microbatches >= 4"),
        (4, dict(stages=3), r"pp=3 does not divide the world size 4; use stages in \{1, 2, 4\}"),
        (2, dict(stages=2, boundaries=(3, 1)), r"boundaries=\(3, 1\) must be 1 increasing"),
        (2, dict(schedule="zb"), r"schedule='zb' is not known"),
    ],
)
def test_configuration_errors_name_the_value_and_what_fits(world, arguments, fragment):
    with pytest.raises(plait.ConfigError, match=fragment):
        plait.Pipeline(**arguments).validate(types.SimpleNamespace(world_size=world), make_model())
