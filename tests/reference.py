"""The single-process reference every strategy's parity test compares against.

``reference_run`` trains a small GPT on a fixed sequence of global batches in one process.
``distributed_run`` (run on every rank through the harness) trains the same model on the same global
batches under a strategy, each rank taking its slice of every batch, and returns what the parity
tests compare: the global mean loss of every step and the final full state dict.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.testing import assert_close

import plait
from plait.comm.stats import delta
from plait.models import GPT, GPTConfig

# bias=False: the key bias of attention gets a gradient that is exactly zero in theory (softmax ignores
# a constant added to every score of a row), so in practice it is rounding noise, which Adam's
# normalisation blows up to full-size updates in random directions: a parity test cannot use it.
CONFIG = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False)
# odd sizes: no bucket or unit divides evenly over 2 or 4 ranks, so the shards need padding
ODD = GPTConfig(vocab_size=61, block_size=15, n_layer=2, n_head=2, n_embd=30, dropout=0.0, bias=False)
# model parallelism: "deep" has 4 heads and 4 blocks to split 4 ways (tp=4, pp=4); "bias" checks
# the q|k|v bias split by heads and the replicated row-parallel bias (with SGD only: see above)
DEEP = GPTConfig(vocab_size=64, block_size=16, n_layer=4, n_head=4, n_embd=32, dropout=0.0, bias=False)
BIAS = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
CONFIGS = {"default": CONFIG, "odd": ODD, "deep": DEEP, "bias": BIAS}
GLOBAL_BATCH = 8

FP32 = dict(rtol=1e-5, atol=1e-6)
"""DESIGN.md: fp32 strategies agree with the reference to 1e-5 relative (only summation order differs)."""


def optimizer_factory(kind: str) -> Callable[[Any], torch.optim.Optimizer]:
    return {
        "adamw": lambda ps: plait.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        "sgd": lambda ps: plait.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
        "torch-sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
        "plain-sgd": lambda ps: plait.optim.SGD(ps, lr=0.05),
    }[kind]


def make_model(seed: int = 0, config: str = "default", freeze: tuple[str, ...] = ()) -> GPT:
    torch.manual_seed(seed)
    model = GPT(CONFIGS[config])
    for name, param in model.named_parameters():
        param.requires_grad_(name not in freeze)
    return model


def global_batches(
    steps: int, seed: int = 1234, config: str = "default"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    shape = CONFIGS[config]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, shape.vocab_size, (GLOBAL_BATCH, shape.block_size + 1), generator=generator)
        yield tokens[:, :-1], tokens[:, 1:]


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def reference_run(
    steps: int, optimizer: str = "adamw", config: str = "default", freeze: tuple[str, ...] = ()
) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = make_model(config=config, freeze=freeze)
    opt = optimizer_factory(optimizer)(model.parameters())
    losses = []
    for x, y in global_batches(steps, config=config):
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def distributed_run(
    strategy: str | plait.Strategy,
    steps: int,
    optimizer: str = "adamw",
    accumulate: int = 1,
    seed_by_rank: bool = False,
    config: str = "default",
    freeze: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Train under ``strategy`` on this rank's slice of each global batch.

    ``accumulate`` > 1 splits the slice into micro-batches, all but the last under ``model.no_sync()``.
    ``seed_by_rank`` initialises each rank's model differently, to show setup makes the replicas equal.
    Returns the global mean loss per step, the final full state dict, the bytes sent per step (and
    by op in the last step), the
    logits of an evaluation forward under ``torch.no_grad()``, and the memory report.
    """
    ctx = plait.init()
    model = make_model(ctx.rank if seed_by_rank else 0, config, freeze)
    model, opt = plait.setup(model, strategy, optimizer_factory(optimizer))
    rank, ranks = model.dp_rank, model.dp_size  # the ranks that train (a parameter server's do not)
    local = GLOBAL_BATCH // ranks
    losses, bytes_per_step = [], []
    for x, y in global_batches(steps, config=config):
        x, y = x[rank * local : (rank + 1) * local], y[rank * local : (rank + 1) * local]
        sent_before, ops_before = ctx.stats.bytes_sent, ctx.stats.snapshot()
        local_loss = 0.0
        for i, (xm, ym) in enumerate(zip(x.chunk(accumulate), y.chunk(accumulate))):
            last = i == accumulate - 1
            with contextlib.nullcontext() if last else model.no_sync():
                loss = loss_fn(model, xm, ym) / accumulate
                loss.backward()
            local_loss += loss.item()
        opt.step()
        opt.zero_grad()
        bytes_per_step.append(ctx.stats.bytes_sent - sent_before)
        op_bytes = {
            op: t.bytes_sent for op, t in delta(ctx.stats.snapshot(), ops_before).items() if t.bytes_sent
        }
        # the loss is reported outside plait's accounting, as a user's logging would be
        reported = torch.tensor([local_loss])
        dist.all_reduce(reported, group=getattr(model.plait_runtime.dp_group, "pg", None))
        losses.append(reported.item() / ranks)
    with torch.no_grad():
        evaluation = model(next(global_batches(1, seed=99, config=config))[0]).float()
    return {
        "losses": losses,
        "state": plait.full_state_dict(model),
        "bytes_per_step": bytes_per_step,
        "op_bytes": op_bytes,
        "theory_bytes": model.plait_runtime.theory_bytes_per_step(),
        "eval": evaluation,
        "memory": plait.memory_report(model, opt),
        "bucket_peak_bytes": getattr(getattr(model.plait_runtime, "pool", None), "peak_bytes", None),
    }


