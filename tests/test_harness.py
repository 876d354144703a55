"""The harness itself: results come back in rank order, and failures and hangs are named."""

import pytest
import torch

import plait
from tests.harness import RankFailure, run_ranks


def _rank_and_sum() -> tuple[int, float]:
    ctx = plait.init()
    t = torch.tensor([float(ctx.rank + 1)])
    ctx.world.all_reduce(t)
    return ctx.rank, t.item()


def _fail_on_rank_1() -> None:
    ctx = plait.init()
    if ctx.rank == 1:
        raise ValueError("rank one is broken")
    ctx.world.barrier()


def _rank_0_waits_for_a_message_instead() -> None:
    ctx = plait.init()
    if ctx.rank == 0:
        ctx.world.recv(torch.zeros(1), src=1)  # rank 1 never sends: both ranks wait forever
    else:
        ctx.world.barrier()


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_results_in_rank_order(world_size):
    results = run_ranks(_rank_and_sum, world_size)
    total = world_size * (world_size + 1) / 2
    assert results == [(r, total) for r in range(world_size)]


def test_a_failing_rank_is_named_and_the_others_do_not_hang():
    with pytest.raises(RankFailure) as info:
        run_ranks(_fail_on_rank_1, 2, grace=5)
    text = str(info.value)
    assert "rank 1: error" in text and "rank one is broken" in text
    # rank 0 either sees its peer's connection close (an error) or is stopped after the grace period
    assert "rank 0: error" in text or ("rank 0: hung" in text and "after another rank failed" in text)


def test_a_hang_is_reported_with_stacks():
    with pytest.raises(RankFailure) as info:
        run_ranks(_rank_0_waits_for_a_message_instead, 2, timeout=8)
    text = str(info.value)
    assert "rank 0: hung" in text and "rank 1: hung" in text and "within 8s" in text
    assert "in _rank_0_waits_for_a_message_instead" in text  # the stack dump shows where each waits
