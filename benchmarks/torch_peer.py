"""torch DDP (and its PowerSGD hook) inside plait's own trainer: the peer of ``plait train --strategy ddp``.

    python -m torch.distributed.run --nproc-per-node 2 benchmarks/torch_peer.py [--powersgd-rank 4] \
        -- --model gpt-bench-7m --steps 300 --run-dir runs/torch-ddp ...

Everything but the gradient's communication is ``plait train``'s: the flags after ``--`` are its
own (read by ``plait.cli.train_config``), the data, model, optimizer, schedule, clipping, evaluation
and metrics.jsonl are the trainer's, and only the strategy is swapped for :class:`TorchDDP`, which
wraps the model in ``torch.nn.parallel.DistributedDataParallel`` (default buckets; with
``--powersgd-rank`` one bucket and torch's ``powerSGD_hook``: with several buckets it aborts on
gloo, shared/FACTS.md). A time-to-loss race against it (benchmarks/link_race.py) then compares
communication alone. torch's collectives bypass plait's comm layer, so metrics.jsonl's
``bytes_sent`` counts only the loss and evaluation all-reduces.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import ClassVar

import torch
from torch import nn

import plait
from plait.comm import Context
from plait.strategies.base import LossFunction, Runtime, token_cross_entropy


@dataclasses.dataclass(frozen=True)
class TorchDDP(plait.DDP):
    """torch's DistributedDataParallel as a plait strategy (a benchmark peer, not part of plait).

    A subclass of plait.DDP only so that the run's config (written for ``--strategy ddp``) still
    reads; none of DDP's options is used.
    """

    name: ClassVar[str] = "torch-ddp"
    powersgd_rank: int | None = None
    """Register torch's PowerSGD hook at this rank (one bucket, ``start_powerSGD_iter=2``); None: plain DDP."""

    def apply(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, ctx: Context) -> Runtime:
        return _TorchDDPRuntime(self, model, optimizer)


class _TorchDDPRuntime(Runtime):
    theory = "torch DDP: fp32 ring all-reduce of the gradient (PowerSGD hook: its factors)"

    def __init__(
        self, strategy: TorchDDP, module: nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
        from torch.nn.parallel import DistributedDataParallel

        super().__init__(strategy, module, optimizer)
        if strategy.powersgd_rank is None:
            self.ddp = DistributedDataParallel(module)
        else:
            gradient_mb = sum(p.numel() for p in module.parameters()) * 4 / 2**20
            self.ddp = DistributedDataParallel(module, bucket_cap_mb=math.ceil(gradient_mb) + 16)
            state = powersgd.PowerSGDState(
                None, matrix_approximation_rank=strategy.powersgd_rank, start_powerSGD_iter=2
            )
            self.ddp.register_comm_hook(state, powersgd.powerSGD_hook)

    def no_sync(self):
        return self.ddp.no_sync()

    def forward_loss(
        self, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFunction | None
    ) -> torch.Tensor:
        if not torch.is_grad_enabled() or not self.module.training:  # evaluation: no reducer involved
            return (loss_fn or token_cross_entropy)(self.module(inputs), targets)
        return (loss_fn or token_cross_entropy)(self.ddp(inputs), targets)


def main() -> None:
    from plait.cli import train_config
    from plait.train import Trainer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--powersgd-rank", type=int)
    args, rest = parser.parse_known_args(sys.argv[1:])  # torchrun may drop the "--" before plait's flags
    _, config = train_config([a for a in rest if a != "--"])
    if config.train.strategy != "ddp":
        raise SystemExit(f"torch_peer.py replaces --strategy ddp; got --strategy {config.train.strategy}")
    config = dataclasses.replace(config, strategy=TorchDDP(powersgd_rank=args.powersgd_rank))
    Trainer(config).fit()
    plait.shutdown(exit_code=0)


if __name__ == "__main__":
    main()
