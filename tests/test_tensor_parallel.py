"""Tensor parallelism: the region operators and layers against plain torch, GPT parity with the
single-process reference at tp=2 and tp=4, a user's own plan, and the configuration errors."""

import collections
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import plait
from plait.comm.stats import bus_bytes
from plait.strategies import tensor_parallel as tp
from plait.strategies import tp_ops
from tests.harness import run_ranks
from tests.reference import (
    CONFIG,
    FP32,
    GLOBAL_BATCH,
    assert_matches_reference,
    distributed_run,
    full_logits_loss,
    global_batches,
    make_model,
    reference_eval,
    reference_run,
    train_step_run,
)

STEPS = 4
# SGD (momentum, Nesterov, weight decay) is linear in the gradient, so the few-ulp differences that
# splitting matmuls makes stay that small; see test_adamw_parity for Adam
OPTIMIZER = "sgd"


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _layers_against_torch() -> dict[str, float]:
    """Each tensor-parallel piece beside the torch op it splits: the largest difference of each, relative."""
    ctx = plait.init()
    group = ctx.world
    torch.manual_seed(0)  # every rank draws the same whole tensors, then keeps its slice
    errors = {}

    x = torch.randn(3, 5, 8, requires_grad=True)
    weight = torch.randn(12, 8)
    column = tp.ColumnParallelLinear(
        nn.Parameter(tp.shard_tensor(weight, 0, 1, group.rank, group.size)), None, group, True
    )
    y = column(x)
    (y * torch.arange(12.0)).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.linear(x_ref, weight)
    (y_ref * torch.arange(12.0)).sum().backward()
    errors["column forward"] = _relative(y, y_ref)
    errors["column input grad"] = _relative(x.grad, x_ref.grad)

    x.grad, x_ref.grad = None, None
    bias = torch.randn(12)
    row = tp.RowParallelLinear(
        nn.Parameter(tp.shard_tensor(weight, 1, 1, group.rank, group.size)),
        nn.Parameter(bias),
        group,
        input_is_parallel=False,  # x is whole: each rank takes its slice of the last dim (scatter)
    )
    z = row(x)
    z.square().sum().backward()
    z_ref = F.linear(x_ref, weight, bias)
    z_ref.square().sum().backward()
    errors["row forward"] = _relative(z, z_ref)
    errors["row input grad"] = _relative(x.grad, x_ref.grad)

    table = torch.randn(10, 4)
    embedding = tp.VocabParallelEmbedding(
        nn.Parameter(tp.shard_tensor(table, 0, 1, group.rank, group.size)), group
    )
    ids = torch.randint(0, 10, (3, 5))
    errors["vocab embedding"] = (embedding(ids) - F.embedding(ids, table)).abs().max().item()

    logits, targets = torch.randn(3, 5, 10), torch.randint(0, 10, (3, 5))
    local = tp.shard_tensor(logits, 2, 1, group.rank, group.size).requires_grad_()
    loss = tp_ops.vocab_parallel_cross_entropy(local, targets, group)
    loss.backward()
    whole = logits.clone().requires_grad_()
    loss_ref = F.cross_entropy(whole.flatten(0, 1), targets.flatten())
    loss_ref.backward()
    errors["vocab cross-entropy"] = abs(loss.item() / loss_ref.item() - 1)
    errors["vocab cross-entropy grad"] = (
        (local.grad - tp.shard_tensor(whole.grad, 2, 1, group.rank, group.size)).abs().max().item()
    )
    return errors


def test_region_operators_and_layers_match_torch():
    for errors in run_ranks(_layers_against_torch, 2):
        assert max(errors.values()) < 1e-5, errors


def test_shard_and_unshard_are_inverse_and_split_qkv_by_heads():
    whole = torch.arange(24.0).view(12, 2)  # q | k | v, 4 rows each
    shards = [tp.shard_tensor(whole, 0, 3, r, 2) for r in range(2)]
    assert shards[1][:, 0].tolist() == [4.0, 6.0, 12.0, 14.0, 20.0, 22.0]  # second half of q, of k, of v
    assert torch.equal(tp.unshard_tensor(torch.stack(shards), 0, 3), whole)
    columns = [tp.shard_tensor(whole, 1, 1, r, 2) for r in range(2)]
    assert torch.equal(tp.unshard_tensor(torch.stack(columns), 1, 1), whole)


@pytest.mark.parametrize(("size", "config"), [(2, "default"), (4, "deep")])
def test_tp_matches_single_process(size, config):
    """The plain loop (model(x) returns whole logits, loss.backward()) and the eval forward."""
    reference = reference_run(STEPS, OPTIMIZER, config)
    results = run_ranks(
        distributed_run, size, plait.TensorParallel(size=size), STEPS, OPTIMIZER, 1, False, config
    )
    for result in results:
        assert_matches_reference(result, reference, **FP32)
        assert_close(result["eval"], reference_eval(reference[1], config), **FP32)


@pytest.mark.parametrize("full_logits", [False, True])
def test_train_step_with_vocab_parallel_or_full_logits_loss(full_logits):
    reference = reference_run(STEPS, OPTIMIZER)
    results = run_ranks(train_step_run, 2, "tp", STEPS, OPTIMIZER, "default", full_logits)
    for result in results:
        assert_matches_reference(result, reference, **FP32)


