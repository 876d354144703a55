"""Sharded, atomic, resharding checkpoints: ``plait.checkpoint.save`` / ``load`` / ``export``."""

from plait.checkpoint.export import export, latest
from plait.checkpoint.format import Piece
from plait.checkpoint.sharded import CheckpointError, load, read_manifest, save, wait_for_pending

__all__ = [
    "CheckpointError",
    "Piece",
    "export",
    "latest",
    "load",
    "read_manifest",
    "save",
    "wait_for_pending",
]
