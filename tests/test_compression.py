"""Gradient compression and the two-level all-reduce: formulas, bytes on the wire, error feedback."""

import pytest
import torch
from torch.testing import assert_close

import plait
from plait.comm.hierarchy import TwoLevel
from plait.comm.mesh import Mesh
from plait.strategies.compression import cut_layout, make_compressor, parse_compression
from plait.strategies.compression.sign import message_bytes
from tests.harness import run_ranks

# a bucket as the runtimes lay it out: a matrix, a vector, a 3-d weight, a small matrix, padding
LAYOUT = [(0, (48, 40)), (1920, (40,)), (1960, (24, 4, 5)), (2440, (3, 3))]
NUMEL = 2452  # 3 elements of padding


def rank_gradients(rank: int, step: int) -> torch.Tensor:
    g = torch.randn(NUMEL, generator=torch.Generator().manual_seed(100 * step + rank))
    g[2449:] = 0  # padding is zero on every rank
    return g


def _compress_steps(config, steps: int, dtype: torch.dtype = torch.float32) -> dict:
    """Average rank_gradients (in ``dtype``) over the world with ``config`` for ``steps`` steps; bytes per step."""
    ctx = plait.init()
    compressor = make_compressor(parse_compression(config), ctx.world)
    compressor.register(0, NUMEL, LAYOUT, torch.device("cpu"), dtype)
    outputs, sent = [], []
    for step in range(steps):
        flat = rank_gradients(ctx.rank, step).to(dtype)
        before = ctx.stats.bytes_sent
        compressor.all_reduce(0, flat)
        sent.append(ctx.stats.bytes_sent - before)
        outputs.append(flat)
    residual = compressor.feedback.residuals.get(0)
    return {
        "outputs": outputs,
        "sent": sent,
        "formula": compressor.wire_bytes(),
        "residual": None if residual is None else residual.float().clone(),
        "residual_dtype": None if residual is None else residual.dtype,
    }


def exact_mean(world: int, step: int) -> torch.Tensor:
    return torch.stack([rank_gradients(r, step) for r in range(world)]).mean(0)


def test_cut_layout_keeps_whole_rows_as_matrices():
    # elements [100, 2000): the 48x40 matrix from row 3 (a ragged 20 first), then the vector whole,
    # then 40 elements of the 24x20 weight (two whole rows)
    assert cut_layout(LAYOUT, 100, 2000) == [(0, (20,)), (20, (45, 40)), (1820, (40,)), (1860, (2, 20))]
    assert cut_layout(LAYOUT, 0, NUMEL) == LAYOUT


@pytest.mark.parametrize("world_size", [2, 4])
def test_powersgd_at_full_rank_is_the_exact_average(world_size):
    full = plait.PowerSGD(rank=48, min_compression_rate=0)
    results = run_ranks(_compress_steps, world_size, full, 2)
    for result in results:
        for step, out in enumerate(result["outputs"]):
            assert_close(out, exact_mean(world_size, step), rtol=1e-4, atol=1e-5)
    # each rank's residual is its part outside the averaged subspace; over the ranks nothing is lost
    assert sum(r["residual"] for r in results).abs().max() < 1e-4


def test_powersgd_at_full_rank_on_bf16_gradients_is_the_average():
    """bf16 gradients (mixed precision) are compressed in bf16: at full rank the output is the average
    to bf16's precision (P is rounded to bf16 after an fp32 QR, so P P^T is the identity only to
    ~2^-8), half the fp32 bytes go on the wire, and the residual is bf16."""
    full = plait.PowerSGD(rank=48, min_compression_rate=0)
    half = run_ranks(_compress_steps, 2, full, 2, torch.bfloat16)
    single = run_ranks(_compress_steps, 2, full, 1)[0]
    for result in half:
        assert result["residual_dtype"] == torch.bfloat16
        assert result["sent"] == [result["formula"]] * 2
        assert result["formula"] * 2 == single["formula"]
        for step, out in enumerate(result["outputs"]):
            exact = torch.stack([rank_gradients(r, step).bfloat16().float() for r in range(2)]).mean(0)
            assert (out.float() - exact).abs().max() < 0.05  # measured 0.023
            assert (out.float() - exact).norm() < 0.015 * exact.norm()  # measured 0.8%


