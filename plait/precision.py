"""Names of dtypes as users write them, and the one place that parses them."""

from __future__ import annotations

import torch

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
