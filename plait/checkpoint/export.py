"""One consolidated safetensors file from a sharded checkpoint, and finding the latest checkpoint."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from plait.checkpoint.format import MANIFEST
from plait.checkpoint.sharded import _verify, read_manifest


def export(directory: str | os.PathLike, out: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Write the model of checkpoint ``directory`` as one safetensors file keyed like ``state_dict()``.

    Plain PyTorch loads it with ``model.load_state_dict(safetensors.torch.load_file(out))``; tied
    weights appear under each of their names. Runs in one process; returns the shapes written.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    for name, recorded in manifest["files"].items():
        _verify(directory, name, recorded)
    tensors: dict[str, torch.Tensor] = {}
    for key, entry in manifest["tensors"].items():
        if not key.startswith("model/"):
            continue
        full = torch.empty(entry["shape"], dtype=getattr(torch, entry["dtype"]))
        for chunk in entry["chunks"]:
            with safe_open(str(directory / chunk["file"]), framework="pt") as f:
                values = f.get_tensor(chunk["name"])
            full[tuple(slice(o, o + n) for o, n in zip(chunk["offsets"], chunk["lengths"]))] = values
        tensors[key.removeprefix("model/")] = full
    for alias, name in manifest.get("aliases", {}).items():
        tensors[alias] = tensors[name].clone()  # safetensors stores no shared tensors
    save_file(
        tensors, str(out), metadata={"format": "pt", "source": str(directory), "step": str(manifest["step"])}
    )
    return {k: tuple(v.shape) for k, v in tensors.items()}


def latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root`` (directories named like ``step_000100``), or None.

    Unfinished saves (``*.partial``) and directories without a manifest are never picked.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    found = []
    for path in root.iterdir():
        match = re.fullmatch(r"step_(\d+)", path.name)
        if match and (path / MANIFEST).exists():
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None
