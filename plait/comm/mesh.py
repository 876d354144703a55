"""The device mesh: the world's ranks as a grid with named axes, and which ranks share a host.

The ranks form a ``dp x pp x tp`` grid, tp the fastest-varying:

    rank = (dp_index * pp + pp_index) * tp + tp_index

so a tensor-parallel group (the chattiest: two all-reduces per block per pass) is a run of adjacent
ranks, the stages of one pipeline come next, and each data-parallel replica of the whole model is a
contiguous block of tp x pp ranks: on hosts of that many devices, only the data-parallel gradient
traffic leaves a host. The degrees are validated here and only here (torchtitan's ``ParallelDims``);
``dp=None`` takes the ranks tp x pp leaves over.

Hosts come from torchrun's environment: it starts ``LOCAL_WORLD_SIZE`` ranks on each host and numbers
them host by host (``GROUP_RANK`` is the host's index), so host h holds the global ranks
``[h * L, (h + 1) * L)``. An axis is *within a host* when every one of its lines is; the dp axis can
then be split into a within-host group and an across-host group, the two levels of hierarchical
all-reduce and of HSDP (shard within a host, replicate across hosts).

Each axis gets one :class:`~plait.comm.Group` per line of the grid (``Context.split``), built the
first time it is asked for. Building a group is collective over the whole world, so every rank
asks for the same groups in the same order (a strategy does so at setup); an axis that spans the
world is the world group itself, and one of a single rank costs a group per rank, so strategies ask
only for the axes they use.
"""

from __future__ import annotations

import os

import torch

from plait.comm.context import Context, ranks_per_host
from plait.comm.group import Group
from plait.errors import ConfigError, divisors

AXES = ("dp", "pp", "tp")
"""The mesh's axes, slowest-varying first."""


def check_degrees(dp: int | None, pp: int, tp: int) -> None:
    """ConfigError unless every degree is a positive integer (dp may be None); no world size needed."""
    for axis, value in (("dp", dp), ("pp", pp), ("tp", tp)):
        if value is None and axis == "dp":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{axis}={value!r} must be a positive integer")


def mesh_sizes(
    world_size: int, dp: int | None = None, pp: int = 1, tp: int = 1, option: str | None = None
) -> dict[str, int]:
    """The degree of every axis, checked against the world size once; ``dp=None`` takes what tp x pp leave.

    Raises ConfigError naming the degrees and what would fit; ``option`` names the setting a preset
    with one model-parallel axis calls its degree (``TensorParallel(size=...)``), for that message.
    """
    check_degrees(dp, pp, tp)
    model = pp * tp
    if world_size % model:
        if option is not None:
            axis, value = ("tp", tp) if pp == 1 else ("pp", pp)
            fix = f"use {option} in {divisors(world_size)}"
            raise ConfigError(f"{axis}={value} does not divide the world size {world_size}; {fix}")
        raise ConfigError(
            f"tp={tp} x pp={pp} = {model} does not divide the world size {world_size}; "
            f"use tp x pp in {divisors(world_size)}"
        )
    if dp is None:
        dp = world_size // model
    if dp * model != world_size:
        raise ConfigError(
            f"dp={dp} x tp={tp} x pp={pp} = {dp * model} ranks, but the world has {world_size}; "
            f"use dp={world_size // model} (or dp=None)"
        )
    return {"dp": dp, "pp": pp, "tp": tp}


