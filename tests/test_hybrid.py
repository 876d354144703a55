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


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_dp2_x_tp2_plain_loop(zero, reference):
    """model(x) and loss.backward(): tp's collectives in forward/backward, then DDP / ZeRO-2 on the dp axis."""
    results = run_ranks(distributed_run, 4, plait.Hybrid(dp=2, tp=2, zero=zero), STEPS, OPTIMIZER)
    for result in results:
        assert_matches_reference(result, reference, **FP32)


@pytest.mark.parametrize("zero", [0, 1, 3])
def test_dp2_x_pp2(zero, reference):
    """zero=3 in a pipeline: units gathered by the stage's own modules, full gradients under no_sync
    through the schedule, the tied gradient summed across stages, then reduce-scattered on dp."""
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
        (
            6,
            dict(dp=1, tp=4),
            r"tp=4 x pp=1 = 4 does not divide the world size 6; use tp x pp in \{1, 2, 3, 6\}",
        ),
        (4, dict(tp=2, pp=2, microbatches=1), r"microbatches=1 is fewer than pp=2"),
        (
            2,
            dict(tp=2, pp=1, plan={"lm_head": "col", "nothing.*": "row"}),
            r"\['nothing.\*'\] match no module",
        ),
    ],
)
def test_configuration_errors(world, arguments, fragment):
    """Degrees are checked against the world once (``plait.comm.mesh.mesh_sizes``)."""
    with pytest.raises(plait.ConfigError, match=fragment):
        plait.Hybrid(**arguments).validate(types.SimpleNamespace(world_size=world), make_model())


def test_errors_of_the_data_parallel_axis():
    with pytest.raises(plait.ConfigError, match=r"zero=4 is not a ZeRO stage; use zero in \{0, 1, 2, 3\}"):
        plait.Hybrid(zero=4)
    with pytest.raises(plait.ConfigError, match=r"set them on the data_parallel object only"):
        plait.Hybrid(zero=1, data_parallel=plait.Zero(stage=2))
    with pytest.raises(plait.ConfigError, match=r"data_parallel=.*cannot run on a mesh's dp axis"):
        plait.Hybrid(data_parallel=plait.LocalSGD())


@pytest.mark.parametrize(
    "strategy",
    [
        plait.Hybrid(dp=2, tp=2, mixed_precision="bf16"),
        plait.Hybrid(dp=2, pp=2, microbatches=2, data_parallel=plait.Zero(stage=3, mixed_precision="bf16")),
    ],
    ids=["dp2xtp2-ddp", "dp2xpp2-zero3"],
)
def test_bf16_mixed_precision_in_a_mesh(strategy, reference):
    """bf16 compute, bf16 activations between stages, an fp32 master: within a few 1e-3 of fp32."""
    for result in run_ranks(train_step_run, 4, strategy, STEPS, OPTIMIZER):
        assert_matches_reference(result, reference, rtol=1e-2, atol=5e-3)


def _dp_axis_traffic(strategy: plait.Strategy) -> dict:
    """The dp axis's theory bytes and the all-reduces one train_step issues on each group."""
    ctx = plait.init()
    model, _ = plait.setup(make_model(), strategy, lambda ps: torch.optim.SGD(ps, lr=0.1))
    x, y = next(global_batches(1))
    local = GLOBAL_BATCH // model.dp_size
    mine = slice(model.dp_rank * local, (model.dp_rank + 1) * local)
    before = ctx.stats.records()[-1].seq if ctx.stats.records() else -1
    model.train_step(x[mine], y[mine])
    ops = [(r.op, r.group) for r in ctx.stats.records() if r.seq > before]
    return {
        "theory": model.plait_runtime.theory_bytes_per_step(),
        "mesh": model.plait_runtime.mesh_sizes(),
        "ops": ops,
    }


