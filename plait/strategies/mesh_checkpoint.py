"""A mesh rank's checkpoint pieces as boxes of the whole model's tensors, whatever the mesh.

Inside a mesh the data-parallel runtime sees only this rank's part of the model: its pipeline stage,
under its own names (a last stage knows the tied embedding only as the head), with tensor-parallel
shards for the split parameters. A checkpoint must name the whole model's tensors, so that it loads
under any strategy and world size. Each piece is translated:

* its name becomes the canonical one (the first name of a tied tensor);
* a tensor-parallel shard becomes the boxes of the whole parameter it holds (``parts`` of them for a
  fused q|k|v; :func:`~plait.strategies.tensor_parallel.shard_boxes`);
* a replicated copy is written by its holders in turn (cut by rows over dp, or over dp x tp where the
  tp ranks hold the same copy); a tied parameter only by the stage that holds it first;
* ZeRO shards are the same on every tp rank of a replicated parameter, so only tp rank 0 writes those.
"""

from __future__ import annotations

from torch import nn

from plait.checkpoint.format import Piece
from plait.comm.mesh import Mesh
from plait.strategies.tensor_parallel import TensorParallelLayout, shard_boxes


def mesh_pieces(
    inner: list[Piece],
    params: dict[str, nn.Parameter],
    aliases: dict[str, str],
    tp: TensorParallelLayout | None,
    mesh: Mesh,
    pipelined: bool,
) -> list[Piece]:
    """``inner`` (the data-parallel runtime's pieces, named as this rank's ``params``) under the whole
    model's names and shapes; ``aliases`` maps tied names to the first one, ``tp`` is the tensor-parallel
    layout (None without), and a ``pipelined`` rank writes a tied tensor only under its first name."""
    coords, sizes = mesh.coords, mesh.sizes
    out = []
    for piece in inner:
        kind, name, *state = piece.key.split("/", 2)
        canonical = aliases.get(name, name)
        key = "/".join([kind, canonical, *state])
        split = tp.splits.get(params.get(name)) if tp is not None and kind in ("model", "optim") else None
        save = piece.save and (canonical == name or not pipelined)
        if piece.replicated:
            index, count = (
                (coords["dp"], sizes["dp"])
                if split
                else (coords["dp"] * sizes["tp"] + coords["tp"], sizes["dp"] * sizes["tp"])
            )
            share = (index, count)
        else:
            share, save = (
                None,
                save and (split is not None or coords["tp"] == 0 or not piece.tensor.dim()),
            )
        if split is None or not piece.tensor.dim():
            out.append(
                Piece(
                    key,
                    piece.shape,
                    piece.offsets,
                    piece.tensor,
                    piece.replicated,
                    save,
                    piece.required,
                    share=share,
                )
            )
            continue
        dim, parts = split
        out += shard_boxes(key, piece, dim, parts, coords["tp"], sizes["tp"], save, share)
    return out
