"""ZeRO stages 1-3: parity with the single-process reference, memory, bytes, precision, errors."""

import pytest
import torch
from torch.testing import assert_close

import plait
from tests.harness import run_ranks
from tests.reference import (
    FP32,
    assert_matches_reference,
    distributed_run,
    make_model,
    reference_eval,
    reference_run,
    train_step_run,
)

STEPS = 5
STAGES = ["zero1", "zero2", "zero3"]


@pytest.fixture(scope="module")
def reference():
    return reference_run(STEPS)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("stage", STAGES)
def test_zero_matches_single_process(stage, world_size, reference):
    results = run_ranks(distributed_run, world_size, stage, STEPS)
    for result in results:
        assert_matches_reference(result, reference, **FP32)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_padding_tied_and_frozen_parameters(stage):
    """Odd sizes (every shard padded at 4 ranks), the tied embedding/head, and a frozen position embedding."""
    frozen = ("transformer.wpe.weight",)
    reference = reference_run(STEPS, optimizer="sgd", config="odd", freeze=frozen)
    results = run_ranks(distributed_run, 4, plait.Zero(stage=stage), STEPS, "sgd", 1, False, "odd", frozen)
    for result in results:
        assert_matches_reference(result, reference, **FP32)
    torch.manual_seed(0)
    untouched = make_model(config="odd").transformer.wpe.weight
    assert torch.equal(results[0]["state"]["transformer.wpe.weight"], untouched)


def test_many_small_buckets():
    """A bucket per parameter or so: the bucket pool, launch order and per-bucket shards."""
    reference = reference_run(STEPS, optimizer="sgd")
    for stage in (1, 2):
        results = run_ranks(distributed_run, 2, plait.Zero(stage=stage, bucket_mb=0.004), STEPS, "sgd")
        assert_matches_reference(results[0], reference, **FP32)


@pytest.mark.parametrize("stage", ["zero1", "zero2"])
def test_gradient_accumulation_with_no_sync(stage, reference):
    results = run_ranks(distributed_run, 2, stage, STEPS, "adamw", 2)
    for result in results:
        assert_matches_reference(result, reference, **FP32)
    assert results[0]["bytes_per_step"][1:] == [results[0]["theory_bytes"]] * (STEPS - 1)


def test_zero3_gradient_accumulation_with_no_sync(reference):
    """Under no_sync zero3 keeps full gradients (as FSDP's no_sync); the synchronized backward reduces the sums."""
    results = run_ranks(distributed_run, 2, "zero3", STEPS, "adamw", 2)
    for result in results:
        assert_matches_reference(result, reference, **FP32)
    # a step without accumulation gathers every unit in forward and all but the root and the last one
    # in backward (G = F + B bytes), and reduce-scatters once (R = F: every unit); accumulating over
    # two micro-batches, the first micro-batch's backward gathers again and units stay gathered after
    # it (the second forward gathers nothing): F + 2B + R, that is the theory plus B = G - R
    theory, ops = results[0]["theory_bytes"], results[0]["op_bytes"]
    reduce_scattered = ops["reduce_scatter"]
    backward_gathers = theory - 2 * reduce_scattered
    assert 0 < backward_gathers < reduce_scattered
    assert ops["all_gather"] == reduce_scattered + 2 * backward_gathers
    assert results[0]["bytes_per_step"][1:] == [theory + backward_gathers] * (STEPS - 1)


@pytest.mark.parametrize("world", [2, 4])
def test_zero3_train_step_keeps_units_gathered_between_microbatches(world, reference):
    """Within one train_step the parameters do not change: the root and the first unit stay gathered
    from one micro-batch's backward to the next one's forward. Same losses; the bytes the theory
    counts for two micro-batches, fewer than two separate steps would send."""
    one = run_ranks(train_step_run, world, "zero3", STEPS, "adamw")
    two = run_ranks(train_step_run, world, "zero3", STEPS, "adamw", "default", False, 2)
    for result in two:
        assert_matches_reference(result, reference, **FP32)
    assert one[0]["bytes_per_step"][1:] == [one[0]["theory_bytes"]] * (STEPS - 1)
    assert two[0]["bytes_per_step"][1:] == [two[0]["theory_bytes"]] * (STEPS - 1)
    loss_bytes = one[0]["theory_bytes"] - run_ranks(distributed_run, world, "zero3", 2)[0]["theory_bytes"]
    assert two[0]["theory_bytes"] - loss_bytes < 2 * (one[0]["theory_bytes"] - loss_bytes)


def test_zero3_evaluation_forward_under_no_grad():
    results = run_ranks(distributed_run, 2, "zero3", 2)
    expected = reference_eval(results[0]["state"])
    for result in results:
        assert_close(result["eval"], expected, **FP32)


def test_bytes_per_step_against_ddp():
    """zero1/2 send what ddp sends (within 5%: padding); zero3 under 1.5x: its backward gathers all
    units but the root and the last one, which stay gathered from forward."""
    ddp = run_ranks(distributed_run, 4, "ddp", 3)[0]["bytes_per_step"][-1]
    for stage in ("zero1", "zero2"):
        sent = run_ranks(distributed_run, 4, stage, 3)[0]["bytes_per_step"][-1]
        assert sent == pytest.approx(ddp, rel=0.05), stage
    zero3 = run_ranks(distributed_run, 4, "zero3", 3)[0]
    assert zero3["bytes_per_step"][-1] == zero3["theory_bytes"]
    assert ddp < zero3["bytes_per_step"][-1] < 1.5 * ddp