@pytest.mark.parametrize("world_size", [2, 4])
def test_powersgd_bytes_and_error_feedback(world_size):
    steps = 3
    results = run_ranks(_compress_steps, world_size, plait.PowerSGD(rank=2), steps)
    n = world_size
    # compressed: 48x40 (2 x 88), 24x20 (2 x 44); plain: the vector, the 3x3 matrix (too small)
    numbers = 2 * 88 + 2 * 44 + 40 + 9
    formula = 2 * (n - 1) * 4 * numbers // n
    for result in results:
        assert result["formula"] == formula
        assert result["sent"] == [formula] * steps
        assert_close(result["outputs"][-1], results[0]["outputs"][-1], rtol=0, atol=0)  # same everywhere
    # the 1-D and uncompressed parts are averaged exactly, the padding untouched
    out = results[0]["outputs"][0]
    assert_close(out[1920:1960], exact_mean(n, 0)[1920:1960])
    assert_close(out[2440:], exact_mean(n, 0)[2440:])
    # error feedback loses nothing: N x (sum of outputs) + sum of residuals = sum of all gradients
    sent = n * sum(results[0]["outputs"]) + sum(r["residual"] for r in results)
    assert_close(sent, n * sum(exact_mean(n, s) for s in range(steps)), rtol=1e-4, atol=1e-4)
    # and the approximation is a real one (rank 2 of a 48x40 random matrix is far from it)
    assert (results[0]["outputs"][0][:1920] - exact_mean(n, 0)[:1920]).norm() > 0.5


