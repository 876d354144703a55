"""Save: every rank writes its own boxes, atomically, in the foreground or in the background.

Saving is atomic. Every rank writes ``DIR.partial/rank<r>.safetensors`` and fsyncs it; the ranks
exchange what they wrote (keys, boxes, sha256) with one all-gather; rank 0 writes the manifest,
fsyncs it and renames ``DIR.partial`` to ``DIR`` (moving an older ``DIR`` aside first and deleting
it only after). A crash at any moment leaves either the old checkpoint or the new one whole; a
``.partial`` directory is never read. With ``blocking=False`` the tensors are snapshotted to
memory and written by a background thread while training goes on; the exchange and rename happen
in ``wait()`` (the next save, or the end of training, calls it).

No rank is left waiting on one that failed: each phase of a save (checking ``extra``, creating
``DIR.partial``, writing the shards, committing) ends in one all-gather of every rank's outcome
(:mod:`plait.checkpoint.agreement`), so all ranks raise the same ``CheckpointError``, naming the
first failing rank, its file and the cause; a failed save removes ``DIR.partial`` and leaves the
previous checkpoint. Loading any layout back is :mod:`plait.checkpoint.loading`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from plait.checkpoint.agreement import agree, all_gather_json
from plait.checkpoint.faults import fault_point
from plait.checkpoint.format import FORMAT, MANIFEST, VERSION, Piece, file_name, rows_share, sha256_file
from plait.checkpoint.manifest import CheckpointError
from plait.checkpoint.pieces import aliases, rank_pieces, runtime_of
from plait.comm import current


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_NOT_SHARED = (
    "the run directory must be one filesystem that every host sees (a shared or network filesystem); "
    "are the hosts writing to node-local disks?"
)


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

    def write(self, chunks: list[Piece], rank: int, background: bool = False) -> None:
        """Write this rank's chunks as one safetensors file, fsync it, describe it.

        In the foreground each chunk gets its own memory first (safetensors refuses tensors that
        share a storage, as views of our flat buffers do); a background save's snapshot already has.
        """
        path = self.partial / file_name(rank)
        try:
            if not self.partial.is_dir():
                raise CheckpointError(
                    f"{self.partial}, which rank 0 created, does not exist here; {_NOT_SHARED}"
                )
            tensors = {
                f"c{i}": piece.tensor.contiguous()
                if background
                else piece.tensor.detach().clone().contiguous()
                for i, piece in enumerate(chunks)
            }
            save_file(tensors, str(path))
            fault_point("async" if background else "write", self.step)
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
        except CheckpointError as e:
            self.error = e
        except Exception as e:  # reported by wait(), on every rank
            self.error = CheckpointError(f"could not write {path}: {type(e).__name__}: {e}")

    def wait(self) -> Path:
        """Finish the save on every rank: exchange descriptions, write the manifest, rename into place."""
        if self.thread is not None:
            self.thread.join()
        ctx = current()
        what = f"checkpoint save to {self.directory}"
        outcomes = all_gather_json(
            {"error": str(self.error)} if self.error is not None else {"described": self.described}
        )
        failed = [(rank, o["error"]) for rank, o in enumerate(outcomes) if "error" in o]
        if failed:
            if ctx.rank == 0:
                shutil.rmtree(self.partial, ignore_errors=True)
            rank, message = failed[0]
            raise CheckpointError(f"{what} failed on rank {rank}: {message}") from self.error
        error = None
        if ctx.rank == 0:
            try:
                self._commit([o["described"] for o in outcomes])
            except Exception as e:
                error = e if isinstance(e, CheckpointError) else CheckpointError(f"{type(e).__name__}: {e}")
        agree(error, what)  # the closing collective: every rank learns whether rank 0 committed
        return self.directory

    def _commit(self, descriptions: list[dict]) -> None:
        """Rank 0: write the manifest, then move the checkpoint into place; on failure leave the old one."""
        try:
            for rank, described in enumerate(descriptions):
                path = self.partial / described["file"]
                if not path.is_file() or path.stat().st_size != described["bytes"]:
                    raise CheckpointError(f"rank 0 cannot see {path}, which rank {rank} wrote; {_NOT_SHARED}")
            path = self.partial / MANIFEST
            try:
                with open(path, "w") as f:
                    json.dump(self._manifest(descriptions), f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                _fsync_dir(self.partial)
            except OSError as e:
                raise CheckpointError(f"could not write {path}: {e}") from e
            fault_point("manifest", self.step)
            self._replace()
        except BaseException:
            shutil.rmtree(self.partial, ignore_errors=True)
            raise

    def _replace(self) -> None:
        """Rename ``DIR.partial`` to ``DIR``, moving an existing ``DIR`` aside first, deleting it after.

        Between the two renames only ``DIR.old-*`` holds this step; ``history.complete`` counts it
        then, so a crash there loses nothing. A rename that fails puts the old copy back.
        """
        directory = self.directory
        old = None
        if directory.exists():
            old = directory.with_name(f"{directory.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(directory, old)
            fault_point("rename", self.step)
        try:
            os.rename(self.partial, directory)
        except OSError:
            if old is not None:
                os.rename(old, directory)
            raise
        _fsync_dir(directory.parent)
        fault_point("commit", self.step)
        if old is not None:  # the new checkpoint is in place: failing to delete the old one is no failure
            try:
                (old / MANIFEST).unlink()  # a copy half deleted must never look complete
                shutil.rmtree(old)
            except OSError as e:
                print(f"plait: warning: could not delete {old}: {e}", file=sys.stderr, flush=True)

    def _manifest(self, descriptions: list[dict]) -> dict[str, Any]:
        tensors: dict[str, dict] = {}
        for described in descriptions:
            for chunk in described["chunks"]:
                entry = tensors.setdefault(
                    chunk["key"], {"shape": chunk["shape"], "dtype": chunk["dtype"], "chunks": []}
                )
                entry["chunks"].append(
                    {k: chunk[k] for k in ("name", "offsets", "lengths")} | {"file": described["file"]}
                )
        return {
            "format": FORMAT,
            "version": VERSION,
            "step": self.step,
            "extra": self.extra,
            "strategy": self.strategy,
            "world_size": len(descriptions),
            "mesh": self.mesh,
            "aliases": self.aliases,
            "param_groups": self.groups,
            "files": {d["file"]: {"sha256": d["sha256"], "bytes": d["bytes"]} for d in descriptions},
            "tensors": tensors,
        }


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
    completes at ``wait()``, which the next ``save`` calls. Any failure is a ``CheckpointError`` on
    every rank, naming the rank, the file and the cause; the previous checkpoint stays as it was.
    """
    global _pending
    wait_for_pending()
    ctx = current()
    directory = Path(directory)
    runtime = runtime_of(model)
    runtime.begin_checkpoint("save", str(directory), step)
    blocking = blocking or not runtime.saves_in_background
    what = f"checkpoint save to {directory}"
    try:
        json.dumps(extra)
        failure = None
    except (TypeError, ValueError) as e:  # before anything is written
        failure = CheckpointError(f"extra is not JSON-serializable ({type(e).__name__}: {e})")
    agree(failure, what)
    groups = [
        {
            k: v
            for k, v in group.items()
            if k != "params" and isinstance(v, (int, float, str, bool, list, tuple))
        }
        for group in (optimizer.param_groups if optimizer is not None else [])
    ]
    mesh = runtime.mesh_sizes() or {}
    pending = PendingSave(directory, step, extra, runtime.strategy.name, mesh, aliases(model), groups)
    chunks = []
    for piece in rank_pieces(model, optimizer):
        if not piece.save:
            continue
        mine = rows_share(piece, ctx.rank, ctx.world_size) if piece.replicated else piece
        if mine is not None:
            chunks.append(mine)
    failure = None
    if ctx.rank == 0:
        try:
            shutil.rmtree(pending.partial, ignore_errors=True)
            pending.partial.mkdir(parents=True)
        except OSError as e:
            failure = CheckpointError(f"could not create {pending.partial}: {e}")
    agree(failure, what)  # the partial directory exists before anyone writes into it
    if blocking:
        with runtime.checkpoint_guard():
            pending.write(chunks, ctx.rank)
        pending.wait()
        return pending
    with runtime.checkpoint_guard():  # training goes on while the snapshot is written
        snapshot = [Piece(p.key, p.shape, p.offsets, p.tensor.detach().clone().contiguous()) for p in chunks]
    pending.thread = threading.Thread(
        target=pending.write, args=(snapshot, ctx.rank, True), name="plait-checkpoint"
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
