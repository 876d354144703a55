"""Every rank learns every rank's outcome: how a checkpoint's save and load phases end together.

Each phase ends in one all-gather of every rank's outcome (JSON, through the comm layer), so a
failure on one rank becomes the same ``CheckpointError`` on all of them, naming the first failing
rank, and no rank goes on to wait in a collective for one that gave up.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from plait.checkpoint.manifest import CheckpointError, CorruptCheckpoint
from plait.comm import current


def all_gather_json(value: Any) -> list[Any]:
    """Every rank's JSON-able ``value``, through the comm layer (bytes padded to the longest)."""
    ctx = current()
    data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
    length = torch.tensor([float(data.numel())])
    ctx.world.all_reduce(length, op="max")
    padded = torch.zeros(int(length.item()), dtype=torch.uint8)
    padded[: data.numel()] = data
    everyone = torch.zeros(ctx.world_size * padded.numel(), dtype=torch.uint8)
    ctx.world.all_gather(everyone, padded)
    return [json.loads(bytes(chunk.tolist()).rstrip(b"\0")) for chunk in everyone.view(ctx.world_size, -1)]


def agree(failure: BaseException | None, what: str) -> None:
    """Collective: raise the same ``CheckpointError`` on every rank if ``failure`` is set on any.

    It names the first failing rank and its cause, so a rank whose own part went well still says
    what went wrong, and no rank goes on to wait for one that gave up.
    """
    mine = (
        None
        if failure is None
        else {"message": str(failure), "corrupt": isinstance(failure, CorruptCheckpoint)}
    )
    failures = [(rank, f) for rank, f in enumerate(all_gather_json(mine)) if f is not None]
    if not failures:
        return
    rank, first = failures[0]
    others = f" (also ranks {', '.join(str(r) for r, _ in failures[1:])})" if len(failures) > 1 else ""
    kind = CorruptCheckpoint if first["corrupt"] else CheckpointError
    raise kind(f"{what} failed on rank {rank}{others}: {first['message']}") from failure
