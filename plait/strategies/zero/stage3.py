"""ZeRO stage 3: partition the parameters too (Rajbhandari et al., SC'20, section 5.3).

The model is cut into *units*: by default each block of its layer lists (every transformer block),
plus a root unit holding the rest (embeddings, final norm, the tied head). A unit's parameters are
views of one flat buffer padded to N; between uses its storage is freed and a rank keeps only its
1/N shard. Around each unit:

    forward   before: unshard (all-gather the shards into the flat buffer; the next unit's gather
              is already in flight when prefetching); after: reshard (free the storage), except
              the root and the last unit in forward order, whose backward comes at once
    backward  before (a hook on the unit's output gradient): unshard again, prefetch the unit
              whose backward comes next; once all its gradients are ready: reduce-scatter them,
              averaged, into the owner's fp32 master gradient shard, and reshard
    step      the optimizer updates the master shard; the compute shard is refreshed from it

Per step and rank: (N-1)/N x parameter bytes for the forward all-gathers and the reduce-scatter,
(N-1)/N x all but the root's and the last unit's for the backward all-gathers: just under 1.5x
DDP's 2(N-1)/N. Parameter, gradient and optimizer memory per rank: 1/N of DDP's, plus the units
gathered at a time (the root, the current one and the prefetched one).

Under ``no_sync`` (gradient accumulation; a pipeline's micro-batches) gradients accumulate unsharded
in each parameter's ``.grad`` and units stay gathered after their backward, as under FSDP's
``no_sync``: the memory of the whole model and its gradient, until the synchronized backward (or
``sync_gradients``) reduces the sums and reshards. The root unit is gathered by the forward of the
model or of any module holding its parameters (a pipeline stage runs those without the root's).

Saved activations that alias a parameter (a linear layer keeps its weight) read the regathered
storage in backward: the parameter tensors never change, only the storage under them is freed
and refilled (the approach of FSDP1's flat parameters).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from torch import nn

from plait.buffers import FlatBuffer, free_storage, restore_storage
from plait.checkpoint.format import Piece, flat_range_pieces
from plait.checkpoint.pieces import model_pieces
from plait.comm import Group, Handle
from plait.comm.mesh import Mesh
from plait.errors import ConfigError
from plait.precision import DynamicLossScaler, parse_mixed_precision, scale_output_gradients
from plait.strategies.base import Strategy, flat_names, group_index, group_ordered, parameter_names
from plait.strategies.bucketing import GradientBuckets
from plait.strategies.compression.reducer import reducer_for
from plait.strategies.data_parallel import replicate_from_rank0
from plait.strategies.master import flat_segments
from plait.strategies.zero.sharding import ShardedMaster, ShardedRuntime, TransientGradients


def default_unit_modules(model: nn.Module) -> list[nn.Module]:
    """Each child with parameters of every ``nn.ModuleList`` in the model; else the root's direct children."""
    units = [child for module in model.modules() if isinstance(module, nn.ModuleList) for child in module]
    units = [u for u in units if any(True for _ in u.parameters())]
    if not units:
        units = [child for child in model.children() if any(True for _ in child.parameters())]
    return units


class Unit:
    """One module's parameters: gathered and freed together, sharded in between."""

    def __init__(
        self, name: str, module: nn.Module, trainable: FlatBuffer | None, frozen: FlatBuffer | None
    ) -> None:
        self.name = name
        self.module = module
        self.buffers = [flat for flat in (trainable, frozen) if flat is not None]
        self.trainable = trainable
        self.shards: list[torch.Tensor] = []  # this rank's slice of each buffer, kept while resharded
        self.handles: list[Handle] = []
        self.gathered = True

    def reshard(self) -> None:
        """Free the full storage; only the shards remain."""
        if not self.gathered:
            return
        self.wait()
        for flat in self.buffers:
            free_storage(flat.data)
        self.gathered = False

    def unshard(self, group: Group) -> None:
        """Start gathering every rank's shard into the full storage (asynchronously)."""
        if self.gathered:
            return
        for flat, shard in zip(self.buffers, self.shards):
            restore_storage(flat.data)
            self.handles.append(group.all_gather(flat.data, shard, async_op=True))
        self.gathered = True

    def wait(self) -> None:
        for handle in self.handles:
            handle.wait()
        self.handles = []


