"""What the synchronous data-parallel runtimes (DDP, ZeRO-1/2/3) share: one way to build them.

Every one is built as ``Runtime(strategy, module, optimizer, mesh)``: the user's own strategy object
(all its options), the module as the strategy before it left it (tensor-parallel shards, one pipeline
stage: whatever the mesh's other axes kept), the user's optimizer, and the :class:`~plait.comm.Mesh`
whose ``dp`` axis it runs on. A strategy alone passes ``Mesh(ctx)``, whose dp axis is the world;
``plait.Hybrid`` passes its mesh. What a mesh needs from a data-parallel runtime it asks through the
methods below, never through the runtime's fields.
"""

from __future__ import annotations

import torch
from torch import nn

from plait.buffers import FlatBuffer
from plait.comm import Group
from plait.comm.mesh import Mesh
from plait.precision import DynamicLossScaler
from plait.strategies.base import Runtime, Strategy
from plait.strategies.master import MasterWeights


def replicate_from_rank0(model: nn.Module, buffers: list[FlatBuffer], group: Group) -> None:
    """Make every replica equal to rank 0's: one broadcast per flat buffer, one per dtype for the rest."""
    for flat in buffers:
        group.broadcast(flat.data, src=0)
    flat_ids = {id(p) for flat in buffers for p in flat.params}
    rest = [t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in flat_ids]
    for dtype in {t.dtype for t in rest}:
        tensors = [t for t in rest if t.dtype == dtype]
        packed = torch.cat([t.detach().reshape(-1) for t in tensors])
        group.broadcast(packed, src=0)
        for t, chunk in zip(tensors, packed.split([t.numel() for t in tensors])):
            t.data.copy_(chunk.view_as(t))


class DataParallelRuntime(Runtime):
    """A synchronous data-parallel runtime over the ``dp`` axis of ``mesh`` (``self.group``)."""

    def __init__(
        self, strategy: Strategy, module: nn.Module, optimizer: torch.optim.Optimizer | None, mesh: Mesh
    ) -> None:
        super().__init__(strategy, module, optimizer)
        self.device_mesh = mesh
        """The mesh whose dp axis this runtime runs on (a strategy alone: the world as one dp axis)."""
        self.group = self.dp_group = mesh.group("dp")
        self.skip_group = mesh.ctx.world
        """fp16: the ranks that agree whether a step is skipped (every rank of the mesh steps together)."""
        self.master: MasterWeights | None = None
        """The fp32 copy the optimizer steps on, where there is one (mixed precision; ZeRO's shards)."""

    def sync_gradients(self) -> None:
        """Reduce now what backwards under ``no_sync`` accumulated, exactly as a synchronized backward would.

        A backward of zero into every trainable parameter adds nothing to any gradient but fires
        every parameter's hook, so the buckets' collectives run over the accumulated sums. A pipeline
        calls this once after its schedule.
        """
        params = [p for p in self.module.parameters() if p.requires_grad]
        torch.autograd.backward(params, [p.new_zeros(()).expand_as(p) for p in params])

    @property
    def loss_scaler(self) -> DynamicLossScaler | None:
        return self.master.loss_scaler if self.master is not None else None

    def loss_scale(self) -> float:
        """What the loss is multiplied by before backward (fp16's dynamic loss scale; else 1).

        A forward hook applies it to the model's output; a caller that never runs the model's own
        forward (a pipeline stage) multiplies its loss by it instead.
        """
        scaler = self.loss_scaler
        return scaler.scale if scaler is not None else 1.0
