"""Sharded, atomic, resharding checkpoints: ``plait.checkpoint.save`` / ``load`` / ``export``."""

from plait.checkpoint.export import export
from plait.checkpoint.format import Piece
from plait.checkpoint.history import complete, latest, prune, resume, step_directory
from plait.checkpoint.loading import load
from plait.checkpoint.manifest import CheckpointError, CorruptCheckpoint, read_manifest, verify
from plait.checkpoint.sharded import save, wait_for_pending

__all__ = [
    "CheckpointError",
    "CorruptCheckpoint",
    "Piece",
    "complete",
    "export",
    "latest",
    "load",
    "prune",
    "read_manifest",
    "resume",
    "save",
    "step_directory",
    "verify",
    "wait_for_pending",
]
