"""Compression and hierarchical data parallelism inside the runtimes: parity, bytes, convergence."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import plait
from plait.strategies.zero.stage3 import Stage3Runtime
from tests.harness import run_ranks
from tests.reference import (
    FP32,
    GLOBAL_BATCH,
    assert_matches_reference,
    distributed_run,
    make_model,
    reference_run,
)
from tests.test_hybrid import _clipped_norm

STEPS = 6
TWO_HOSTS = {"LOCAL_WORLD_SIZE": "2"}  # 4 ranks as 2 hosts x 2


@pytest.fixture(scope="module")
def reference():
    return reference_run(STEPS)


@pytest.fixture(scope="module")
def sgd_reference():
    return reference_run(STEPS, optimizer="sgd")


@pytest.mark.parametrize("world_size", [2, 4])
def test_powersgd_at_full_rank_reproduces_uncompressed_ddp(world_size, sgd_reference):
    """Rank >= min(m, n): P spans each gradient's column space and the average is exact.

    Tolerance 1e-4 relative, 1e-5 absolute (fp32 QR and two extra matmuls per matrix round
    differently from a plain sum). Momentum SGD: Adam would turn the round-off of embedding rows
    whose gradient is ~0 into full-size steps (DESIGN.md).
    """
    strategy = plait.DDP(compression=plait.PowerSGD(rank=64, min_compression_rate=0))
    for result in run_ranks(distributed_run, world_size, strategy, STEPS, "sgd"):
        assert_matches_reference(result, sgd_reference, rtol=1e-4, atol=1e-5)


def link_bytes_run(strategy: plait.Strategy, steps: int) -> dict:
    """Bytes this rank sends per step by link level (after the first step), and the runtime's theory."""
    ctx = plait.init()
    model, opt = plait.setup(make_model(), strategy, lambda ps: plait.optim.AdamW(ps, lr=1e-2))
    local = GLOBAL_BATCH // model.dp_size
    tokens = torch.randint(0, 64, (GLOBAL_BATCH, 17), generator=torch.Generator().manual_seed(5))
    tokens = tokens[model.dp_rank * local : (model.dp_rank + 1) * local]
    sent = []
    for _ in range(steps):
        before = ctx.stats.link_snapshot()
        F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
        after = ctx.stats.link_snapshot()
        sent.append(
            {k: v.bytes_sent - before.get(k, plait.comm.OpTotals()).bytes_sent for k, v in after.items()}
        )
    runtime = model.plait_runtime
    reducer = getattr(runtime, "reducer", None)
    if isinstance(runtime, Stage3Runtime):  # its parameter all-gathers besides the reducer's bytes
        theory = runtime.theory_by_link()
    else:
        theory = reducer.theory_by_link() if reducer is not None else None
    return {
        "sent": sent[1:],  # the first step also broadcasts the order the buckets completed in
        "theory": theory,
        "theory_bytes": runtime.theory_bytes_per_step(),
    }


def test_hierarchical_ddp_on_two_hosts_of_two(reference):
    results = run_ranks(distributed_run, 4, plait.DDP(hierarchical=True), STEPS, env=TWO_HOSTS)
    for result in results:
        assert_matches_reference(result, reference, **FP32)


def test_hierarchical_cross_host_bytes_equal_the_two_level_formula():
    """Per link level, the bytes counted equal the formula; over the job, cross-host bytes are at
    most 2/3 of flat DDP's (a flat ring over A0 A1 B0 B1 crosses the hosts on 2 of its 4 links)."""
    two_level = run_ranks(link_bytes_run, 4, plait.DDP(hierarchical=True), 3, env=TWO_HOSTS)
    for result in two_level:
        for step in result["sent"]:
            assert step == result["theory"]
        assert sum(result["theory"].values()) == result["theory_bytes"]
    across = sum(r["sent"][-1]["inter-host"] for r in two_level)
    # flat ddp: the 2 ranks whose ring successor is on the other host each send 2(N-1)/N x B across
    # (counted so in tests/test_compression.py's two-level test)
    gradient_bytes = sum(p.numel() * 4 for p in make_model().parameters())
    flat_across = 2 * 2 * 3 * gradient_bytes // 4
    assert across <= 2 / 3 * flat_across + 16  # padding to the host's 2 ranks: a few bytes


