"""The on-disk format: one safetensors file per rank, one JSON manifest, and n-d boxes of tensors.

A checkpoint directory holds

    manifest.json          format, version, step, strategy, world size, the user's ``extra``;
                           per file its sha256 and size; per tensor its shape, dtype and the
                           chunks (file, key, offsets, lengths) that tile it; aliases (tied weights)
    rank00000.safetensors  the chunks rank 0 wrote
    rank00001.safetensors  ...

Tensors are named canonically, independent of the strategy that saved them:

    model/<state_dict key>              parameters (fp32 master values where one exists) and buffers
    optim/<parameter name>/<state>      optimizer state with the parameter's shape (exp_avg, ...)
    optim/<parameter name>/step         the step count, a 0-d tensor
    rng/rank<r>                         rank r's CPU generator state

A chunk is an n-d box of a tensor (offsets and lengths per dimension), so any sharding (ZeRO's
flat ranges, tensor parallelism's column blocks) is written as the boxes it owns and read back
under any other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import torch

FORMAT = "plait-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"


@dataclasses.dataclass
class Piece:
    """A box of one canonical tensor that this rank holds: ``tensor`` is a live view of its values.

    ``replicated`` pieces are held whole by every rank: on save they are cut by rows and each rank
    writes its share; on load every rank reads the whole box.
    """

    key: str
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    tensor: torch.Tensor
    replicated: bool = False
    save: bool = True
    """False: loaded here but written by another rank (a parameter server's worker replica)."""
    required: bool = True
    """False: loaded if the checkpoint has it (state only one strategy keeps, e.g. DiLoCo's momentum)."""
    loaded: bool = False
    """Set by ``load`` once the piece's values came from the checkpoint."""
    share: tuple[int, int] | None = None
    """For a replicated piece: this rank's index among the ranks holding the same copy, and their
    number (default: every rank of the world holds it)."""

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)


def file_name(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def flat_range_boxes(
    shape: tuple[int, ...], lo: int, hi: int
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The elements [lo, hi) of a row-major tensor of ``shape`` as a few n-d boxes (offsets, lengths).

    At most 2 per dimension: a ragged head, a block of whole sub-tensors, a ragged tail.
    """
    if lo >= hi:
        return []
    if not shape:
        return [((), ())]
    inner = math.prod(shape[1:])
    first, last = lo // inner, (hi - 1) // inner
    boxes = []
    if first == last:  # within one sub-tensor along dim 0
        for offsets, lengths in flat_range_boxes(shape[1:], lo - first * inner, hi - first * inner):
            boxes.append(((first, *offsets), (1, *lengths)))
        return boxes
    if lo > first * inner:
        boxes += [((first, *o), (1, *n)) for o, n in flat_range_boxes(shape[1:], lo - first * inner, inner)]
        first += 1
    whole_end = last if hi < (last + 1) * inner else last + 1
    if whole_end > first:
        boxes.append(((first, *([0] * (len(shape) - 1))), (whole_end - first, *shape[1:])))
    if whole_end == last:
        boxes += [((last, *o), (1, *n)) for o, n in flat_range_boxes(shape[1:], 0, hi - last * inner)]
    return boxes


def flat_index(shape: tuple[int, ...], offsets: tuple[int, ...]) -> int:
    """Row-major position of the element at ``offsets`` in a tensor of ``shape``."""
    index = 0
    for size, offset in zip(shape, offsets):
        index = index * size + offset
    return index


def flat_range_pieces(key: str, shape: tuple[int, ...], lo: int, values: torch.Tensor) -> list[Piece]:
    """Pieces (views of the 1-D ``values``) for elements [lo, lo + len(values)) of a ``shape`` tensor.

    Every box ``flat_range_boxes`` makes is itself a contiguous run of elements, so each piece is a
    plain view of ``values``.
    """
    pieces = []
    for offsets, lengths in flat_range_boxes(shape, lo, lo + values.numel()):
        start = flat_index(shape, offsets) - lo
        pieces.append(Piece(key, shape, offsets, values[start : start + math.prod(lengths)].view(lengths)))
    return pieces


def rows_share(piece: Piece, rank: int, world: int) -> Piece | None:
    """Rank ``rank``'s share of a replicated piece for saving: a block of its first dimension.

    A 0-d value (a step count) is written by every rank that holds it: the copies are equal, and no
    rank can know without asking whether a lower one holds it too.
    """
    if piece.share is not None:
        rank, world = piece.share
    if not piece.lengths:
        return piece
    if piece.lengths[0] == 0:
        return piece if rank == 0 else None
    rows = piece.lengths[0]
    lo, hi = rows * rank // world, rows * (rank + 1) // world
    if lo == hi:
        return None
    offsets = (piece.offsets[0] + lo, *piece.offsets[1:])
    return Piece(piece.key, piece.shape, offsets, piece.tensor[lo:hi], required=piece.required)


def overlap(a_off, a_len, b_off, b_len) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The intersection of two boxes, or None."""
    lo = tuple(max(x, y) for x, y in zip(a_off, b_off))
    hi = tuple(min(x + n, y + m) for x, n, y, m in zip(a_off, a_len, b_off, b_len))
    if any(h <= low for low, h in zip(lo, hi)):
        return None
    return lo, tuple(h - low for low, h in zip(lo, hi))


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
