"""The checkpoints of one run: where each step's goes, which to resume from, which to keep.

A run keeps its checkpoints side by side under one root, one directory per step:

    step_000004/               complete (it has a manifest.json)
    step_000008/
    step_000012.partial/       an unfinished save: never loaded, never counted
    step_000008.old-1a2b3c4d/  the previous copy of step_000008 while a new one replaces it
    step_000002.pruned/        being deleted

Directories are ordered by their step number (not their names: ``step_1000000`` sorts before
``step_999999`` as text).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from plait.checkpoint.faults import fault_point
from plait.checkpoint.format import MANIFEST
from plait.checkpoint.loading import load
from plait.checkpoint.manifest import CheckpointError, CorruptCheckpoint, verify
from plait.comm import current

_NAME = re.compile(r"step_(\d+)")
_OLD = re.compile(r"step_(\d+)\.old-[0-9a-f]{8}")


def step_directory(root: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of ``step`` lives under ``root``."""
    return Path(root, f"step_{step:06d}")


def complete(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """The complete checkpoints under ``root`` as ``(step, directory)``, oldest first.

    Complete: named ``step_<n>`` exactly and holding a manifest (rank 0 writes it last, then renames
    the directory into place), so ``.partial`` and ``.pruned`` directories never count. A
    ``step_<n>.old-*`` copy counts only while no ``step_<n>`` exists: a save replacing ``step_<n>``
    was interrupted between its two renames, and the old copy is then the only one.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found, old = {}, {}
    for path in root.iterdir():
        if not (path / MANIFEST).is_file():
            continue
        if match := _NAME.fullmatch(path.name):
            found[int(match.group(1))] = path
        elif match := _OLD.fullmatch(path.name):
            old[int(match.group(1))] = path
    return sorted({**old, **found}.items())


def latest(root: str | os.PathLike) -> Path | None:
    """The newest checkpoint under ``root`` that verifies whole (manifest, sizes, sha256), or None."""
    for _, path in reversed(complete(root)):
        try:
            verify(path)
        except CorruptCheckpoint:
            continue
        return path
    return None


def prune(root: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints under ``root``; return those deleted.

    Each is first renamed to ``.pruned`` (so one half deleted never looks complete). What crashes
    left behind goes too: ``.pruned`` directories, ``.old-*`` copies that a newer one replaced,
    ``.partial`` saves older than the newest complete checkpoint (a save in flight is newer). A
    directory that cannot be deleted is reported on stderr and left; the others are still pruned.
    """
    found = complete(root)
    removed = [path for step, path in found[: max(0, len(found) - keep)] if _delete(path, step)]
    if found:
        newest, kept = found[-1][0], {path for _, path in found}
        for path in Path(root).iterdir():
            if path not in kept and _leftover(path.name, newest):
                _delete(path, None)
    return removed


def _leftover(name: str, newest: int) -> bool:
    if name.endswith(".pruned") or _OLD.fullmatch(name):
        return True
    match = re.fullmatch(r"step_(\d+)\.partial", name)
    return match is not None and int(match.group(1)) < newest


def _delete(path: Path, step: int | None) -> bool:
    """Rename ``path`` to ``.pruned``, then delete it; False (and a warning on stderr) if that fails."""
    trash = path if path.name.endswith(".pruned") else path.with_name(path.name + ".pruned")
    try:
        if trash != path:
            shutil.rmtree(trash, ignore_errors=True)  # left by an earlier prune that was interrupted
            os.rename(path, trash)
        if step is not None:
            fault_point("prune", step)
        shutil.rmtree(trash)
    except OSError as e:
        print(f"plait: warning: could not delete the old checkpoint {path}: {e}", file=sys.stderr, flush=True)
        return False
    return True


def resume(
    root: str | os.PathLike, model: torch.nn.Module, optimizer: Any = None
) -> tuple[Path, int, Any] | None:
    """Load the newest checkpoint under ``root`` that loads; ``(directory, step, extra)``, or None if none exists.

    Every rank calls this. A damaged checkpoint (its manifest or a file does not verify, on any
    rank) is skipped for the next older one, and rank 0 says so on stderr. Any other error (a
    checkpoint of another model) is raised, as is the newest one's error when none loads.
    """
    first_error: CheckpointError | None = None
    for _, path in reversed(complete(root)):
        try:
            step, extra = load(path, model, optimizer)
        except CorruptCheckpoint as e:
            if current().rank == 0:
                print(f"plait: warning: skipping damaged checkpoint {path}: {e}", file=sys.stderr, flush=True)
            first_error = first_error or e
            continue
        if first_error is not None and current().rank == 0:
            print(f"plait: warning: resuming from the older checkpoint {path}", file=sys.stderr, flush=True)
        return path, step, extra
    if first_error is not None:
        raise first_error
    return None