class Stage3Runtime(ShardedRuntime):
    """Parameters, gradients and optimizer state all sharded; units gathered around their use."""

    supports_no_sync = False

    theory = "all-gathers (forward: every unit; backward: all but the root and the last) + reduce-scatter, (N-1)/N x each"

    def __init__(
        self, strategy: Strategy, module: nn.Module, optimizer: torch.optim.Optimizer | None, mesh: Mesh
    ):
        super().__init__(strategy, module, optimizer, mesh)
        if optimizer is None:
            raise ConfigError("zero3 shards the optimizer: pass optimizer= to plait.setup")
        group = self.group
        self.compute = parse_mixed_precision(strategy.mixed_precision)
        self.prefetch = strategy.prefetch
        self.reducer = reducer_for(strategy, mesh, hsdp=True)
        self.shard_group = self.reducer.levels.intra if strategy.hierarchical else group
        """The ranks one copy of the parameters is sharded over: the dp group, or (HSDP) the host's ranks."""
        self.units = self._build_units(module, optimizer, strategy.unit_classes)
        replicate_from_rank0(module, [flat for unit in self.units for flat in unit.buffers], group)
        self._shard_master(optimizer)
        self._register_buckets()
        self.optimizer = self.master.optimizer
        if self.compute is not None:
            self.optimizer.register_step_post_hook(lambda *_: self._refresh_compute_shards())
        self.forward_order = list(self.units[1:])  # the root unit first, then blocks as recorded
        self._recorded: list[Unit] | None = []
        self._install_hooks()
        if self.master.loss_scaler is not None:
            scale_output_gradients(module, self.master.loss_scaler)
        trainable = [u.trainable for u in self.units if u.trainable is not None]
        self._unit_of_bucket = [u for u in self.units if u.trainable is not None]
        self.transient = TransientGradients(self.shards)
        self.schedule = GradientBuckets(
            trainable,
            None,  # each buffer is one bucket
            group,
            self._launch,
            strategy.find_unused_parameters,
            on_ready=self._collect,
            on_unused=self._collect_unused,
            on_synced=self._synced,
        )
        # backward finishes the units in reverse order and the root last; adopted from rank 0 after one step
        self.schedule.launch_order = list(reversed(range(len(trainable))))
        for unit in self.units:
            unit.reshard()

    # -- layout -----------------------------------------------------------------------------------

    def _build_units(self, module: nn.Module, optimizer: Any, classes: tuple[type, ...] | None) -> list[Unit]:
        """The root unit (index 0) and one unit per unit module, each parameter in exactly one unit."""
        modules = (
            [m for m in module.modules() if isinstance(m, classes) and m is not module]
            if classes
            else default_unit_modules(module)
        )
        inner = {id(sub) for m in modules for sub in m.modules() if sub is not m}
        modules = [m for m in modules if id(m) not in inner]  # outermost units only
        owner: dict[nn.Parameter, nn.Module] = {}
        for m in modules:
            for p in m.parameters():
                owner[p] = module if p in owner else m  # shared between units: the root holds it
        names = parameter_names(module)
        position = {p: i for i, group in enumerate(group_ordered(module, optimizer)) for p in group}
        units = []
        for m in [module, *modules]:
            mine = [p for p in module.parameters() if owner.get(p, module) is m]
            trainable = sorted((p for p in mine if p.requires_grad), key=lambda p: position[p])
            frozen = [p for p in mine if not p.requires_grad]
            units.append(
                Unit(
                    type(m).__name__,
                    m,
                    self._flat(trainable, names),
                    self._flat(frozen, names),
                )
            )
        return units

    def _flat(self, params: list[nn.Parameter], names: dict) -> FlatBuffer | None:
        if not params:
            return None
        return FlatBuffer(
            params, pad_to=self.shard_group.size, names=[names[p] for p in params], with_grad=False
        )

    def _shard_master(self, optimizer: Any) -> None:
        """fp32 master of every unit's trainable shard; compute shards (views of it in fp32) for gathering."""
        group_of = group_index(group_ordered(self.module, optimizer))
        trainable = [u.trainable for u in self.units if u.trainable is not None]
        scaler = DynamicLossScaler() if self.compute == torch.float16 else None
        # between steps stage 3 keeps no gradient at all (as FSDP2 after zero_grad): the shard is freed
        self.shards = ShardedMaster(
            trainable,
            group_of,
            optimizer,
            self.shard_group,
            scaler,
            release_grads=True,
            skip_group=self.skip_group,
        )
        self.shards.load_from([flat.data for flat in trainable])  # full precision, before any cast
        if self.compute is not None:
            for unit in self.units:
                for flat in unit.buffers:
                    flat.cast_(self.compute)
        self.shards.calibrate(trainable[0].data.dtype)
        self.master = self.shards.master
        b = 0
        for unit in self.units:
            for flat in unit.buffers:
                if flat is unit.trainable and self.compute is None:
                    unit.shards.append(self.shards.master_slice(b))  # the master itself: no copy
                else:
                    owned = flat.shard(self.shard_group.rank, self.shard_group.size)
                    unit.shards.append(flat.data[owned].clone())
            b += unit.trainable is not None

    def _register_buckets(self) -> None:
        """Compression or HSDP: each unit's trainable buffer is one bucket of the reducer."""
        self.shards.reducer = self.reducer
        if self.reducer is not None:
            self.theory = f"{self.reducer.describe()}; all-gathers (S-1)/S x (2B less two units), S the ranks sharding a copy"
            self.reducer.register_buffers([u.trainable for u in self.units if u.trainable is not None])

    def _refresh_compute_shards(self) -> None:
        for b, unit in enumerate(self._unit_of_bucket):
            unit.shards[0].copy_(self.shards.master_slice(b))

    # -- hooks around each unit -------------------------------------------------------------------

    def _install_hooks(self) -> None:
        for unit in self.units:
            unit.module.register_forward_pre_hook(self._before_forward(unit))
            unit.module.register_forward_hook(self._after_forward(unit))
        root = self.units[0]
        held = {id(p) for flat in root.buffers for p in flat.params}
        for sub in self.module.modules():
            if sub is not self.module and any(id(p) in held for p in sub.parameters(recurse=False)):
                sub.register_forward_pre_hook(lambda *_: self._ensure(root))
                sub.register_forward_hook(self._before_backward_hook(root, prefetch=False))

    def _ensure(self, unit: Unit) -> None:
        unit.unshard(self.shard_group)
        unit.wait()

    def _before_forward(self, unit: Unit):
        def hook(_module: nn.Module, _inputs: Any) -> None:
            self._ensure(unit)
            if self._recorded is not None and unit is not self.units[0]:
                self._recorded.append(unit)  # the first forward records the order units run in
            self._prefetch(unit, +1)

        return hook

    def _after_forward(self, unit: Unit):
        regather = self._before_backward_hook(unit)

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if unit is self.units[0]:
                self._stop_recording()
            if not (torch.is_grad_enabled() and self._needed_first_in_backward(unit)):
                unit.reshard()
            regather(module, inputs, output)

        return hook

    def _needed_first_in_backward(self, unit: Unit) -> bool:
        """The root (its head runs last in forward, first in backward) and the last unit in forward
        order are gathered again right away by backward: they stay gathered instead (FSDP2 and
        torchtitan keep them so: ``reshard_after_forward=False``). Two gathers fewer per micro-batch,
        both on the critical path: backward would wait for them before its first unit's compute."""
        if unit is self.units[0]:
            return True
        return self._recorded is None and bool(self.forward_order) and unit is self.forward_order[-1]

    def _before_backward_hook(self, unit: Unit, prefetch: bool = True):
        """A forward hook that has the unit gathered again before the backward of what it computed."""
        before = self._before_backward if prefetch else self._ensure

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            tensors = [
                t
                for t in torch.utils._pytree.tree_leaves(output)
                if isinstance(t, torch.Tensor) and t.requires_grad
            ]
            if tensors:  # fires once, when the first gradient w.r.t. the output exists: its backward is next
                torch.autograd.graph.register_multi_grad_hook(tensors, lambda _grad: before(unit), mode="any")

        return hook

    def _stop_recording(self) -> None:
        """The first forward (or, in a pipeline stage, the first synchronized step) fixed the order units run in."""
        if self._recorded is not None:
            self.forward_order = list(dict.fromkeys(self._recorded)) or self.forward_order
            self._recorded = None

    def _before_backward(self, unit: Unit) -> None:
        self._ensure(unit)
        self._prefetch(unit, -1)

    def _prefetch(self, unit: Unit, direction: int) -> None:
        """Start gathering the unit that runs after ``unit`` (forward: +1, backward: -1)."""
        if not self.prefetch:
            return
        order = self.forward_order
        if unit is self.units[0]:
            following = order[0] if direction > 0 and order else (order[-1] if order else None)
        elif unit in order:
            k = order.index(unit) + direction
            following = order[k] if 0 <= k < len(order) else None
        else:
            following = None
        if following is not None:
            following.unshard(self.shard_group)

    # -- gradients --------------------------------------------------------------------------------

    def _collect(self, b: int, i: int) -> None:
        self.transient.collect(self._unit_of_bucket[b].trainable, b, i)

    def _collect_unused(self, b: int, i: int) -> None:
        self.transient.collect_unused(self._unit_of_bucket[b].trainable, b, i)

    def _kept_for_next_microbatch(self, unit: Unit) -> bool:
        """Between the micro-batches of one ``train_step`` the parameters do not change: the root and
        the first unit in forward order, which the next forward gathers before any compute could
        hide it, stay gathered (two gathers fewer per micro-batch after the first)."""
        if not self.more_microbatches:
            return False
        return unit is self.units[0] or (bool(self.forward_order) and unit is self.forward_order[0])

    def _launch(self, b: int) -> Handle:
        unit = self._unit_of_bucket[b]
        if not self._kept_for_next_microbatch(unit):
            unit.reshard()  # its backward is over: every gradient of the unit is in the bucket
        return self.transient.reduce(b)

    def _synced(self) -> None:
        self._stop_recording()
        for unit in self.units:
            if not self._kept_for_next_microbatch(unit):
                unit.reshard()
        self.transient.pool.clear()
        self.shard_group.release_scratch()  # between steps stage 3 keeps only its shards
        self.shards.backward_done()
        self.master.attach_grads()

    # -- Runtime interface ------------------------------------------------------------------------

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        """Accumulate full gradients in ``.grad`` with units kept gathered (see the module doc): memory for fewer messages."""
        return self.schedule.no_sync()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Gather every unit (the whole model, briefly), copy it out, free it again."""
        for unit in self.units:
            self._ensure(unit)
        try:
            state = super().full_state_dict()
            if self.compute is not None:
                for b, unit in enumerate(self._unit_of_bucket):
                    flat = unit.trainable
                    full = torch.empty(flat.data.numel(), dtype=torch.float32, device=flat.data.device)
                    self.shard_group.all_gather(full, self.shards.master_slice(b))
                    for name, i in flat_names(self.module, flat).items():
                        state[name] = (
                            full[flat.offsets[i] : flat.offsets[i] + flat.numels[i]]
                            .view(flat.params[i].shape)
                            .clone()
                        )
        finally:
            for unit in self.units:
                unit.reshard()
        return state

    def replicated_tensors(self) -> dict[str, torch.Tensor]:
        """Only the buffers: every parameter is sharded."""
        return dict(self.module.named_buffers())

    def _gathered_bytes(self) -> tuple[int, int]:
        """Parameter bytes of every unit (reduce-scattered once per micro-batch), and those gathered
        per step of k micro-batches (``microbatches``, of the last ``train_step``): every unit in the
        first forward, all but the root and the first unit in later ones (``_kept_for_next_microbatch``),
        all but the root and the last unit in each backward (``_needed_first_in_backward``)."""

        def nbytes(*units: Unit) -> int:
            distinct = {id(u): u for u in units if u.trainable is not None}.values()
            return sum(u.trainable.data.numel() * u.trainable.data.element_size() for u in distinct)

        k, root, order = self.microbatches, self.units[0], self.forward_order
        total = nbytes(*self._unit_of_bucket)
        first, last = (order[0], order[-1]) if order else (root, root)
        forward = k * total - (k - 1) * nbytes(root, first)
        backward = k * (total - nbytes(root, last))
        return k * total, forward + backward

    def theory_bytes_per_step(self) -> int:
        """All-gathers of every unit in forward and of all but two in backward, one reduce-scatter of
        every unit: (N-1)/N x each, just under 1.5x DDP's bytes."""
        return sum(self.theory_by_link().values())

    def theory_by_link(self) -> dict[str, int]:
        """``theory_bytes_per_step`` by link level ("all" when not hierarchical); HSDP gathers within the host."""
        total, gathered_bytes = self._gathered_bytes()
        size = self.shard_group.size
        links = (
            {level: self.microbatches * n for level, n in self.reducer.theory_by_link().items()}
            if self.reducer is not None
            else {"all": (size - 1) * total // size}
        )
        gathered = "intra-host" if self.strategy.hierarchical else "all"
        links[gathered] = links.get(gathered, 0) + (size - 1) * gathered_bytes // size
        return links

    def checkpoint_pieces(self, optimizer: object) -> list[Piece]:
        """The fp32 master shards with their optimizer state, the frozen shards, the buffers whole."""
        held = {id(p) for unit in self.units for flat in unit.buffers for p in flat.params}
        pieces = self.master.checkpoint_pieces(self.shards.segments())
        for unit in self.units:
            for flat, shard in zip(unit.buffers, unit.shards):
                if flat is unit.trainable:
                    continue
                owned = flat.shard(self.shard_group.rank, self.shard_group.size)
                for seg in flat_segments(flat, owned.start, owned.stop, 0):
                    values = shard[seg.master_lo : seg.master_lo + seg.numel]
                    pieces += flat_range_pieces(f"model/{seg.name}", seg.shape, seg.param_lo, values)
        if self.shard_group is not self.group:  # HSDP: host 0 writes the shards, every host reads them
            first_host = self.reducer.levels.inter.rank == 0
            pieces = [dataclasses.replace(p, save=first_host) for p in pieces]
        compressed = self.reducer.checkpoint_pieces(self.group.rank) if self.reducer is not None else []
        return model_pieces(self.module, held) + pieces + compressed

    def after_checkpoint_load(self) -> None:
        if self.compute is not None:
            self._refresh_compute_shards()

    def parameter_tensors(self) -> list[torch.Tensor]:
        return [shard for unit in self.units for shard in unit.shards] + [
            flat.data for unit in self.units for flat in unit.buffers
        ]

    def buffer_tensors(self) -> list[torch.Tensor]:
        """Idle bucket buffers; error-feedback residuals and PowerSGD's Q, when compressing."""
        compressed = self.reducer.memory_tensors() if self.reducer is not None else []
        return self.transient.pool.tensors() + compressed
