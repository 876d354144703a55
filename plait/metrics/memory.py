"""How much memory this rank has needed."""

from __future__ import annotations

import resource

import torch


def peak_memory_bytes(device: torch.device | None = None) -> int:
    """Peak memory of this rank so far: the CUDA allocator's peak on a GPU, else the process's peak RSS.

    RSS counts everything the process touched (the Python interpreter and torch's libraries too, a few
    hundred MB), so compare ranks and strategies with each other rather than with tensor sizes.
    """
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
