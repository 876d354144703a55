"""One consolidated safetensors file from a sharded checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from plait.checkpoint.manifest import CorruptCheckpoint, assemble, verify


def export(directory: str | os.PathLike, out: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Write the model of checkpoint ``directory`` as one safetensors file keyed like ``state_dict()``.

    Plain PyTorch loads it with ``model.load_state_dict(safetensors.torch.load_file(out))``; tied
    weights appear under each of their names. Runs in one process; returns the shapes written.
    The checkpoint is checked whole first (``manifest.verify``); nothing is written if it fails.
    """
    directory = Path(directory)
    manifest = verify(directory)
    tensors: dict[str, torch.Tensor] = {}
    for key, entry in manifest["tensors"].items():
        if key.startswith("model/"):
            shape = tuple(entry["shape"])
            dtype = getattr(torch, entry["dtype"])
            tensors[key.removeprefix("model/")] = assemble(
                directory, key, entry, (0,) * len(shape), shape, dtype
            )
    for alias, name in manifest.get("aliases", {}).items():
        if name not in tensors:
            raise CorruptCheckpoint(
                f"{directory}: alias {alias!r} names {name!r}, which the checkpoint lacks"
            )
        tensors[alias] = tensors[name].clone()  # safetensors stores no shared tensors
    save_file(
        tensors, str(out), metadata={"format": "pt", "source": str(directory), "step": str(manifest["step"])}
    )
    return {k: tuple(v.shape) for k, v in tensors.items()}
