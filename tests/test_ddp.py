"""DDP: parity with the single-process reference on 2 and 4 gloo ranks, and its errors."""

import pytest
import torch
from torch.testing import assert_close

import plait
from plait.strategies.naive_ddp import NaiveDDP
from tests.harness import RankFailure, run_ranks
from tests.reference import FP32, assert_matches_reference, distributed_run, make_model, reference_run

STEPS = 6


@pytest.fixture(scope="module")
def reference():
    return reference_run(STEPS)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ddp_matches_single_process(world_size, reference):
    results = run_ranks(distributed_run, world_size, "ddp", STEPS)
    for result in results:
        assert_matches_reference(result, reference, **FP32)


def test_ddp_many_small_buckets_and_sgd():
    """One bucket per parameter: exercises bucket order and the readiness bookkeeping."""
    reference = reference_run(STEPS, optimizer="sgd")
    results = run_ranks(distributed_run, 2, plait.DDP(bucket_mb=1e-6), STEPS, "sgd")
    for result in results:
        assert_matches_reference(result, reference, **FP32)


def test_naive_twin_agrees_with_bucketed_ddp(reference):
    """Per-parameter all-reduce after backward (naive_ddp) and bucketed, overlapped DDP: the same
    training, with the same bytes on the wire (4 ranks, micro-batches under no_sync)."""
    naive, bucketed = (
        run_ranks(distributed_run, 4, strategy, STEPS, "adamw", 2)[0]
        for strategy in (NaiveDDP(), plait.DDP())
    )
    assert_close(torch.tensor(naive["losses"]), torch.tensor(bucketed["losses"]), **FP32)
    for name, value in bucketed["state"].items():
        assert_close(naive["state"][name], value, **FP32, msg=lambda m, n=name: f"{n}: {m}")
    assert_matches_reference(naive, reference, **FP32)
    assert naive["bytes_per_step"] == [naive["theory_bytes"]] * STEPS
    assert naive["theory_bytes"] == bucketed["theory_bytes"]


@pytest.mark.parametrize("world_size", [2, 4])
def test_no_sync_gradient_accumulation(world_size, reference):
    results = run_ranks(distributed_run, world_size, "ddp", STEPS, "adamw", 2)
    for result in results:
        assert_matches_reference(result, reference, **FP32)
    # the micro-batch under no_sync sends nothing: one step sends exactly one all-reduce of the gradients
    # (after the first step, which also broadcasts the bucket order rank 0 observed)
    assert results[0]["bytes_per_step"][1:] == [results[0]["theory_bytes"]] * (STEPS - 1)


def test_bf16_communication_halves_bytes_and_stays_close():
    """bf16 messages agree with the fp32 reference within a few 1e-3.

    Momentum SGD rather than Adam: Adam divides by the gradient's own scale, so an element whose
    gradient is near zero gets a full-size step whose sign a bf16 rounding can flip.
    """
    reference = reference_run(STEPS, optimizer="sgd")
    results = run_ranks(distributed_run, 2, plait.DDP(grad_dtype="bf16"), STEPS, "sgd")
    for result in results:
        assert_matches_reference(result, reference, rtol=3e-3, atol=3e-3)
    fp32_theory = run_ranks(distributed_run, 2, "ddp", 1)[0]["theory_bytes"]
    assert results[0]["theory_bytes"] * 2 == fp32_theory
    assert results[0]["bytes_per_step"][1:] == [results[0]["theory_bytes"]] * (STEPS - 1)


def test_replicas_start_equal_and_torch_optimizers_work():
    """Each rank builds its model from a different seed: setup broadcasts rank 0's parameters."""
    reference = reference_run(STEPS, optimizer="torch-sgd")
    results = run_ranks(distributed_run, 2, "ddp", STEPS, "torch-sgd", 1, True)
    for result in results:
        assert_matches_reference(result, reference, **FP32)


def test_bytes_per_step_equal_ring_theory():
    result = run_ranks(distributed_run, 4, "ddp", 2)[0]
    gradient_bytes = sum(p.numel() * 4 for p in make_model().parameters())
    assert result["theory_bytes"] == 2 * 3 * gradient_bytes // 4
    assert result["bytes_per_step"][1] == result["theory_bytes"]


class _WithUnused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.used = torch.nn.Linear(4, 4)
        self.spare = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.used(x)


def _train_with_unused(find_unused: bool) -> list[float]:
    ctx = plait.init()
    torch.manual_seed(0)
    model, opt = plait.setup(
        _WithUnused(), plait.DDP(find_unused_parameters=find_unused), lambda ps: plait.optim.SGD(ps, lr=0.1)
    )
    x = torch.full((2, 4), float(ctx.rank + 1))
    model(x).square().mean().backward()
    opt.step()
    return model.used.weight.flatten().tolist() + model.spare.weight.flatten().tolist()


def test_a_parameter_without_gradient_is_named():
    with pytest.raises(RankFailure) as info:
        run_ranks(_train_with_unused, 2, False)
    assert "spare.weight" in str(info.value) and "find_unused_parameters=True" in str(info.value)


def test_find_unused_parameters_tolerates_them():
    results = run_ranks(_train_with_unused, 2, True)
    assert results[0] == results[1]
    torch.manual_seed(0)
    spare_before = _WithUnused().spare.weight.flatten().tolist()
    assert results[0][16:] == spare_before  # zero gradient, plain SGD: unchanged


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(bucket_mb=0), "bucket_mb=0"),
        (dict(bucket_mb=-1), "bucket_mb=-1"),
        (dict(grad_dtype="int8"), "grad_dtype='int8'"),
    ],
)
def test_bad_ddp_arguments(kwargs, fragment):
    with pytest.raises(plait.ConfigError, match=fragment):
        plait.DDP(**kwargs)


def test_unknown_strategy_name():
    with pytest.raises(plait.ConfigError, match=r"strategy='dpp'.*'ddp'"):
        plait.setup(make_model(), "dpp")


def test_the_gradient_norm_is_accurate_over_a_large_flat_buffer():
    """One fp32 vector_norm over a 7.5M-element buffer is ~8e-4 off on CPU; clipping must not depend on layout."""
    from plait.strategies.base import sum_of_squares

    g = torch.Generator().manual_seed(0)
    flat = torch.randn(7_500_001, generator=g) * torch.rand(7_500_001, generator=g) ** 4
    exact = flat.double().square().sum()
    pieces = list(flat.split([1_000_003, 6_499_997, 1]))
    for grads in ([flat], pieces):
        assert_close(sum_of_squares(grads).double(), exact, rtol=2e-7, atol=0)