@pytest.mark.parametrize("world_size", [2, 4])
def test_sign_bytes_decoding_and_error_feedback(world_size):
    steps = 2
    results = run_ranks(_compress_steps, world_size, plait.Sign(chunk=1024), steps)
    n = world_size
    formula = (n - 1) * (4 * 3 + 3 * 1024 // 8)  # 3 chunks of scales, 3072 packed signs
    assert message_bytes(NUMEL, 1024) == 4 * 3 + 3 * 1024 // 8
    # first step (no residual yet): the mean over ranks of s_c sign(g) with s_c = mean |g| per chunk
    expected = torch.zeros(NUMEL)
    for r in range(n):
        g = rank_gradients(r, 0)
        for lo in range(0, NUMEL, 1024):
            part = g[lo : lo + 1024]
            expected[lo : lo + 1024] += part.abs().mean() * torch.where(part >= 0, 1.0, -1.0)
    for result in results:
        assert result["sent"] == [formula] * steps
        assert result["formula"] == formula
        assert_close(result["outputs"][0], expected / n)
    total = n * sum(results[0]["outputs"]) + sum(r["residual"] for r in results)
    assert_close(total, n * sum(exact_mean(n, s) for s in range(steps)), rtol=1e-4, atol=1e-4)


def test_bf16_halves_bytes():
    results = run_ranks(_compress_steps, 2, "bf16", 1)
    assert results[0]["sent"] == [NUMEL * 2] == [results[0]["formula"]]
    assert_close(results[0]["outputs"][0], exact_mean(2, 0), rtol=1e-2, atol=1e-2)


def test_bad_compression_names_the_fix():
    with pytest.raises(plait.ConfigError, match="'gzip' is not known; use 'none', 'bf16', 'powersgd'"):
        parse_compression("gzip")
    with pytest.raises(plait.ConfigError, match="rank=0 must be an integer >= 1"):
        plait.PowerSGD(rank=0)
    with pytest.raises(plait.ConfigError, match="multiple of 32"):
        plait.Sign(chunk=100)
    assert parse_compression("powersgd", rank=8) == plait.PowerSGD(rank=8)
    assert parse_compression("none") is None


def _two_level(numel: int, compress: str | None) -> dict:
    ctx = plait.init()
    levels = TwoLevel(*Mesh(ctx).host_groups("dp"))
    x = torch.randn(numel, generator=torch.Generator().manual_seed(ctx.rank))
    reference = x.clone()
    ctx.world.all_reduce(reference, op="avg")
    before = ctx.stats.link_snapshot()
    fn = None
    if compress is not None:
        lo, hi = levels.chunk(numel)
        compressor = make_compressor(parse_compression(compress), levels.inter)
        compressor.register(0, hi - lo, [(0, (hi - lo,))], x.device)

        def fn(chunk):
            compressor.all_reduce(0, chunk)

    levels.all_reduce(x, compress=fn).wait()
    after = ctx.stats.link_snapshot()
    sent = {
        link: after[link].bytes_sent - before.get(link, plait.comm.OpTotals()).bytes_sent for link in after
    }
    flat_before = ctx.stats.link_snapshot()
    ctx.world.all_reduce(torch.zeros(numel))
    flat_after = ctx.stats.link_snapshot()
    flat = {
        link: flat_after[link].bytes_sent - flat_before.get(link, plait.comm.OpTotals()).bytes_sent
        for link in flat_after
    }
    return {
        "x": x,
        "reference": reference,
        "sent": sent,
        "theory": levels.theory_bytes(numel, 4),
        "flat": flat,
    }


def test_two_level_all_reduce_on_two_hosts_of_two():
    numel = 1001  # odd: padded to the two ranks of a host
    results = run_ranks(_two_level, 4, numel, None, env={"LOCAL_WORLD_SIZE": "2"})
    for result in results:
        assert_close(result["x"], result["reference"], rtol=1e-5, atol=1e-6)
        assert result["sent"] == result["theory"]
    chunk = 501 * 4
    assert results[0]["theory"] == {"intra-host": 2 * chunk, "inter-host": chunk}
    # over the job, cross-host bytes: 4 x (501 x 4) against a flat ring's 2 ranks x 2 x 3/4 x 4004
    hierarchical = sum(r["sent"]["inter-host"] for r in results)
    flat = sum(r["flat"].get("inter-host", 0) for r in results)
    assert flat == 2 * (2 * 3 * 4004 // 4)
    assert hierarchical <= 2 / 3 * flat + 8


def test_two_level_with_compression_across_hosts():
    results = run_ranks(_two_level, 4, 1000, "bf16", env={"LOCAL_WORLD_SIZE": "2"})
    for result in results:
        assert_close(result["x"], result["reference"], rtol=2e-2, atol=2e-2)
        # the cross-host stage is a bf16 all-reduce of the 500-element chunk over 2 hosts
        assert result["sent"]["inter-host"] == 500 * 2


def _powersgd_step_ops() -> dict:
    """One ddp + PowerSGD step of a small GPT in several buckets: its all-reduces, in issue order."""
    from plait.models import GPT, preset

    ctx = plait.init()
    torch.manual_seed(0)
    strategy = plait.DDP(bucket_mb=0.25, compression=plait.PowerSGD(rank=2))
    model, _ = plait.setup(GPT(preset("gpt-tiny")), strategy, lambda ps: plait.optim.SGD(ps, lr=0.1))
    x = torch.randint(0, 256, (2, 33))
    first = len(ctx.stats.records())
    torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    ops = [r for r in ctx.stats.records()[first:] if r.op == "all_reduce"]
    return {"buckets": len(model.plait_runtime.buckets), "ops": [(r.started, r.finished) for r in ops]}


def test_powersgd_launches_every_bucket_q_before_waiting_on_one():
    """At the end of backward each bucket's P is waited on and its Q all-reduce launched, bucket
    after bucket, before the first Q is waited on: a Q's round trip overlaps the next bucket's QR."""
    result = run_ranks(_powersgd_step_ops, 2)[0]
    n = result["buckets"]
    assert n >= 3
    assert len(result["ops"]) == 2 * n  # P (with the plain part) and Q per bucket
    q_ops = result["ops"][n:]
    assert max(started for started, _ in q_ops) < min(finished for _, finished in q_ops)
