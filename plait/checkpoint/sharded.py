"""Save and load: every rank writes its own boxes; loading reads the boxes it needs from any layout.

Saving is atomic. Every rank writes ``DIR.partial/rank<r>.safetensors`` and fsyncs it; the ranks
exchange what they wrote (keys, boxes, sha256) with one all-gather; rank 0 writes the manifest,
fsyncs it and renames ``DIR.partial`` to ``DIR`` (moving an older ``DIR`` aside first and deleting
it only after). A crash at any moment leaves either the old checkpoint or the new one whole; a
``.partial`` directory is never read. With ``blocking=False`` the tensors are snapshotted to
memory and written by a background thread while training goes on; the exchange and rename happen
in ``wait()`` (the next save, or the end of training, calls it).

Loading never writes into the model or optimizer until every tensor it needs has been read and
checked: a missing file, a checksum that does not match, a tensor the checkpoint lacks or has in
another shape is an error naming it, and the model is left as it was. Nothing is unpickled:
safetensors and JSON only.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from plait.checkpoint.format import (
    FORMAT,
    MANIFEST,
    VERSION,
    Piece,
    file_name,
    overlap,
    rows_share,
    sha256_file,
)
from plait.checkpoint.pieces import aliases
from plait.comm import current
from plait.errors import ConfigError


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, corrupt, or of another model. Nothing was changed."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pieces(model: torch.nn.Module, optimizer: Any) -> list[Piece]:
    runtime = getattr(model, "plait_runtime", None)
    if runtime is None:
        raise ConfigError(
            "plait.checkpoint needs a model prepared by plait.setup (it knows how the model is split)"
        )
    ctx = current()
    rng = torch.get_rng_state()
    return [*runtime.checkpoint_pieces(optimizer), Piece(f"rng/rank{ctx.rank}", tuple(rng.shape), (0,), rng)]


class PendingSave:
    """A save in progress: its files are being written; ``wait()`` finishes it (collective)."""

    def __init__(
        self, directory: Path, step: int, extra: Any, strategy: str, mesh: dict, aliases: dict, groups: list
    ) -> None:
        self.directory = directory
        self.aliases, self.groups = aliases, groups
        self.partial = directory.with_name(directory.name + ".partial")
        self.step, self.extra, self.strategy, self.mesh = step, extra, strategy, mesh
        self.described: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def write(self, chunks: list[Piece], rank: int, copy: bool = True) -> None:
        """Write this rank's chunks as one safetensors file, fsync it, describe it.

        ``copy``: give each chunk its own memory first (safetensors refuses tensors that share a
        storage, as views of our flat buffers do); a snapshot already has.
        """
        try:
            tensors = {
                f"c{i}": piece.tensor.detach().clone().contiguous() if copy else piece.tensor.contiguous()
                for i, piece in enumerate(chunks)
            }
            path = self.partial / file_name(rank)
            save_file(tensors, str(path))
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            self.described = {
                "file": path.name,
                "sha256": sha256_file(str(path)),
                "bytes": path.stat().st_size,
                "chunks": [
                    {"key": p.key, "name": f"c{i}", "shape": list(p.shape), "dtype": str(p.tensor.dtype).removeprefix("torch."),
                     "offsets": list(p.offsets), "lengths": list(p.lengths)}
                    for i, p in enumerate(chunks)
                ],
            }  # fmt: skip
        except BaseException as e:  # reported by wait(), on every rank
            self.error = e

    def wait(self) -> Path:
        """Finish the save on every rank: exchange descriptions, write the manifest, rename into place."""
        if self.thread is not None:
            self.thread.join()
        ctx = current()
        failed = torch.tensor([1.0 if self.error is not None else 0.0])
        ctx.world.all_reduce(failed, op="max")
        if failed.item():
            raise RuntimeError(
                f"checkpoint save to {self.directory} failed on some rank: {self.error}"
            ) from self.error
        descriptions = _all_gather_json(self.described)
        if ctx.rank == 0:
            self._commit(descriptions, ctx.world_size)
        ctx.world.barrier()
        return self.directory

    def _commit(self, descriptions: list[dict], world: int) -> None:
        tensors: dict[str, dict] = {}
        for described in descriptions:
            for chunk in described["chunks"]:
                entry = tensors.setdefault(
                    chunk["key"], {"shape": chunk["shape"], "dtype": chunk["dtype"], "chunks": []}
                )
                entry["chunks"].append(
                    {k: chunk[k] for k in ("name", "offsets", "lengths")} | {"file": described["file"]}
                )
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "step": self.step,
            "extra": self.extra,
            "strategy": self.strategy,
            "world_size": world,
            "mesh": self.mesh,
            "aliases": self.aliases,
            "param_groups": self.groups,
            "files": {d["file"]: {"sha256": d["sha256"], "bytes": d["bytes"]} for d in descriptions},
            "tensors": tensors,
        }
        path = self.partial / MANIFEST
        with open(path, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.partial)
        old = None
        if self.directory.exists():
            old = self.directory.with_name(f"{self.directory.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(self.directory, old)
        os.rename(self.partial, self.directory)
        _fsync_dir(self.directory.parent)
        if old is not None:
            shutil.rmtree(old)


def _all_gather_json(value: Any) -> list[Any]:
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


_pending: PendingSave | None = None


def save(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: Any = None,
    step: int = 0,
    extra: Any = None,
    blocking: bool = True,
) -> PendingSave:
    """Save ``model`` and ``optimizer`` (every rank calls this; each writes its own shard).

    ``extra`` is any JSON-able value (the data position, say) handed back by ``load``. With
    ``blocking=False`` the state is snapshotted to memory and written in the background; the save
    completes at ``wait()``, which the next ``save`` calls.
    """
    global _pending
    wait_for_pending()
    ctx = current()
    runtime = model.plait_runtime
    groups = [
        {
            k: v
            for k, v in group.items()
            if k != "params" and isinstance(v, (int, float, str, bool, list, tuple))
        }
        for group in (optimizer.param_groups if optimizer is not None else [])
    ]
    mesh = runtime.mesh.sizes if hasattr(runtime, "mesh") else {}
    pending = PendingSave(Path(directory), step, extra, runtime.strategy.name, mesh, aliases(model), groups)
    chunks = []
    for piece in _pieces(model, optimizer):
        if not piece.save:
            continue
        mine = rows_share(piece, ctx.rank, ctx.world_size) if piece.replicated else piece
        if mine is not None:
            chunks.append(mine)
    if ctx.rank == 0:
        shutil.rmtree(pending.partial, ignore_errors=True)
        pending.partial.mkdir(parents=True)
    ctx.world.barrier()  # the partial directory exists before anyone writes into it
    if blocking:
        with runtime.checkpoint_guard():
            pending.write(chunks, ctx.rank)
        pending.wait()
        return pending
    with runtime.checkpoint_guard():  # training goes on while the snapshot is written
        snapshot = [Piece(p.key, p.shape, p.offsets, p.tensor.detach().clone().contiguous()) for p in chunks]
    pending.thread = threading.Thread(
        target=pending.write, args=(snapshot, ctx.rank, False), name="plait-checkpoint"
    )
    pending.thread.start()
    _pending = pending
    return pending


def wait_for_pending() -> None:
    """Finish a background save, if one is running (collective)."""
    global _pending
    if _pending is not None:
        pending, _pending = _pending, None
        pending.wait()


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.exists():
        partial = Path(directory).with_name(Path(directory).name + ".partial")
        hint = f" ({partial} is an unfinished save, never loaded)" if partial.exists() else ""
        raise CheckpointError(f"no checkpoint at {directory}: {MANIFEST} is missing{hint}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{path} is format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"this plait reads {FORMAT!r} version {VERSION}"
        )
    return manifest


def load(directory: str | os.PathLike, model: torch.nn.Module, optimizer: Any = None) -> tuple[int, Any]:
    """Load a checkpoint saved under any strategy and world size into ``model`` / ``optimizer``.

    Returns ``(step, extra)``. RNG states are restored when the world size is the one saved.
    """
    wait_for_pending()
    ctx = current()
    directory = Path(directory)
    manifest = read_manifest(directory)
    pieces = _pieces(model, optimizer)
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
    for piece in pieces:
        if piece.key.startswith("rng/"):
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
    needed = {
        chunk["file"]
        for piece in pieces
        for chunk in tensors.get(piece.key, {}).get("chunks", [])
        if not piece.key.startswith("rng/") or manifest["world_size"] == ctx.world_size
    }
    for name in sorted(needed):
        _verify(directory, name, manifest["files"].get(name))
    staged = []
    for piece in pieces:
        if piece.key not in tensors or (
            piece.key.startswith("rng/") and manifest["world_size"] != ctx.world_size
        ):
            continue
        staged.append((piece, _read(directory, piece, tensors[piece.key])))
    with torch.no_grad():
        for piece, values in staged:
            if piece.key.startswith("rng/"):
                torch.set_rng_state(values)
            else:
                piece.tensor.copy_(values)
            piece.loaded = True
    if optimizer is not None and len(manifest.get("param_groups", [])) == len(optimizer.param_groups):
        for group, saved in zip(optimizer.param_groups, manifest["param_groups"]):
            group.update({k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in saved.items()})
    model.plait_runtime.after_checkpoint_load()
    ctx.world.barrier()
    return manifest["step"], manifest["extra"]


def _verify(directory: Path, name: str, recorded: dict | None) -> None:
    path = directory / name
    if recorded is None or not path.exists():
        raise CheckpointError(f"checkpoint {directory} is missing {name}")
    if path.stat().st_size != recorded["bytes"] or sha256_file(str(path)) != recorded["sha256"]:
        raise CheckpointError(f"{path} is corrupt: its size or sha256 differs from the manifest's")


def _read(directory: Path, piece: Piece, entry: dict) -> torch.Tensor:
    """The piece's box, assembled from every chunk that overlaps it."""
    out = torch.empty(piece.lengths, dtype=piece.tensor.dtype)
    covered = 0
    for chunk in entry["chunks"]:
        box = overlap(piece.offsets, piece.lengths, chunk["offsets"], chunk["lengths"])
        if box is None:
            continue
        offsets, lengths = box
        with safe_open(str(directory / chunk["file"]), framework="pt") as f:
            source = f.get_slice(chunk["name"])[
                tuple(slice(o - c, o - c + n) for o, c, n in zip(offsets, chunk["offsets"], lengths))
            ]
        target = tuple(slice(o - p, o - p + n) for o, p, n in zip(offsets, piece.offsets, lengths))
        out[target] = source.to(out.dtype)
        covered += source.numel()
    if covered < out.numel():  # chunks tile a tensor; only 0-d values are written by several ranks
        raise CheckpointError(
            f"checkpoint tensor {piece.key!r} does not cover the box {piece.offsets}+{piece.lengths}"
        )
    return out
