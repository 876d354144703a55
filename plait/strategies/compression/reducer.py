"""How a data-parallel runtime averages one bucket's gradient: plain, compressed, two-level, or both.

DDP and ZeRO call ``reducer.all_reduce(key, gradient)`` where they would all-reduce a bucket; ZeRO
then keeps only its shard of the result (each rank decompresses the whole bucket, as every rank of
a compressed DDP does, so the optimizer sees the same average it would see under DDP).

    compression  hierarchical   what one bucket of B bytes costs one rank
    None         False          ring all-reduce                     2(N-1)/N x B
    scheme       False          the scheme's formula over the N ranks
    None         True           two-level: 2(L-1)/L x B in the host, 2(H-1)/H x B/L across hosts
    scheme       True           2(L-1)/L x B in the host, the scheme's formula on a B/L chunk across
                                the H hosts: compression where it pays, and a residual of B/L, not B

ZeRO-3's HSDP layout (sharded within a host, replicated across hosts) calls ``reduce_scatter``
instead: the two-level all-reduce without its last stage, (L-1)/L x B in the host and the cross-host
stage (plain or compressed) on the B/L chunk the rank owns.

Compressed and cross-host stages are issued from the thread that launches the bucket or waits for
it, never from a completion callback: chained collectives issued from callbacks interleave
differently on different ranks (the abort torch's PowerSGD hook hits on gloo, shared/FACTS.md).
"""

from __future__ import annotations

import functools

import torch

from plait.buffers import FlatBuffer
from plait.checkpoint.format import Piece
from plait.comm import Group, Handle
from plait.comm.hierarchy import StagedHandle, TwoLevel
from plait.comm.mesh import Mesh
from plait.strategies.compression import Compression, Layout, cut_layout, make_compressor, parse_compression


class GradientReducer:
    """Averages registered bucket gradients over ``group`` (or its two ``levels``), maybe compressed."""

    def __init__(
        self, group: Group, compression: Compression | None, levels: TwoLevel | None, hsdp: bool = False
    ) -> None:
        self.group = group
        self.levels = levels
        self.hsdp = hsdp
        """Buckets are reduced with ``reduce_scatter`` (each rank keeps its within-host chunk), not ``all_reduce``."""
        self.compression = compression
        target = levels.inter if levels is not None else group
        self.compressor = make_compressor(compression, target) if compression is not None else None
        self.numels: dict[int, tuple[int, int]] = {}

    def register(
        self, key: int, numel: int, dtype: torch.dtype, layout: Layout, device: torch.device
    ) -> None:
        """Bucket ``key``: ``numel`` elements of ``dtype`` laid out as ``layout``."""
        self.numels[key] = (numel, dtype.itemsize)
        if self.compressor is None:
            return
        if self.levels is not None:
            lo, hi = self.levels.chunk(numel)
            self.compressor.register(key, hi - lo, cut_layout(layout, lo, hi), device, dtype)
        else:
            self.compressor.register(key, numel, layout, device, dtype)

    def register_buffers(self, buffers: list[FlatBuffer]) -> None:
        """Bucket b is the whole of ``buffers[b]`` (ZeRO's buckets, one flat buffer each)."""
        for b, flat in enumerate(buffers):
            layout = [(o, tuple(p.shape)) for o, p in zip(flat.offsets, flat.params)]
            self.register(b, flat.data.numel(), flat.data.dtype, layout, flat.data.device)

    def all_reduce(self, key: int, gradient: torch.Tensor) -> Handle | StagedHandle:
        """Start averaging bucket ``key``'s ``gradient`` in place; the handle's ``wait`` finishes it."""
        if self.levels is not None:
            compress = functools.partial(self.compressor.all_reduce, key) if self.compressor else None
            return self.levels.all_reduce(gradient, compress)
        if self.compressor is not None:
            return self.compressor.start(key, gradient)
        return self.group.all_reduce(gradient, op="avg", async_op=True)

    def reduce_scatter(self, key: int, gradient: torch.Tensor, chunk: torch.Tensor) -> StagedHandle:
        """HSDP: start averaging bucket ``key`` over every rank into this rank's within-host ``chunk``."""
        compress = functools.partial(self.compressor.all_reduce, key) if self.compressor else None
        return StagedHandle(self.levels.reduce_scatter(gradient, chunk, compress), lambda: None)

    def theory_by_link(self) -> dict[str, int]:
        """Bytes one rank sends per step for every registered bucket, by link level."""
        if self.levels is None:
            total = (
                self.compressor.wire_bytes()
                if self.compressor is not None
                else sum(
                    2 * (self.group.size - 1) * n * s // self.group.size for n, s in self.numels.values()
                )
            )
            return {"all": total}
        out = {"intra-host": 0, "inter-host": 0}
        for numel, itemsize in self.numels.values():
            levels = self.levels.theory_bytes(numel, itemsize, gather=not self.hsdp)
            out["intra-host"] += levels["intra-host"]
            out["inter-host"] += levels["inter-host"]
        if self.compressor is not None:
            out["inter-host"] = self.compressor.wire_bytes()
        return out

    def theory_bytes(self) -> int:
        return sum(self.theory_by_link().values())

    def describe(self) -> str:
        """The formula behind ``theory_bytes``, for the run summary."""
        scheme = self.compression.name if self.compression is not None else None
        if self.levels is None:
            return f"{scheme} all-reduce (the scheme's formula)" if scheme else "ring all-reduce 2(N-1)/N x B"
        across = f"{scheme} across hosts on B/L" if scheme else "all-reduce across hosts 2(H-1)/H x B/L"
        if self.hsdp:
            return f"reduce-scatter in the host (L-1)/L x B, {across}"
        return f"two-level: reduce-scatter + all-gather in the host 2(L-1)/L x B, {across}"

    def checkpoint_pieces(self, rank: int) -> list[Piece]:
        """The compressor's residuals (this rank's) and shared state; nothing without compression."""
        if self.compressor is None:
            return []
        if self.levels is None:
            return self.compressor.checkpoint_pieces("compression", rank)
        # across hosts each local rank compresses its own chunk: its state is shared with its peers only
        inter = self.levels.inter
        prefix = f"compression/in-host{self.levels.intra.rank}"
        return self.compressor.checkpoint_pieces(prefix, rank, share=(inter.rank, inter.size))

    def memory_tensors(self) -> list[torch.Tensor]:
        return self.compressor.memory_tensors() if self.compressor is not None else []


def reducer_for(strategy: object, mesh: Mesh, hsdp: bool = False) -> GradientReducer | None:
    """The reducer a data-parallel ``strategy`` asks for with its ``compression`` / ``hierarchical``
    options over ``mesh``'s dp axis (None: neither, the runtime's own all-reduce). Collective when
    hierarchical: the dp axis's within-host and across-host groups are built (``Mesh.host_groups``).
    ``hsdp``: the runtime shards within the host when hierarchical (ZeRO-3), see ``reduce_scatter``.
    """
    compression = parse_compression(strategy.compression)
    if compression is None and not strategy.hierarchical:
        return None
    levels = TwoLevel(*mesh.host_groups("dp")) if strategy.hierarchical else None
    return GradientReducer(mesh.group("dp"), compression, levels, hsdp=hsdp and levels is not None)
