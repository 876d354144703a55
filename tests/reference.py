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

import plait
from plait.models import GPT, GPTConfig

# bias=False: the key bias of attention gets a gradient that is exactly zero in theory (softmax ignores
# a constant added to every score of a row), so in practice it is rounding noise, which Adam's
# normalisation blows up to full-size updates in random directions: a parity test cannot use it.
CONFIG = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False)
GLOBAL_BATCH = 8

FP32 = dict(rtol=1e-5, atol=1e-6)
"""DESIGN.md: fp32 strategies agree with the reference to 1e-5 relative (only summation order differs)."""


def optimizer_factory(kind: str) -> Callable[[Any], torch.optim.Optimizer]:
    return {
        "adamw": lambda ps: plait.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        "sgd": lambda ps: plait.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
        "torch-sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    }[kind]


def make_model(seed: int = 0, config: GPTConfig = CONFIG) -> GPT:
    torch.manual_seed(seed)
    return GPT(config)


def global_batches(
    steps: int, seed: int = 1234, config: GPTConfig = CONFIG
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(
            0, config.vocab_size, (GLOBAL_BATCH, config.block_size + 1), generator=generator
        )
        yield tokens[:, :-1], tokens[:, 1:]


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def reference_run(steps: int, optimizer: str = "adamw") -> tuple[list[float], dict[str, torch.Tensor]]:
    model = make_model()
    opt = optimizer_factory(optimizer)(model.parameters())
    losses = []
    for x, y in global_batches(steps):
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
) -> dict[str, Any]:
    """Train under ``strategy`` on this rank's slice of each global batch.

    ``accumulate`` > 1 splits the slice into micro-batches, all but the last under ``model.no_sync()``.
    ``seed_by_rank`` initialises each rank's model differently, to show setup makes the replicas equal.
    Returns the global mean loss per step, the final full state dict and the bytes sent per step.
    """
    ctx = plait.init()
    model, opt = plait.setup(
        make_model(ctx.rank if seed_by_rank else 0), strategy, optimizer_factory(optimizer)
    )
    local = GLOBAL_BATCH // ctx.world_size
    losses, bytes_per_step = [], []
    for x, y in global_batches(steps):
        x, y = x[ctx.rank * local : (ctx.rank + 1) * local], y[ctx.rank * local : (ctx.rank + 1) * local]
        sent_before = ctx.stats.bytes_sent
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
        # the loss is reported outside plait's accounting, as a user's logging would be
        reported = torch.tensor([local_loss])
        dist.all_reduce(reported)
        losses.append(reported.item() / ctx.world_size)
    runtime = model.plait_runtime
    return {
        "losses": losses,
        "state": plait.full_state_dict(model),
        "bytes_per_step": bytes_per_step,
        "theory_bytes": runtime.theory_bytes_per_step(),
    }