def _one_step_ops(full_logits: bool) -> dict:
    """The ops (kind, elements) of one tp=2 ``train_step`` and the bytes this rank sent in it."""
    ctx = plait.init()
    model, _ = plait.setup(make_model(), plait.TensorParallel(size=2), lambda ps: torch.optim.SGD(ps, lr=0.1))
    x, y = next(global_batches(1))
    before = ctx.stats.records()[-1].seq if ctx.stats.records() else -1
    sent = ctx.stats.bytes_sent
    model.train_step(x, y, full_logits_loss if full_logits else None)
    ops = [(r.op, r.nbytes // 4) for r in ctx.stats.records() if r.seq > before]
    return {"ops": ops, "bytes": ctx.stats.bytes_sent - sent}


def test_the_default_loss_never_gathers_the_logits():
    """Default loss: the two all-reduces of the vocabulary-parallel cross-entropy (N and 2N elements,
    N = B x T tokens), never the (B, T, V) logits; a user's full-logit loss gathers them once.
    The bytes differ by exactly that gather less those all-reduces."""
    (vocab, _), (full, _) = (run_ranks(_one_step_ops, 2, f) for f in (False, True))
    n, v = GLOBAL_BATCH * CONFIG.block_size, CONFIG.vocab_size
    only_vocab = collections.Counter(vocab["ops"]) - collections.Counter(full["ops"])
    only_full = collections.Counter(full["ops"]) - collections.Counter(vocab["ops"])
    assert only_vocab == {("all_reduce", n): 1, ("all_reduce", 2 * n): 1}, only_vocab
    assert only_full == {("all_gather", n * v): 1}, only_full
    gather = bus_bytes("all_gather", n * v * 4, 2)
    reduces = bus_bytes("all_reduce", n * 4, 2) + bus_bytes("all_reduce", 2 * n * 4, 2)
    assert full["bytes"] - vocab["bytes"] == gather - reduces


def test_adamw_parity():
    """Adam divides each gradient element by its own running magnitude: where that is small, a rounding
    difference of a few ulps in the gradient becomes a larger one in the update. Losses still agree to
    1e-5 relative; parameters to 1e-5 absolute, a thousandth of one Adam step (lr=1e-2)."""
    reference = reference_run(STEPS, "adamw")
    for result in run_ranks(train_step_run, 2, "tp", STEPS, "adamw"):
        assert_close(torch.tensor(result["losses"]), torch.tensor(reference[0]), **FP32)
        assert_matches_reference(result, reference, rtol=1e-5, atol=1e-5)


def test_biases_split_by_heads_and_replicated_after_row():
    reference = reference_run(STEPS, OPTIMIZER, "bias")
    for result in run_ranks(train_step_run, 2, "tp", STEPS, OPTIMIZER, "bias"):
        assert_matches_reference(result, reference, **FP32)


def _layout_after_setup() -> dict:
    plait.init()
    model, _ = plait.setup(make_model(), plait.TensorParallel(size=2))
    return {
        "tied": model.transformer.wte.weight is model.lm_head.weight,
        "shape": tuple(model.lm_head.weight.shape),
        "heads": model.transformer.h[0].attn.n_head,
        "qkv": tuple(model.transformer.h[0].attn.c_attn.weight.shape),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def test_tied_embedding_stays_one_vocab_parallel_parameter():
    whole = make_model()
    for layout in run_ranks(_layout_after_setup, 2):
        assert layout["tied"]
        assert layout["shape"] == (32, 32)  # vocab 64 / 2
        assert layout["heads"] == 1
        assert layout["qkv"] == (48, 32)
    # every weight matrix is halved; LayerNorms and position embeddings (16 x 32) are replicated
    replicated = sum(p.numel() for n, p in whole.named_parameters() if "ln" in n or "wpe" in n)
    assert layout["parameters"] == (whole.num_params() - replicated) // 2 + replicated


class TwoLayer(nn.Module):
    """A user's model: no plan of its own."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _user_plan_run(plan: dict | None) -> tuple[list[float], dict]:
    plait.init()
    strategy = plait.TensorParallel(size=plait.current().world_size, plan=plan) if plan else "none"
    model, opt = plait.setup(TwoLayer(), strategy, lambda ps: torch.optim.SGD(ps, lr=0.1))
    generator = torch.Generator().manual_seed(5)
    losses = []
    for _ in range(3):
        x, y = torch.randn(8, 6, generator=generator), torch.randn(8, 2, generator=generator)
        losses.append(model.train_step(x, y, F.mse_loss))
        opt.step()
        opt.zero_grad()
    return losses, plait.full_state_dict(model)


def test_a_users_plan_for_their_own_model():
    plan = {"fc1": "col", "fc2": "row"}
    reference = run_ranks(_user_plan_run, 1, None)[0]
    for result in run_ranks(_user_plan_run, 2, plan):
        assert_matches_reference({"losses": result[0], "state": result[1]}, reference, **FP32)


@pytest.mark.parametrize(
    ("world", "strategy", "config", "fragment"),
    [
        (
            4,
            plait.TensorParallel(size=4),
            "default",
            r"n_head=2 is not divisible by tp=4; use tp in \{1, 2\}",
        ),
        (
            2,
            plait.TensorParallel(size=2),
            "odd",
            r"vocab_size=61 is not divisible by tp=2; use tp in \{1, 61\}",
        ),
        (
            4,
            plait.TensorParallel(size=3),
            "default",
            r"tp=3 does not divide the world size 4; use size in \{1, 2, 4\}",
        ),
        (2, plait.TensorParallel(plan={"lm_hed": "vocab"}), "default", r"\['lm_hed'\] match no module"),
        (2, plait.TensorParallel(plan={"lm_head": "rows"}), "default", r"'rows' is not a style"),
        (
            2,
            plait.TensorParallel(plan={"transformer.ln_f": "col"}),
            "default",
            r"'col' does not apply to LayerNorm",
        ),
    ],
)
def test_configuration_errors_name_the_value_and_what_fits(world, strategy, config, fragment):
    ctx = types.SimpleNamespace(world_size=world)
    with pytest.raises(plait.ConfigError, match=fragment):
        strategy.validate(ctx, make_model(config=config))
