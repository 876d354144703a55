"""Load: each rank reads the boxes it needs from a checkpoint saved under any strategy and world size.

Loading never writes into the model or optimizer until every tensor it needs has been read and
checked: a missing file, a checksum that does not match, a tensor the checkpoint lacks or has in
another shape is an error naming it, and the model is left as it was. The read ends in one
all-gather of every rank's outcome (:mod:`plait.checkpoint.agreement`), so a failure is the same
``CheckpointError`` on every rank. Nothing is unpickled: safetensors and JSON only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from plait.checkpoint.agreement import agree
from plait.checkpoint.faults import fault_point
from plait.checkpoint.format import Piece
from plait.checkpoint.manifest import CheckpointError, CorruptCheckpoint, assemble, read_manifest, verify_file
from plait.checkpoint.pieces import rank_pieces, runtime_of
from plait.checkpoint.sharded import wait_for_pending
from plait.comm import current


def load(directory: str | os.PathLike, model: torch.nn.Module, optimizer: Any = None) -> tuple[int, Any]:
    """Load a checkpoint saved under any strategy and world size into ``model`` / ``optimizer``.

    Returns ``(step, extra)``. RNG states are restored when the world size is the one saved. Every
    rank reads and checks what it needs first; only when all ranks succeeded does any copy into its
    model, so a failure is the same ``CheckpointError`` on every rank with nothing changed.
    """
    wait_for_pending()
    ctx = current()
    directory = Path(directory)
    runtime = runtime_of(model)
    runtime.begin_checkpoint("load", str(directory), 0)
    pieces = rank_pieces(model, optimizer)
    stateful = None if runtime.optimizer_state_elsewhere else optimizer
    failure, manifest, staged = None, {}, []
    try:
        manifest = read_manifest(directory)
        staged = _stage(directory, manifest, pieces, stateful, ctx.world_size)
    except CheckpointError as e:
        failure = e
    except Exception as e:  # a manifest that passed the checks yet breaks the reader
        failure = CorruptCheckpoint(f"{directory} cannot be loaded: {type(e).__name__}: {e}")
    agree(failure, f"loading checkpoint {directory}")
    fault_point("load", manifest["step"])
    with torch.no_grad():
        for piece, values in staged:
            if piece.key.startswith("rng/"):
                torch.set_rng_state(values)
            else:
                piece.tensor.copy_(values)
            piece.loaded = True
    # the checkpoint carries state, not settings: the live optimizer's hyperparameters (lr, betas,
    # weight decay, as this run was configured) stay; the manifest's param_groups are a record only
    model.plait_runtime.after_checkpoint_load()
    ctx.world.barrier()
    return manifest["step"], manifest.get("extra")


def _stage(
    directory: Path, manifest: dict, pieces: list[Piece], optimizer: Any, world_size: int
) -> list[tuple[Piece, torch.Tensor]]:
    """Every piece's values read and checked, nothing written: ``(piece, values)`` pairs."""
    tensors = dict(manifest["tensors"])
    for alias, name in manifest.get("aliases", {}).items():  # a tied weight saved once, found by either name
        for key in [k for k in tensors if k.split("/")[1:2] == [name]]:
            tensors.setdefault(key.replace(f"/{name}", f"/{alias}", 1), tensors[key])
    has_state = any(p.key.startswith("optim/") for p in pieces)
    if optimizer is not None and not has_state and any(k.startswith("optim/") for k in tensors):
        raise CheckpointError(
            f"{type(optimizer).__name__} has no state to load into yet; plait.checkpoint restores optimizer "
            "state into plait.optim optimizers (or a torch optimizer that has taken a step)"
        )
    same_world = manifest["world_size"] == world_size
    wanted = []
    for piece in pieces:
        if piece.key.startswith("rng/"):
            if same_world and piece.key in tensors:
                wanted.append(piece)
            continue
        entry = tensors.get(piece.key)
        if entry is None:
            if not piece.required:
                continue
            known = sorted(k for k in tensors if k.startswith(piece.key.split("/")[0]))
            raise CheckpointError(
                f"checkpoint {directory} has no tensor {piece.key!r} (the first the model needs that it lacks); "
                f"it has {len(known)} like it, e.g. {known[:3]}"
            )
        if tuple(entry["shape"]) != piece.shape:
            raise CheckpointError(
                f"checkpoint tensor {piece.key!r} has shape {entry['shape']}, the model's has {list(piece.shape)}"
            )
        wanted.append(piece)
    for name in sorted({chunk["file"] for piece in wanted for chunk in tensors[piece.key]["chunks"]}):
        verify_file(directory, name, manifest["files"].get(name))
    return [
        (p, assemble(directory, p.key, tensors[p.key], p.offsets, p.lengths, p.tensor.dtype)) for p in wanted
    ]