def reference_eval(state: dict[str, torch.Tensor], config: str = "default") -> torch.Tensor:
    """Logits of the evaluation batch ``distributed_run`` uses, from a single-process model with ``state``."""
    model = make_model(config=config)
    model.load_state_dict(state)
    with torch.no_grad():
        return model(next(global_batches(1, seed=99, config=config))[0])


def assert_matches_reference(result: dict[str, Any], reference: tuple, **tolerance: float) -> None:
    """Every step's loss and every final parameter (and buffer) agree with the reference."""
    losses, state = reference
    assert_close(torch.tensor(result["losses"]), torch.tensor(losses), **tolerance)
    assert result["state"].keys() == state.keys()
    for name in state:
        assert_close(
            result["state"][name].float(), state[name], **tolerance, msg=lambda m, n=name: f"{n}: {m}"
        )


def full_logits_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A user's loss_fn for ``train_step``: needs the whole (B, T, V) logits."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def train_step_run(
    strategy: str | plait.Strategy,
    steps: int,
    optimizer: str = "adamw",
    config: str = "default",
    full_logits: bool = False,
    microbatches: int = 1,
) -> dict[str, Any]:
    """``distributed_run`` through ``model.train_step`` (the loop a pipeline needs; every strategy runs it).

    ``full_logits`` passes :func:`full_logits_loss` instead of the default loss (which tensor
    parallelism computes on vocabulary shards). Returns the losses train_step reported, the final full
    state dict, the evaluation logits, the runtime's metrics, the bytes sent per step and the theory's.
    """
    ctx = plait.init()
    model, opt = plait.setup(make_model(0, config), strategy, optimizer_factory(optimizer))
    rank, local = model.dp_rank, GLOBAL_BATCH // model.dp_size
    losses, bytes_per_step = [], []
    loss_fn = full_logits_loss if full_logits else None
    for x, y in global_batches(steps, config=config):
        mine = slice(rank * local, (rank + 1) * local)
        sent_before = ctx.stats.bytes_sent
        losses.append(model.train_step(x[mine], y[mine], loss_fn, microbatches=microbatches))
        opt.step()
        opt.zero_grad()
        bytes_per_step.append(ctx.stats.bytes_sent - sent_before)
    with torch.no_grad():
        evaluation = model(next(global_batches(1, seed=99, config=config))[0])
    return {
        "losses": losses,
        "state": plait.full_state_dict(model),
        "eval": evaluation,
        "metrics": model.plait_runtime.metrics(),
        "bytes_per_step": bytes_per_step,
        "theory_bytes": model.plait_runtime.theory_bytes_per_step() + model.plait_runtime.loss_bytes(),
    }
