"""PowerSGD: each gradient matrix as two thin factors (Vogels, Karimireddy, Jaggi; NeurIPS 2019).

For each m x n gradient matrix M of a message (a weight of shape (m, ...) is viewed as m x n),
with Q (n x r) kept from the previous step (warm start; at first a seeded random matrix, the same
on every rank), one step of subspace iteration, linear in M and so all-reducible:

    M <- M + e                       error feedback: add what earlier steps did not send
    P <- M Q                         (m x r)
    all-reduce(P) / N                one message: every P of the bucket, plus its plain part
    P <- orthogonalize(P)            batched Householder QR over matrices of one shape
    Q <- M^T P                       (n x r)
    e <- M - P Q^T                   what this rank's own contribution loses (before averaging Q)
    all-reduce(Q) / N                one message: every Q of the bucket
    M <- P Q^T                       the same rank-r approximation of the average on every rank

Bytes per rank and step: 2(N-1)/N x s x (sum r(m + n) + plain elements), where r = min(rank, m, n)
and s is the gradient's element size (4; 2 under bf16 mixed precision, whose factors and residual
are bf16 too; the orthogonalization runs in fp32). A matrix is sent plainly (with the 1-D tensors:
biases, norms) unless mn >= min_compression_rate x r(m + n); plain elements ride in the first
all-reduce, so a bucket costs two all-reduces. The first is in flight while backward goes on; the
rest runs when the bucket is waited on (``start``). At full rank (r = min(m, n)) P spans M's column
space, P P^T M = M, and training equals uncompressed.
"""

from __future__ import annotations

import math

import torch

from plait.comm import Group, Handle
from plait.comm.hierarchy import StagedHandle
from plait.strategies.compression import Compressor, Layout, PowerSGD


