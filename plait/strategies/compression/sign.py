"""Scaled sign with error feedback (EF-SignSGD: Karimireddy et al., ICML 2019; 1-bit Adam's compressor).

Each rank sends, per chunk c of ``chunk`` elements of its compensated gradient x = g + e, the
signs (1 bit per element, 8 to a byte) and one fp32 scale s_c = mean |x_c|, so that C(x) = s_c sign(x_c)
keeps the chunk's l1 norm. What it loses stays behind as the residual, e <- x - C(x).

Signs do not add up under an all-reduce, so the messages are all-gathered and every rank decodes
and averages all N of them in rank order (the same sum, bit for bit, on every rank):

    all-gather([scales | packed signs])     (N-1) x (4 ceil(numel / chunk) + numel / 8) bytes per rank

against 2(N-1)/N x 4 x numel for an fp32 all-reduce: 32x fewer bytes at N = 2, and the gap narrows
as N grows (1-bit Adam's two-phase all-to-all + all-gather would keep it at ~32x; not done here).

Error feedback here is EF-SignSGD's, on the gradient: it pays when the optimizer applies the averaged
gradient linearly (plain SGD, the paper's setting: tests/test_compression_training.py). Under AdamW
or momentum it trains worse than no feedback (docs/benchmarks.md): what the residual hands back later
is not applied as it would have been now (Adam normalizes per element), so the residual grows to many
times the gradient and inflates every chunk's scale. 1-bit Adam (Tang et al. 2021) compresses Adam's
momentum with the variance frozen instead; not done here.
"""

from __future__ import annotations

import torch

from plait.strategies.compression import Compressor

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _sizes(numel: int, chunk: int) -> tuple[int, int]:
    """(chunks, padded numel): the message covers whole chunks."""
    chunks = -(-numel // chunk)
    return chunks, chunks * chunk


def message_bytes(numel: int, chunk: int) -> int:
    """Bytes of one rank's message for ``numel`` elements: the scales and the packed signs."""
    chunks, padded = _sizes(numel, chunk)
    return 4 * chunks + padded // 8


class SignCompressor(Compressor):
    """1 bit per element and a scale per chunk, all-gathered and averaged on every rank."""

    def all_reduce(self, key: int, flat: torch.Tensor) -> None:
        chunk = self.config.chunk
        numel = flat.numel()
        chunks, padded = _sizes(numel, chunk)
        self.feedback.compensate(key, flat)
        x = torch.zeros(padded, dtype=torch.float32, device=flat.device)
        x[:numel].copy_(flat)
        rows = x.view(chunks, chunk)
        counts = torch.full((chunks,), float(chunk), device=flat.device)
        counts[-1] = numel - (chunks - 1) * chunk  # the last chunk's padding is not averaged in
        scales = rows.abs().sum(1).div_(counts)
        signs = (x >= 0).view(-1, 8).to(torch.uint8)
        packed = (signs * _BIT_WEIGHTS.to(flat.device)).sum(1, dtype=torch.uint8)
        if self.feedback.enabled:
            sent = _decode(scales, packed, chunk)[:numel]
            self.feedback.keep(key, flat - sent)
        message = torch.cat([scales.view(torch.uint8), packed])
        gathered = torch.empty(self.group.size * message.numel(), dtype=torch.uint8, device=flat.device)
        self.group.all_gather(gathered, message)
        total = torch.zeros(padded, dtype=torch.float32, device=flat.device)
        for row in gathered.view(self.group.size, -1):  # rank order: the same sum on every rank
            total += _decode(row[: 4 * chunks].view(torch.float32), row[4 * chunks :], chunk)
        flat.copy_(total[:numel].div_(self.group.size))

    def wire_bytes(self) -> int:
        n = self.group.size
        return sum((n - 1) * message_bytes(numel, self.config.chunk) for numel in self.sizes.values())


def _decode(scales: torch.Tensor, packed: torch.Tensor, chunk: int) -> torch.Tensor:
    """s_c x (+1 or -1) for every element, from the scales and the packed sign bits."""
    bits = (packed.unsqueeze(1) >> _BIT_SHIFTS.to(packed.device)) & 1
    signs = bits.view(-1, chunk).to(torch.float32).mul_(2).sub_(1)
    return signs.mul_(scales.unsqueeze(1)).view(-1)
