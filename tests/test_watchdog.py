"""Hang diagnosis and replica checks: a stuck collective is explained within seconds, not a silent hang."""

import pytest
import torch

import plait
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