class _Plan:
    """How one message splits: compressed matrices (offset, m, n, r), plain runs, factor offsets."""

    def __init__(self, numel: int, layout: Layout, config: PowerSGD) -> None:
        self.matrices: list[tuple[int, int, int, int]] = []
        self.plain: list[tuple[int, int]] = []
        for offset, shape in layout:
            size = math.prod(shape)
            m, n = (shape[0], size // shape[0]) if len(shape) >= 2 else (1, size)
            r = min(config.rank, m, n)
            if len(shape) >= 2 and m * n >= config.min_compression_rate * r * (m + n):
                self.matrices.append((offset, m, n, r))
            else:
                self.plain.append((offset, size))
        self.p_numel = sum(m * r for _, m, _, r in self.matrices)
        self.q_numel = sum(n * r for _, _, n, r in self.matrices)
        self.plain_numel = sum(size for _, size in self.plain)
        self.numel = numel
        self.q_offsets = [sum(n * r for _, _, n, r in self.matrices[:i]) for i in range(len(self.matrices))]
        # matrices of one (m, r) are orthogonalized in one batched QR
        self.batches: dict[tuple[int, int], list[int]] = {}
        for i, (_, m, _, r) in enumerate(self.matrices):
            self.batches.setdefault((m, r), []).append(i)


class PowerSGDCompressor(Compressor):
    """Rank-r PowerSGD over the registered messages, with error feedback and warm start."""

    def __init__(self, config: PowerSGD, group: Group) -> None:
        super().__init__(config, group)
        self.plans: dict[int, _Plan] = {}
        self.qs: dict[int, torch.Tensor] = {}
        self.generator = torch.Generator().manual_seed(config.seed)

    def register(
        self, key: int, numel: int, layout: Layout, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> None:
        super().register(key, numel, layout, device, dtype)
        plan = self.plans[key] = _Plan(numel, layout, self.config)
        # the factors live in the gradient's dtype (bf16 under mixed precision: half the bytes)
        self.qs[key] = torch.randn(plan.q_numel, generator=self.generator).to(device=device, dtype=dtype)

    def all_reduce(self, key: int, flat: torch.Tensor) -> None:
        self.start(key, flat).wait()

    def start(self, key: int, flat: torch.Tensor) -> StagedHandle:
        """P <- (M + e) Q for every matrix, and P's all-reduce launched; the handle's ``advance`` runs
        the QR, Q and the residual and launches Q's all-reduce, its ``wait`` then M <- P Q^T. So P's
        all-reduce (and the other rank's lag) hides behind whatever the caller computes meanwhile,
        backward's next buckets, and Q's behind the next bucket's QR and Q when the caller advances
        every bucket before waiting on any (``GradientBuckets`` does)."""
        # Each phase visits a matrix once, while it is in cache. On one core MKL computes M^T P
        # faster as (P^T M)^T, and the residual is written in place rather than copied: gpt-bench-7m
        # at rank 4, collectives stubbed, cold caches, 52.6 -> 42.0 ms (gpt-bench-168m 1.15 -> 0.84 s).
        plan, q = self.plans[key], self.qs[key]
        if not self.config.warm_start:
            q.copy_(torch.randn(q.numel(), generator=self.generator))
        feedback = self.feedback
        matrices = [flat[o : o + m * n].view(m, n) for o, m, n, _ in plan.matrices]
        qs = [q[at : at + n * r].view(n, r) for (_, _, n, r), at in zip(plan.matrices, plan.q_offsets)]
        message = torch.empty(plan.p_numel + plan.plain_numel, dtype=flat.dtype, device=flat.device)
        ps, at = [], 0
        for (o, m, _, r), matrix, factor in zip(plan.matrices, matrices, qs):
            if feedback.enabled:  # M <- M + e (the plain runs are sent exactly: their e stays 0)
                matrix.add_(feedback.residual(key, o, matrix.numel()).view_as(matrix))
            p = message[at : at + m * r].view(m, r)
            torch.matmul(matrix, factor, out=p)
            ps.append(p)
            at += m * r
        plain = message[plan.p_numel :]
        _gather_plain(plain, flat, plan.plain)
        handle = self.group.all_reduce(message, op="avg", async_op=True)

        def finish() -> Handle | None:
            _orthogonalize(ps, plan)
            for (o, _, _, _), matrix, p, factor in zip(plan.matrices, matrices, ps, qs):
                factor.copy_(torch.matmul(p.t(), matrix).t())
                if feedback.enabled:  # e <- M - P Q^T, written straight into the residual when fp32
                    e = feedback.residual(key, o, matrix.numel()).view_as(matrix)
                    if e.dtype == matrix.dtype:
                        torch.addmm(matrix, p, factor.t(), alpha=-1, out=e)
                    else:
                        e.copy_(torch.addmm(matrix, p, factor.t(), alpha=-1))
            return self.group.all_reduce(q, op="avg", async_op=True) if q.numel() else None

        def decompress() -> None:
            for matrix, p, factor in zip(matrices, ps, qs):
                torch.matmul(p, factor.t(), out=matrix)
            _scatter_plain(flat, plain, plan.plain)

        return StagedHandle(handle, finish, decompress)

    def wire_bytes(self) -> int:
        n = self.group.size
        total = 0
        for key, plan in self.plans.items():  # both messages travel in the gradient's dtype
            itemsize = self.dtypes[key].itemsize
            total += 2 * (n - 1) * (plan.p_numel + plan.plain_numel) * itemsize // n
            total += 2 * (n - 1) * plan.q_numel * itemsize // n
        return total

    def state(self) -> dict[str, torch.Tensor]:
        return {f"q{key}": q for key, q in self.qs.items()} if self.config.warm_start else {}


def _gather_plain(message: torch.Tensor, flat: torch.Tensor, runs: list[tuple[int, int]]) -> None:
    at = 0
    for offset, size in runs:
        message[at : at + size].copy_(flat[offset : offset + size])
        at += size


def _scatter_plain(flat: torch.Tensor, message: torch.Tensor, runs: list[tuple[int, int]]) -> None:
    at = 0
    for offset, size in runs:
        flat[offset : offset + size].copy_(message[at : at + size])
        at += size


def _orthogonalize(ps: list[torch.Tensor], plan: _Plan) -> None:
    """Replace each P by an orthonormal basis of its columns: one batched QR per (m, r).

    Householder QR (LAPACK) rather than the paper's Gram-Schmidt: batched, and a zero or rank-
    deficient P (a gradient with zero rows) gives orthonormal columns instead of a division by zero.
    Every rank runs it on the same all-reduced P, so every rank gets the same basis. In fp32 whatever
    P's dtype (LAPACK has no bf16; P is small).
    """
    for indices in plan.batches.values():
        stacked = torch.stack([ps[i] for i in indices]).float()
        basis = torch.linalg.qr(stacked, mode="reduced").Q
        for i, b in zip(indices, basis):
            ps[i].copy_(b)
