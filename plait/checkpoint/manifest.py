"""Reading a checkpoint without trusting it: the manifest is checked before any file is opened.

A manifest comes from disk, so it may be damaged or hostile. Before a byte of a shard is read:
the manifest is a JSON object of the expected format; every file it names is a plain
``rank<r>.safetensors`` inside the checkpoint (no ``../``, no absolute path, no device), a regular
file of the recorded size; every chunk lies inside its tensor. While the chunks are assembled,
each must exist in its file with the manifest's dtype and shape, and the chunks of a tensor must
tile it: none overlaps another and together they cover it. Any failure is a ``CheckpointError``
naming the file or tensor; the caller's model is never touched (loading stages everything first).
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from plait.checkpoint.format import FORMAT, MANIFEST, VERSION, overlap, sha256_file


class CheckpointError(ValueError):
    """A checkpoint that cannot be saved or loaded; the message says which rank, which file and why.

    A failed load changes nothing in the model or optimizer; a failed save leaves the previous
    checkpoint as it was.
    """


class CorruptCheckpoint(CheckpointError):
    """A checkpoint whose manifest or files are damaged (resuming falls back to an older one)."""


# torch dtype name (as the manifest records it) -> safetensors' name for it
DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
    "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip
_FILE = re.compile(r"rank\d{5}\.safetensors")


def _ints(value: Any, length: int | None = None) -> bool:
    return (
        isinstance(value, list)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        and (length is None or len(value) == length)
    )


def _check(condition: bool, path: Path, what: str) -> None:
    if not condition:
        raise CorruptCheckpoint(f"{path} is not a valid plait manifest: {what}")


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The checked manifest of checkpoint ``directory``."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        partial = Path(directory).with_name(Path(directory).name + ".partial")
        hint = f" ({partial} is an unfinished save, never loaded)" if partial.exists() else ""
        raise CheckpointError(f"no checkpoint at {directory}: {MANIFEST} is missing{hint}")
    try:
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(f"{path} is not valid JSON: {e}") from None
    _check(isinstance(manifest, dict), path, f"a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{path} is format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"this plait reads {FORMAT!r} version {VERSION}"
        )
    for key, kind in (("step", int), ("world_size", int), ("files", dict), ("tensors", dict)):
        _check(isinstance(manifest.get(key), kind), path, f"{key!r} is missing or not a {kind.__name__}")
    _check(isinstance(manifest.get("aliases", {}), dict), path, "'aliases' is not an object")
    _check(isinstance(manifest.get("param_groups", []), list), path, "'param_groups' is not a list")
    for name, recorded in manifest["files"].items():
        _check(_FILE.fullmatch(name) is not None, path, f"file name {name!r} is not rank<NNNNN>.safetensors")
        _check(
            isinstance(recorded, dict)
            and isinstance(recorded.get("sha256"), str)
            and _ints([recorded.get("bytes")]),
            path,
            f"file {name!r} has no sha256 and size",
        )
    for key, entry in manifest["tensors"].items():
        _check(isinstance(entry, dict) and _ints(entry.get("shape")), path, f"tensor {key!r} has no shape")
        _check(entry.get("dtype") in DTYPES, path, f"tensor {key!r} has dtype {entry.get('dtype')!r}")
        chunks = entry.get("chunks")
        _check(isinstance(chunks, list) and chunks, path, f"tensor {key!r} has no chunks")
        shape = entry["shape"]
        for chunk in chunks:
            _check(
                isinstance(chunk, dict)
                and chunk.get("file") in manifest["files"]
                and isinstance(chunk.get("name"), str)
                and _ints(chunk.get("offsets"), len(shape))
                and _ints(chunk.get("lengths"), len(shape))
                and all(o + n <= s for o, n, s in zip(chunk["offsets"], chunk["lengths"], shape)),
                path,
                f"a chunk of tensor {key!r} is malformed or outside its shape {shape}: {chunk!r}",
            )
    return manifest


def verify_file(directory: Path, name: str, recorded: dict | None) -> None:
    """``name`` is a regular file in ``directory`` with the recorded size and sha256."""
    path = directory / name
    if recorded is None:
        raise CorruptCheckpoint(f"checkpoint {directory} uses {name}, which its manifest does not list")
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise CorruptCheckpoint(f"checkpoint {directory} is missing {name}") from None
    if not stat.S_ISREG(info.st_mode):
        raise CorruptCheckpoint(f"{path} is not a regular file")
    if info.st_size != recorded["bytes"] or sha256_file(str(path)) != recorded["sha256"]:
        raise CorruptCheckpoint(f"{path} is corrupt: its size or sha256 differs from the manifest's")


def verify(directory: str | os.PathLike) -> dict[str, Any]:
    """Check checkpoint ``directory`` whole (manifest, and every file's size and sha256); its manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for name, recorded in manifest["files"].items():
        verify_file(directory, name, recorded)
    return manifest


def assemble(
    directory: Path,
    key: str,
    entry: dict,
    offsets: tuple[int, ...],
    lengths: tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The box ``offsets``+``lengths`` of tensor ``key``, read from every chunk that overlaps it.

    The chunks must tile the box exactly; a 0-d value (a step count every rank wrote) is read once.
    """
    out = torch.empty(lengths, dtype=dtype)
    filled = torch.zeros(lengths, dtype=torch.bool)
    for chunk in entry["chunks"][:1] if not lengths else entry["chunks"]:
        box = overlap(offsets, lengths, chunk["offsets"], chunk["lengths"])
        if box is None:
            continue
        within, sizes = box
        target = tuple(slice(o - p, o - p + n) for o, p, n in zip(within, offsets, sizes))
        if filled[target].any():
            raise CorruptCheckpoint(f"checkpoint tensor {key!r} has overlapping chunks at {list(within)}")
        out[target] = _read_chunk(directory, key, entry, chunk, within, sizes).to(dtype)
        filled[target] = True
    if not filled.all():
        raise CorruptCheckpoint(
            f"checkpoint tensor {key!r} does not cover the box {list(offsets)}+{list(lengths)}"
        )
    return out


def _read_chunk(
    directory: Path, key: str, entry: dict, chunk: dict, offsets: tuple[int, ...], lengths: tuple[int, ...]
) -> torch.Tensor:
    path = directory / chunk["file"]
    try:
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()
            if chunk["name"] not in names:
                raise CorruptCheckpoint(f"{path} has no {chunk['name']!r} (a chunk of {key!r})")
            part = f.get_slice(chunk["name"])
            if part.get_dtype() != DTYPES[entry["dtype"]] or part.get_shape() != chunk["lengths"]:
                raise CorruptCheckpoint(
                    f"{path}: chunk {chunk['name']!r} of {key!r} is {part.get_dtype()} {part.get_shape()}, the manifest "
                    f"says {entry['dtype']} {chunk['lengths']}"
                )
            return part[tuple(slice(o - c, o - c + n) for o, c, n in zip(offsets, chunk["offsets"], lengths))]
    except (SafetensorError, OSError) as e:
        raise CorruptCheckpoint(f"{path} cannot be read: {e}") from None
