"""How much memory this rank holds, and has needed."""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes of live tensor storage this rank holds, by role, and the process's peak."""

    parameters: int
    gradients: int
    optimizer_state: int
    master: int
    buffers: int
    """Communication buffers kept between steps (idle bucket buffers): residual state, not a model state."""
    peak_process: int

    @property
    def model_states(self) -> int:
        """What ZeRO partitions: parameters + gradients + optimizer state (with the fp32 master)."""
        return self.parameters + self.gradients + self.optimizer_state + self.master


def memory_report(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
    """Count the storage of the tensors actually alive, each storage once, in the first role that holds it.

    ``model_states`` (what ZeRO shards) sums the first four roles; ``buffers`` is reported beside them.

    Roles, in order: parameters (what the model computes with: under zero3 this rank's shards and any
    unit gathered right now), gradients (flat buffers, shards, buckets in the pool), optimizer state
    (``optimizer.state``), master (an fp32 copy the optimizer steps on, where it is not the parameters),
    buffers (bucket buffers a strategy keeps idle for the next backward: the ZeRO paper's "temporary
    buffers", a residual state whose size follows ``bucket_mb``, not the model).
    """
    runtime = getattr(model, "plait_runtime", None)  # what plait.setup returns carries its runtime
    if runtime is not None:
        tensors = runtime.memory_tensors()
    else:
        tensors = {
            "parameters": list(model.parameters()),
            "gradients": [p.grad for p in model.parameters() if p.grad is not None],
        }
    if optimizer is not None:
        tensors["optimizer_state"] = [
            t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)
        ]
    seen: set[int] = set()
    sizes = {}
    for role in ("parameters", "gradients", "optimizer_state", "master", "buffers"):
        total = 0
        for t in tensors.get(role, []):
            storage = t.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        sizes[role] = total
    return MemoryReport(**sizes, peak_process=peak_memory_bytes())