def test_powersgd_across_hosts_bytes():
    strategy = plait.DDP(hierarchical=True, compression=plait.PowerSGD(rank=2))
    for result in run_ranks(link_bytes_run, 4, strategy, 3, env=TWO_HOSTS):
        for step in result["sent"]:
            assert step == result["theory"]
        # the cross-host stage is compressed: far below the plain two-level's B/L
        assert result["theory"]["inter-host"] < result["theory"]["intra-host"] / 4


def test_hsdp_zero3_on_two_hosts_of_two(reference):
    """zero3 hierarchical (sharded within each host, replicated across): flat zero3's losses and
    parameters, i.e. the reference's (DESIGN.md's fp32 tolerance)."""
    strategy = plait.Zero(stage=3, hierarchical=True)
    for result in run_ranks(distributed_run, 4, strategy, STEPS, env=TWO_HOSTS):
        assert_matches_reference(result, reference, **FP32)


def test_hsdp_zero3_keeps_parameter_traffic_within_the_host():
    """Per link level the counted bytes equal the formula: the parameter all-gathers and the gradient
    reduce-scatter run within the host; only the 1/L gradient shard crosses, 2(H-1)/H x B/L."""
    results = run_ranks(link_bytes_run, 4, plait.Zero(stage=3, hierarchical=True), 3, env=TWO_HOSTS)
    gradient_bytes = sum(p.numel() * 4 for p in make_model().parameters())
    for result in results:
        for step in result["sent"]:
            assert step == result["theory"]
        assert sum(result["theory"].values()) == result["theory_bytes"]
        assert result["theory"]["inter-host"] <= gradient_bytes // 2 + 16  # B/L at L = 2, H = 2


def test_hsdp_zero3_clips_by_the_global_norm():
    """Each host holds a whole sharded copy: the norm sums the host's shards once, not every host's."""
    expected, halved = _clipped_norm(None)
    for norm, after in run_ranks(_clipped_norm, 4, plait.Zero(stage=3, hierarchical=True), env=TWO_HOSTS):
        assert_close(norm, expected, rtol=1e-5, atol=0)
        assert_close(after, halved, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    ("world_size", "strategy"),
    [
        (2, plait.Zero(stage=3, compression=plait.PowerSGD(rank=64, min_compression_rate=0))),
        (
            4,
            plait.Zero(
                stage=3, hierarchical=True, compression=plait.PowerSGD(rank=64, min_compression_rate=0)
            ),
        ),
    ],
    ids=["zero3", "zero3-hsdp"],
)
def test_powersgd_at_full_rank_under_zero3_reproduces_uncompressed(world_size, strategy, sgd_reference):
    """Each unit's gradient averaged by PowerSGD at full rank (flat: over all ranks, then each keeps
    its shard; HSDP: the within-host shard compressed across hosts) equals the reference (tolerance
    as for ddp above)."""
    env = TWO_HOSTS if strategy.hierarchical else None
    for result in run_ranks(distributed_run, world_size, strategy, STEPS, "sgd", env=env):
        assert_matches_reference(result, sgd_reference, rtol=1e-4, atol=1e-5)
        assert result["memory"].buffers > 0  # Q and the residual are held: compression is on


def order1_chain(n: int, ids: int, seed: int) -> np.ndarray:
    """``n`` tokens of a Markov chain on ``ids`` ids: after each id, one of 4 seeded successors with
    probabilities 0.6/0.25/0.1/0.05. The model learns it through its embeddings in tens of steps
    (plait.data.synthetic's order-2 chain needs attention and hundreds of steps)."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, ids, (ids, 4))
    choices = rng.choice(4, n, p=[0.6, 0.25, 0.1, 0.05])
    tokens = np.zeros(n, dtype=np.int64)
    for t in range(1, n):
        tokens[t] = successors[tokens[t - 1], choices[t]]
    return tokens


TOKENS = order1_chain(40_000, 8, seed=3)
UNIGRAM_ENTROPY = float(-sum(p * np.log(p) for p in np.bincount(TOKENS) / len(TOKENS) if p > 0))
"""The loss of a model that only learned which ids occur (1.82 nats); the chain's own entropy is lower."""
LEARN_STEPS = 200
LEARN_BATCH = 32
LEARN_LR = 3e-3
"""AdamW's lr: at 1e-2 this model stalls near the unigram entropy for 100+ steps."""


