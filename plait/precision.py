"""The one dtype policy every strategy follows, and fp16's dynamic loss scaling.

With ``mixed_precision="bf16"`` (or ``"fp16"``), for every strategy (ddp, zero1/2/3):

==============  ===========================================================================
params          the model's parameters are stored in the compute dtype (bf16/fp16): forward
                and backward run in it; under zero3 each rank stores 1/N of them
grads           autograd produces them in the compute dtype; micro-steps under ``no_sync``
                accumulate in the compute dtype
communication   gradients travel in the compute dtype (pre-divided by N, so fp16 cannot
                overflow in the sum); zero1/2/3 all-gather parameters in the compute dtype
master          an fp32 copy of the parameters this rank updates (all of them under ddp, its
                1/N shard under zero): the optimizer steps on it, with fp32 gradients (the
                reduced gradient, upcast) and fp32 state; the compute copy is refreshed from it
==============  ===========================================================================

Without ``mixed_precision`` everything is in the parameters' own dtype and there is no separate
master copy: ddp steps on the flat parameters, zero1/2 on the model's own shard of each bucket and
zero3 on its parameter shard, in place.

fp16 adds dynamic loss scaling (Micikevicius et al., 2018): the gradient entering the model's
output is multiplied by ``scale``; the master gradient is divided by it. A step whose gradients hold
an inf or nan on any rank is skipped (parameters and optimizer state untouched) and the scale halves;
after ``growth_interval`` good steps it doubles.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from plait.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(value: str | torch.dtype | None, what: str) -> torch.dtype | None:
    """``"bf16"`` -> ``torch.bfloat16``; None stays None; anything else is a ConfigError naming ``what``."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ConfigError(
            f"{what}={value!r} is not a dtype plait knows; use one of {sorted(set(DTYPES))} or None"
        )
    return DTYPES[value]


def parse_mixed_precision(value: str | None) -> torch.dtype | None:
    """The compute dtype of ``mixed_precision="bf16" | "fp16"``; None (or "fp32") means no mixed precision."""
    if value in (None, "fp32", "float32"):
        return None
    if value not in ("bf16", "bfloat16", "fp16", "float16"):
        raise ConfigError(f"mixed_precision={value!r} is not supported; use 'bf16', 'fp16' or None")
    return DTYPES[value]


@dataclasses.dataclass
class DynamicLossScaler:
    """fp16 loss scaling: grow the scale while gradients stay finite, halve it and skip the step when not."""

    scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    good_steps: int = 0
    skipped_steps: int = 0

    def update(self, found_inf: bool) -> None:
        """Adjust the scale after a step whose gradients were (not) finite."""
        if found_inf:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            self.skipped_steps += 1
        else:
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale *= self.growth_factor


def nonfinite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 1-element float tensor: 1.0 if any element of ``tensors`` is inf or nan, else 0.0 (no host sync)."""
    flags = [torch.logical_not(torch.isfinite(t)).any() for t in tensors if t.numel()]
    if not flags:
        return torch.zeros(1)
    return torch.stack(flags).any().float().reshape(1)


def unscale_and_check(grad: torch.Tensor, scaler: DynamicLossScaler, group: Any) -> bool:
    """fp16: divide ``grad`` by the loss scale and update the scale; True if any rank of ``group`` saw inf/nan.

    One 4-byte all-reduce (max) on ``group``, so every rank skips the same step.
    """
    grad.div_(scaler.scale)
    found = nonfinite([grad])
    group.all_reduce(found, op="max")
    found_inf = bool(found.item())
    scaler.update(found_inf)
    return found_inf


def scale_output_gradients(module: nn.Module, scaler: DynamicLossScaler) -> None:
    """fp16 loss scaling without touching the user's loop: the gradient entering each output is multiplied by the scale."""

    def scale(grad: torch.Tensor) -> torch.Tensor:
        return grad * scaler.scale

    def after_forward(_module: nn.Module, _inputs: Any, output: Any) -> None:
        for tensor in torch.utils._pytree.tree_leaves(output):
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                tensor.register_hook(scale)

    module.register_forward_hook(after_forward)
