"""AdamW (Loshchilov & Hutter, 2019) over flat buffers.

For each flat run (normally one per parameter group), with g the gradient and t the step:

    p <- p * (1 - lr * wd)                          decoupled weight decay
    m <- b1 * m + (1 - b1) * g
    v <- b2 * v + (1 - b2) * g * g
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

The fused path hands the whole run to torch's fused AdamW kernel (the one behind
``torch.optim.AdamW(fused=True)``): one pass over memory for the whole model instead of one kernel
launch per parameter. The textbook path spells the same update out in tensor operations; it is the
reference the fused path is tested against, and the fallback where no fused kernel exists.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from plait.errors import ConfigError
from plait.optim.flat import FlatOptimizer, fused_kernels_available


class AdamW(FlatOptimizer):
    """``torch.optim.AdamW``'s arguments and results, with one fused update per flat run.

    ``fused=None`` uses the fused kernel where torch has one for the device; ``fused=False`` forces
    the textbook tensor-operation path.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        maximize: bool = False,
        fused: bool | None = None,
    ) -> None:
        if lr < 0:
            raise ConfigError(f"lr={lr} must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ConfigError(f"betas={betas} must each be in [0, 1)")
        if eps < 0:
            raise ConfigError(f"eps={eps} must be >= 0")
        if weight_decay < 0:
            raise ConfigError(f"weight_decay={weight_decay} must be >= 0")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            fused=fused,
        )
        super().__init__(params, defaults)
        self.state_names = (
            ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg", "exp_avg_sq")
        )

    def update(
        self, group: dict[str, Any], param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor]
    ) -> None:
        state["step"] += 1
        if self.defaults["fused"] is not False and fused_kernels_available(param):
            torch._fused_adamw_(
                [param],
                [grad],
                [state["exp_avg"]],
                [state["exp_avg_sq"]],
                [state["max_exp_avg_sq"]] if group["amsgrad"] else [],
                [state["step"]],
                amsgrad=group["amsgrad"],
                lr=group["lr"],
                beta1=group["betas"][0],
                beta2=group["betas"][1],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
            )
        else:
            textbook_adamw(group, param, grad, state)


def textbook_adamw(
    group: dict[str, Any], param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor]
) -> None:
    """The AdamW update as torch's single-tensor implementation writes it (``state["step"]`` already advanced)."""
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    step = float(state["step"])
    if group["maximize"]:
        grad = -grad
    param.mul_(1 - lr * group["weight_decay"])
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    second_moment = state["exp_avg_sq"]
    if group["amsgrad"]:
        torch.maximum(state["max_exp_avg_sq"], second_moment, out=state["max_exp_avg_sq"])
        second_moment = state["max_exp_avg_sq"]
    denom = (second_moment.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    param.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))
