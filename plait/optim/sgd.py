"""SGD with momentum, Nesterov momentum and weight decay, over flat buffers.

For each flat run, with g the gradient (plus wd * p when weight decay is on):

    b <- g                                     on the first step
    b <- momentum * b + (1 - dampening) * g    afterwards
    d <- g + momentum * b   (nesterov)   or   d <- b
    p <- p - lr * d

The fused path is torch's fused SGD kernel over the whole run; the textbook path is the same update
in tensor operations (the reference, and the fallback).
"""

from __future__ import annotations

from typing import Any

import torch

from plait.errors import ConfigError
from plait.optim.flat import FlatOptimizer, fused_kernels_available


class SGD(FlatOptimizer):
    """``torch.optim.SGD``'s arguments and results, with one fused update per flat run."""

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        fused: bool | None = None,
    ) -> None:
        if lr < 0:
            raise ConfigError(f"lr={lr} must be >= 0")
        if momentum < 0 or weight_decay < 0:
            raise ConfigError(f"momentum={momentum} and weight_decay={weight_decay} must be >= 0")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ConfigError(
                f"nesterov=True needs momentum > 0 and dampening == 0 (got momentum={momentum}, dampening={dampening})"
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            fused=fused,
        )
        super().__init__(params, defaults)
        self.state_names = ("momentum_buffer",) if momentum else ()

    def update(
        self, group: dict[str, Any], param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor]
    ) -> None:
        first = bool(state["step"] == 0)
        state["step"] += 1
        momentum = group["momentum"]
        if self.defaults["fused"] is not False and fused_kernels_available(param):
            torch._fused_sgd_(
                [param],
                [grad],
                [state["momentum_buffer"]] if momentum else [],
                weight_decay=group["weight_decay"],
                momentum=momentum,
                lr=group["lr"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                maximize=group["maximize"],
                is_first_step=first,
            )
        else:
            textbook_sgd(group, param, grad, state, first)


def textbook_sgd(
    group: dict[str, Any],
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, torch.Tensor],
    first: bool,
) -> None:
    """The SGD update as torch's single-tensor implementation writes it."""
    if group["maximize"]:
        grad = -grad
    if group["weight_decay"]:
        grad = grad.add(param, alpha=group["weight_decay"])
    momentum = group["momentum"]
    if momentum:
        buffer = state["momentum_buffer"]
        if first:
            buffer.copy_(grad)
        else:
            buffer.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
        grad = grad.add(buffer, alpha=momentum) if group["nesterov"] else buffer
    param.add_(grad, alpha=-group["lr"])
