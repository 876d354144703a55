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

_PACK = 0x0102040810204080
"""Times 8 bytes of 0 / 1 read as one little-endian int64, this puts byte i's bit at bit 56 + i."""
_SIGNS = torch.tensor([[1.0 if byte >> bit & 1 else -1.0 for bit in range(8)] for byte in range(256)])
"""Row b: the 8 signs (+1 / -1, lowest bit first) that byte b packs: decoding is one table look-up."""


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
        bits = (x >= 0).view(torch.uint8).view(torch.int64)  # 8 signs to an int64, byte i = element i
        packed = bits.mul(_PACK).bitwise_right_shift_(56).to(torch.uint8)  # wraps mod 2^64, as meant
        own = None
        if self.feedback.enabled:  # what C(x) leaves out: x - s_c sign(x_c), computed in x's place
            own = _decode(packed, chunks, chunk)
            self.feedback.keep(key, rows.addcmul_(own, scales.unsqueeze(1), value=-1).view(-1)[:numel])
        message = torch.cat([scales.view(torch.uint8), packed])
        gathered = torch.empty(self.group.size * message.numel(), dtype=torch.uint8, device=flat.device)
        self.group.all_gather(gathered, message)
        total = torch.empty(chunks, chunk, dtype=torch.float32, device=flat.device)
        for r, row in enumerate(gathered.view(self.group.size, -1)):  # rank order: the same sum on every rank
            signs = (
                own if r == self.group.rank and own is not None else _decode(row[4 * chunks :], chunks, chunk)
            )
            scale = row[: 4 * chunks].view(torch.float32).unsqueeze(1)
            if r == 0:
                torch.mul(signs, scale, out=total)
            else:
                total.addcmul_(signs, scale)
        flat.copy_(total.view(-1)[:numel].div_(self.group.size))

    def wire_bytes(self) -> int:
        n = self.group.size
        return sum((n - 1) * message_bytes(numel, self.config.chunk) for numel in self.sizes.values())


def _decode(packed: torch.Tensor, chunks: int, chunk: int) -> torch.Tensor:
    """The +1 / -1 of every element, (chunks, chunk), from the packed sign bits (a table look-up)."""
    return torch.nn.functional.embedding(packed.long(), _SIGNS.to(packed.device)).view(chunks, chunk)