def test_memory_report_fractions_at_four_ranks():
    """Counted from live tensors: zero1's optimizer state and zero3's parameters are 1/4 of ddp's (+ padding)."""
    ddp = run_ranks(distributed_run, 4, "ddp", 2)
    zero1 = run_ranks(distributed_run, 4, "zero1", 2)
    zero2 = run_ranks(distributed_run, 4, plait.Zero(stage=2, bucket_mb=0.004), 2)  # ~a bucket per parameter
    zero3 = run_ranks(distributed_run, 4, "zero3", 2)
    full = ddp[0]["memory"]
    assert full.optimizer_state > 0 and full.master == 0
    for rank in range(4):
        m1, m2, m3 = zero1[rank]["memory"], zero2[rank]["memory"], zero3[rank]["memory"]
        assert m1.optimizer_state == pytest.approx(full.optimizer_state / 4, rel=0.02)
        # stage 1 keeps ddp's full gradient buffer, and the master's gradient shard
        assert m1.parameters == full.parameters
        # full precision: the optimizer steps on the model's own shard, no fp32 master copy beside it
        assert m1.master == m2.master == 0
        assert m1.gradients == pytest.approx(full.gradients * 1.25, rel=0.02)
        # between steps stage 2 holds its gradient shard, and at most two idle bucket buffers (<= 16.5 KiB here)
        assert m2.gradients == pytest.approx(full.gradients / 4, rel=0.02)
        assert 0 < m2.buffers <= 2 * 16.5 * 1024 and m1.buffers == full.buffers == 0
        # during backward: a few bucket buffers at once (the largest parameter is 16 KiB), never a full buffer
        assert zero2[rank]["bucket_peak_bytes"] <= 3 * 16.5 * 1024 < full.gradients / 2
        assert m3.parameters == pytest.approx(full.parameters / 4, rel=0.02)
        assert m3.optimizer_state == pytest.approx(full.optimizer_state / 4, rel=0.02)
        assert m3.gradients == m3.buffers == 0  # stage 3 frees even the shard and the buckets after the step


@pytest.mark.parametrize(
    "strategy",
    [plait.DDP(mixed_precision="bf16"), *(plait.Zero(stage=s, mixed_precision="bf16") for s in (1, 2, 3))],
)
def test_bf16_mixed_precision_stays_close_to_fp32(strategy):
    """bf16 compute and communication with an fp32 master: within a few 1e-3 of the fp32 reference (SGD: see test_ddp)."""
    reference = reference_run(STEPS, optimizer="sgd")
    results = run_ranks(distributed_run, 2, strategy, STEPS, "sgd")
    for result in results:
        assert_matches_reference(result, reference, rtol=1e-2, atol=5e-3)
        assert all(v.dtype == torch.float32 for k, v in result["state"].items() if "weight" in k)


def _fp16_with_an_injected_inf(stage: int) -> dict:
    ctx = plait.init()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    model, opt = plait.setup(
        model, plait.Zero(stage=stage, mixed_precision="fp16"), lambda ps: plait.optim.SGD(ps, lr=0.1)
    )
    scaler = model.plait_runtime.master.loss_scaler
    scales, states = [], []
    for step in range(3):
        x = torch.full((4, 8), 0.1 * (ctx.rank + 1), dtype=torch.float16)
        if step == 1 and ctx.rank == 1:
            x[0, 0] = float("inf")  # one rank's gradient overflows: every rank must skip
        model(x).float().square().mean().backward()
        before = plait.full_state_dict(model)
        opt.step()
        opt.zero_grad()
        after = plait.full_state_dict(model)
        states.append(all(torch.equal(before[k], after[k]) for k in before))
        scales.append(scaler.scale)
    return {"unchanged": states, "scales": scales, "skipped": scaler.skipped_steps}


@pytest.mark.parametrize("stage", [1, 3])
def test_fp16_loss_scaler_skips_a_step_with_inf(stage):
    results = run_ranks(_fp16_with_an_injected_inf, 2, stage)
    for result in results:
        assert result["unchanged"] == [False, True, False]
        assert result["skipped"] == 1
        assert result["scales"] == [2.0**16, 2.0**15, 2.0**15]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(stage=4), "stage=4 is not a ZeRO stage"),
        (dict(stage=0), "stage=0"),
        (dict(mixed_precision="int8"), "mixed_precision='int8'"),
        (dict(bucket_mb=0), "bucket_mb=0"),
    ],
)
def test_bad_zero_arguments(kwargs, fragment):
    with pytest.raises(plait.ConfigError, match=fragment):
        plait.Zero(**kwargs)


def _bf16_model_without_mixed_precision() -> dict:
    plait.init()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(
        torch.bfloat16
    )
    model, opt = plait.setup(model, "zero1", lambda ps: plait.optim.AdamW(ps, lr=0.1))
    before = plait.full_state_dict(model)
    model(torch.ones(4, 8, dtype=torch.bfloat16)).float().square().mean().backward()
    opt.step()
    after = plait.full_state_dict(model)
    return {
        "changed": all(not torch.equal(before[k], after[k]) for k in before),
        "memory": plait.memory_report(model, opt),
        "dtypes": {p.dtype for p in model.parameters()},
    }


def test_a_bf16_model_gets_an_fp32_master():
    """Parameters stored in bf16 (no mixed_precision): zero1 cannot step in place, so it keeps an fp32 shard."""
    for result in run_ranks(_bf16_model_without_mixed_precision, 2):
        assert result["changed"] and result["dtypes"] == {torch.bfloat16}
        assert result["memory"].master > 0