class Mesh:
    """This rank's place in the ``dp x pp x tp`` grid, its groups along each axis, and the hosts.

    ``local_world_size``: ranks per host; None reads torchrun's ``LOCAL_WORLD_SIZE`` (all ranks on one
    host when unset). When ``GROUP_RANK`` is set it must agree with this rank's host.
    """

    def __init__(
        self,
        ctx: Context,
        dp: int | None = None,
        pp: int = 1,
        tp: int = 1,
        *,
        local_world_size: int | None = None,
    ) -> None:
        self.ctx = ctx
        self.sizes = mesh_sizes(ctx.world_size, dp, pp, tp)
        """The number of ranks along each axis, e.g. ``{"dp": 2, "pp": 1, "tp": 2}``."""
        self.grid = torch.arange(ctx.world_size).view(*(self.sizes[a] for a in AXES))
        where = (self.grid == ctx.rank).nonzero()[0].tolist()
        self.coords = dict(zip(AXES, where))
        """This rank's index along each axis."""
        self.ranks_per_host = ranks_per_host(ctx.world_size, local_world_size)
        """Ranks on each host (torchrun's LOCAL_WORLD_SIZE)."""
        host = os.environ.get("GROUP_RANK", "")
        if host and int(host) != self.host_of(ctx.rank):
            raise ConfigError(
                f"GROUP_RANK={host} but rank {ctx.rank} with {self.ranks_per_host} ranks per host belongs to "
                f"host {self.host_of(ctx.rank)}: ranks must be numbered host by host, as torchrun does"
            )
        self._groups: dict[str, Group] = {}

    # -- axes -------------------------------------------------------------------------------------

    def lines(self, axis: str) -> list[list[int]]:
        """Every line of the grid along ``axis``: the global ranks of each group of that axis."""
        along = self.grid.movedim(AXES.index(axis), -1)
        return along.reshape(-1, along.shape[-1]).tolist()

    def line(self, axis: str) -> list[int]:
        """The global ranks of this rank's group along ``axis``, in axis order."""
        return next(line for line in self.lines(axis) if self.ctx.rank in line)

    def group(self, axis: str) -> Group:
        """The group of ranks that differ from this one along ``axis`` only (collective the first time)."""
        if axis not in AXES:
            raise ConfigError(f"axis={axis!r} is not a mesh axis; use one of {AXES}")
        if axis not in self._groups:
            self._groups[axis] = (
                self.ctx.world
                if self.sizes[axis] == self.ctx.world_size
                else self.ctx.split(self.lines(axis), axis)
            )
        return self._groups[axis]

    @property
    def groups(self) -> dict[str, Group]:
        """Every axis's group (building those not built yet, in axis order: collective)."""
        return {axis: self.group(axis) for axis in AXES}

    def split_stages(self, stages: tuple[int, ...], name: str) -> Group:
        """A group of the pipeline stages ``stages`` of this rank's pipeline (collective to build)."""
        partition = []
        for line in self.lines("pp"):
            partition.append([line[s] for s in stages])
            partition += [[rank] for s, rank in enumerate(line) if s not in stages]
        return self.ctx.split(partition, name)

    # -- hosts ------------------------------------------------------------------------------------

    def host_of(self, rank: int) -> int:
        """The host (torchrun's node rank) that runs global rank ``rank``."""
        return rank // self.ranks_per_host

    @property
    def hosts(self) -> int:
        return self.ctx.world_size // self.ranks_per_host

    def host_ranks(self, rank: int | None = None) -> list[int]:
        """The global ranks on the host of ``rank`` (default: this rank)."""
        host = self.host_of(self.ctx.rank if rank is None else rank)
        return list(range(host * self.ranks_per_host, (host + 1) * self.ranks_per_host))

    def within_host(self, axis: str) -> bool:
        """True when every group of ``axis`` lies on one host (its traffic never crosses the network)."""
        return all(len({self.host_of(r) for r in line}) == 1 for line in self.lines(axis))

    def host_split(self, axis: str = "dp") -> tuple[list[list[int]], list[list[int]]]:
        """Each line of ``axis`` cut by host: (within-host parts, across-host parts), as global ranks.

        A line's within-host part holds its ranks on one host; its across-host parts hold the ranks
        at the same position of each within-host part. Every host must hold as many ranks of the
        line as every other (the layout is uniform when ``ranks_per_host`` and the degrees divide).
        """
        within, across = [], []
        for line in self.lines(axis):
            parts: dict[int, list[int]] = {}
            for rank in line:
                parts.setdefault(self.host_of(rank), []).append(rank)
            sizes = {len(part) for part in parts.values()}
            if len(sizes) != 1:
                raise ConfigError(
                    f"the {axis} group {line} spreads unevenly over hosts of {self.ranks_per_host} ranks "
                    f"({ {h: len(p) for h, p in parts.items()} }); choose tp x pp dividing {self.ranks_per_host} "
                    f"or a multiple of it"
                )
            within += list(parts.values())
            across += [list(ranks) for ranks in zip(*parts.values())]
        return within, across

    def host_groups(self, axis: str = "dp") -> tuple[Group, Group]:
        """(within-host group, across-host group) of this rank along ``axis`` (collective the first time).

        A hierarchical all-reduce reduces within the host, all-reduces across hosts, then shares
        within the host again; HSDP shards within a host and replicates across hosts.
        """
        key_in, key_across = f"{axis}-in-host", f"{axis}-across-hosts"
        if key_in not in self._groups:
            within, across = self.host_split(axis)
            self._groups[key_in] = self.ctx.split(within, key_in)
            self._groups[key_across] = self.ctx.split(across, key_across)
        return self._groups[key_in], self._groups[key_across]

    def __repr__(self) -> str:
        sizes = " x ".join(f"{axis} {self.sizes[axis]}" for axis in AXES)
        return f"Mesh({sizes}; {self.hosts} host(s) of {self.ranks_per_host}; rank {self.ctx.rank} at {self.coords})"
