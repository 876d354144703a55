"""Reusable scratch memory for collectives and buckets.

A training step allocates the same large temporaries every time (an all-to-all's receive buffer,
a bucket's gradient). Freshly allocated large buffers cost page faults on every step (all the more
when glibc hands big allocations straight back to the OS, as it does with a pinned
``MALLOC_MMAP_THRESHOLD_``), so they are kept and handed out again: any buffer at least as large
as the request serves it (as a view), and at most ``keep`` idle buffers, ``keep_bytes`` in all, are
retained (a rare huge buffer is not worth holding between steps).
"""

from __future__ import annotations

import torch


class BufferPool:
    """Idle 1-D buffers to hand out again; ``peak_bytes`` is the most it has held at once."""

    def __init__(self, keep: int = 2, keep_bytes: int = 64 * 2**20) -> None:
        self.keep = keep
        self.keep_bytes = keep_bytes
        self._idle: list[torch.Tensor] = []
        self._held = 0
        self.peak_bytes = 0

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor of ``numel`` elements: a view of the smallest idle buffer that fits, else a new one."""
        fitting = [t for t in self._idle if t.numel() >= numel and t.dtype == dtype and t.device == device]
        if fitting:
            buffer = min(fitting, key=torch.Tensor.numel)
            self._idle = [t for t in self._idle if t is not buffer]
            return buffer[:numel]
        buffer = torch.empty(numel, dtype=dtype, device=device)
        self._held += buffer.numel() * buffer.element_size()
        self.peak_bytes = max(self.peak_bytes, self._held)
        return buffer

    def fits(self, numel: int, dtype: torch.dtype) -> bool:
        return any(t.numel() >= numel and t.dtype == dtype for t in self._idle)

    def give_back(self, buffer: torch.Tensor) -> None:
        """``buffer`` (a tensor ``take`` returned) is free again; keep the ``keep`` largest idle ones."""
        base = buffer if buffer._base is None else buffer._base
        self._idle.append(base)
        while self._idle and (len(self._idle) > self.keep or self._idle_bytes() > self.keep_bytes):
            # drop the smallest while over the count, the largest while over the bytes
            pick = min if len(self._idle) > self.keep else max
            dropped = pick(self._idle, key=torch.Tensor.numel)
            self._idle = [t for t in self._idle if t is not dropped]
            self._held -= dropped.numel() * dropped.element_size()

    def _idle_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._idle)

    def idle(self) -> list[torch.Tensor]:
        return list(self._idle)

    def clear(self) -> None:
        """Let every idle buffer go back to the allocator."""
        for t in self._idle:
            self._held -= t.numel() * t.element_size()
        self._idle = []