def test_the_dp_axis_honours_the_users_data_parallel_object():
    """bucket_mb and grad_dtype of data_parallel=plait.DDP(...) reach the mesh's dp axis."""
    plain, tuned = (
        run_ranks(_dp_axis_traffic, 4, plait.Hybrid(dp=2, tp=2, data_parallel=ddp))[0]
        for ddp in (plait.DDP(), plait.DDP(bucket_mb=0.001, grad_dtype="bf16"))
    )
    assert tuned["theory"] == plain["theory"] // 2  # bf16 messages
    dp_reduces = [sum(op == ("all_reduce", "dp") for op in r["ops"]) for r in (plain, tuned)]
    assert dp_reduces[1] > dp_reduces[0] + 5  # many small buckets
    assert plain["mesh"] == {"dp": 2, "pp": 1, "tp": 2}


def test_a_pipeline_step_reduces_its_loss_once():
    """dp2 x pp2: the loss and the bubble figures travel in one all-gather on the world; nothing else
    leaves the stages but activations, the tied gradient and the dp axis's buckets."""
    (result,) = run_ranks(_dp_axis_traffic, 4, plait.Hybrid(dp=2, pp=2, microbatches=2))[:1]
    assert [op for op in result["ops"] if op[1] == "world"] == [("all_gather", "world")]
    small = [op for op in result["ops"] if op[0] in ("all_reduce", "all_gather") and op[1] == "pp"]
    assert small == []


def _mesh_hosts(dp: int | None, pp: int, tp: int) -> dict:
    """A mesh on 2 hosts of 2 ranks: where each axis lies, and the dp axis's host groups at work."""
    from plait.comm import Mesh

    ctx = plait.init()
    mesh = Mesh(ctx, dp, pp, tp, local_world_size=2)
    within, across = mesh.host_groups("dp")
    total = torch.tensor([float(ctx.rank)])
    within.all_reduce(total)
    across.all_reduce(total)  # within then across: the sum over the whole dp axis
    return {
        "sizes": mesh.sizes,
        "host": mesh.host_of(ctx.rank),
        "host_ranks": mesh.host_ranks(),
        "within": {axis: mesh.within_host(axis) for axis in ("dp", "pp", "tp")},
        "split": mesh.host_split("dp"),
        "sum": total.item(),
    }


def test_mesh_knows_hosts_and_splits_the_dp_axis_by_them():
    for rank, layout in enumerate(run_ranks(_mesh_hosts, 4, None, 1, 1)):
        assert layout["sizes"] == {"dp": 4, "pp": 1, "tp": 1}  # dp=None: the ranks left over
        assert layout["host"] == rank // 2 and layout["host_ranks"] == [rank // 2 * 2, rank // 2 * 2 + 1]
        assert layout["within"] == {"dp": False, "pp": True, "tp": True}
        assert layout["split"] == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
        assert layout["sum"] == 0 + 1 + 2 + 3
    for rank, layout in enumerate(run_ranks(_mesh_hosts, 4, 2, 1, 2)):
        assert layout["within"] == {"dp": False, "pp": True, "tp": True}  # tp pairs share a host
        assert layout["split"] == ([[0], [2], [1], [3]], [[0, 2], [1, 3]])
        assert layout["sum"] == (0 + 2 if rank % 2 == 0 else 1 + 3)


def test_mesh_errors():
    from plait.comm.mesh import mesh_sizes, ranks_per_host

    assert mesh_sizes(8, None, 2, 2) == {"dp": 2, "pp": 2, "tp": 2}
    with pytest.raises(plait.ConfigError, match=r"tp=0 must be a positive integer"):
        mesh_sizes(4, None, 1, 0)
    with pytest.raises(
        plait.ConfigError, match=r"tp=3 does not divide the world size 4; use size in \{1, 2, 4\}"
    ):
        mesh_sizes(4, tp=3, option="size")
    with pytest.raises(plait.ConfigError, match=r"local_world_size=3 does not divide the world size 4"):
        ranks_per_host(4, 3)