SGD_LR = 0.3
"""Plain SGD's lr for the chain (uncompressed: 0.765 after 200 steps)."""


def val_loss_after(strategy: plait.Strategy, steps: int, optimizer: str = "adamw") -> dict:
    """Train on the chain's first 32k tokens (global batch 32 x 16), return the loss on its last 8k.

    ``optimizer``: "adamw" (lr LEARN_LR) or "sgd" (plain SGD, lr SGD_LR, no momentum).
    """
    plait.init()
    make_optimizer = {
        "adamw": lambda ps: plait.optim.AdamW(ps, lr=LEARN_LR),
        "sgd": lambda ps: plait.optim.SGD(ps, lr=SGD_LR),
    }[optimizer]
    model, opt = plait.setup(make_model(), strategy, make_optimizer)
    local = LEARN_BATCH // model.dp_size
    generator = np.random.default_rng(0)
    tokens = torch.from_numpy(TOKENS)
    for _ in range(steps):
        starts = generator.integers(0, 32_000 - 17, LEARN_BATCH)[model.dp_rank * local :][:local]
        batch = torch.stack([tokens[s : s + 17] for s in starts])
        F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    val = tokens[32_000:].unfold(0, 17, 17)[:400]
    with torch.no_grad():
        loss = F.cross_entropy(model(val[:, :-1]).flatten(0, 1), val[:, 1:].flatten()).item()
    return {"val": loss, "memory": plait.memory_report(model, opt)}


@pytest.fixture(scope="module")
def uncompressed_val():
    return run_ranks(val_loss_after, 2, "ddp", LEARN_STEPS)[0]["val"]


@pytest.mark.parametrize(
    "strategy",
    [
        plait.DDP(compression=plait.PowerSGD(rank=2)),
        plait.Zero(stage=2, compression=plait.PowerSGD(rank=2)),
        plait.Zero(stage=3, compression=plait.PowerSGD(rank=2)),
    ],
    ids=["ddp-powersgd", "zero2-powersgd", "zero3-powersgd"],
)
def test_error_feedback_reaches_the_uncompressed_val_loss(strategy, uncompressed_val):
    """DESIGN.md: with error feedback, within 3% of the uncompressed val loss in the same steps.

    Rank 2 is where error feedback decides it: measured 0.765 against 0.749 uncompressed, and 1.13
    with error_feedback=False. Sign is not here: under AdamW its error feedback trains worse than
    none (see the Sign test below, which runs it under plain SGD, where it pays).
    """
    compressed = run_ranks(val_loss_after, 2, strategy, LEARN_STEPS)
    assert uncompressed_val < 0.6 * UNIGRAM_ENTROPY  # it learned the transitions, not only which ids occur
    for result in compressed:
        assert result["val"] <= 1.03 * uncompressed_val


@pytest.mark.parametrize("stage", [0, 2], ids=["ddp", "zero2"])
def test_powersgd_under_bf16_mixed_precision(stage):
    """bf16 gradients are compressed in bf16: P, Q and the residual in the gradient's dtype (half the
    bytes on the wire, counted by the comm layer and equal to the formula, and half the memory of the
    fp32 run's), the QR in fp32; and it trains to within 3% of uncompressed bf16 ddp's val loss.

    Rank 4: measured 0.750 (ddp and zero2) against 0.750 uncompressed. At rank 2, where fp32 stays
    within 3% (above), bf16 ends at 0.801, 7% over, and no better with the compression computed in
    fp32 (0.824): bf16 training, not the compressor's arithmetic, needs the higher rank here.
    """

    def strategy(mixed_precision):
        compression = plait.PowerSGD(rank=4)
        if stage == 0:
            return plait.DDP(mixed_precision=mixed_precision, compression=compression)
        return plait.Zero(stage=stage, mixed_precision=mixed_precision, compression=compression)

    half, full = (run_ranks(link_bytes_run, 2, strategy(mp), 3) for mp in ("bf16", None))
    for result in half:
        for step in result["sent"]:
            assert sum(step.values()) == result["theory_bytes"]
    assert half[0]["theory_bytes"] * 2 == full[0]["theory_bytes"]
    trained = run_ranks(val_loss_after, 2, strategy("bf16"), LEARN_STEPS)
    uncompressed = run_ranks(val_loss_after, 2, plait.DDP(mixed_precision="bf16"), LEARN_STEPS)[0]["val"]
    fp32_buffers = run_ranks(val_loss_after, 2, strategy(None), 1)[0]["memory"].buffers
    assert uncompressed < 0.6 * UNIGRAM_ENTROPY
    for result in trained:
        assert result["val"] <= 1.03 * uncompressed
        assert result["memory"].buffers == pytest.approx(fp32_buffers / 2, rel=0.01)


def test_sign_with_error_feedback_reaches_the_uncompressed_val_loss_under_sgd():
    """EF-SignSGD's setting (Karimireddy et al. 2019: the compressed gradient applied by plain SGD):
    within 3% of uncompressed SGD, and better than the sign without error feedback.

    Measured (docs/benchmarks.md): uncompressed 0.765, Sign() 0.741, without error feedback 0.784.
    Under AdamW or momentum the same compressor with error feedback trains worse than without: the
    optimizer is not linear in the gradient, so what the residual hands back later is not applied as
    it would have been now, and the residual grows (11-14x the gradient's norm under AdamW).
    """
    plain = run_ranks(val_loss_after, 2, "ddp", LEARN_STEPS, "sgd")[0]["val"]
    signed = run_ranks(val_loss_after, 2, plait.DDP(compression=plait.Sign()), LEARN_STEPS, "sgd")
    unfed = run_ranks(
        val_loss_after, 2, plait.DDP(compression=plait.Sign(error_feedback=False)), LEARN_STEPS, "sgd"
    )[0]["val"]
    assert plain < 0.6 * UNIGRAM_ENTROPY
    for result in signed:
        assert result["val"] <= 1.03 * plain
        assert result["val"] < unfed


def test_plait_train_compress_flags_build_the_compressed_strategies():
    """--compress / --compress-rank (issue 13's spelling of --compression) and --hierarchical reach the
    strategy object plait train builds; misuse is one ConfigError naming the fix."""
    from plait.cli import train_config

    def strategy(*flags: str) -> plait.Strategy:
        return train_config(list(flags))[1].strategy

    zero2 = strategy(
        "--strategy", "zero2", "--compress", "powersgd", "--compress-rank", "2", "--hierarchical"
    )
    assert zero2 == plait.Zero(stage=2, compression=plait.PowerSGD(rank=2), hierarchical=True)
    assert strategy("--compress", "sign").compression == "sign"
    assert strategy("--compression", "bf16").compression == "bf16"
    with pytest.raises(plait.ConfigError, match="--compress-rank 2 needs --compress powersgd, not sign"):
        strategy("--compress", "sign", "--compress-rank", "2")
    with pytest.raises(plait.ConfigError, match="--compress takes none, bf16, powersgd or sign"):
        strategy("--compress", "gzip")
    with pytest.raises(plait.ConfigError, match="--compression is an option of strategy"):
        strategy("--strategy", "tp", "--compress", "bf16")


def test_powersgd_at_full_rank_on_a_meshs_dp_axis(sgd_reference):
    """dp2 x tp2: the dp strategy's compression runs on the mesh's dp axis (each tp shard's gradient
    compressed over its dp group) and at full rank reproduces the reference (tolerance as above)."""
    compressed = plait.DDP(compression=plait.PowerSGD(rank=64, min_compression_rate=0))
    strategy = plait.Hybrid(dp=2, tp=2, data_parallel=compressed)
    for result in run_ranks(distributed_run, 4, strategy, STEPS, "sgd"):
        assert_matches_reference(result, sgd_reference, rtol=1e-4, atol=1e-5)
        assert result["memory"].buffers > 0  # Q (and the residual) are held: compression is on
