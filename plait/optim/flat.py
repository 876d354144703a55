"""What plait's optimizers share: the torch.optim.Optimizer API over flat buffers.

Each parameter group is laid out as one (or a few) contiguous :class:`~plait.buffers.FlatRun`, so
``step()`` is a handful of tensor operations per run, never a kernel per parameter (the one
per-parameter work left is an identity check that each ``.grad`` is still its flat view). Where a
strategy already placed the parameters in a FlatBuffer (group by group), the optimizer updates
that memory in place; otherwise it flattens the group itself on first use.

The optimizer state is flat too (one tensor per state name per run). ``self.state[param]`` holds
views into it, so ``state_dict()`` has exactly torch's format and a state dict saved by
``torch.optim.AdamW`` loads here and vice versa.
"""

from __future__ import annotations

from typing import Any

import torch

from plait.buffers import FlatRun, flat_runs, has_storage, restore_storage


class FlatOptimizer(torch.optim.Optimizer):
    """Base class: subclasses name their per-element state and implement :meth:`update`."""

    state_names: tuple[str, ...] = ()

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        self._runs: list[list[FlatRun]] | None = None
        self._flat_state: list[list[dict[str, torch.Tensor]]] = []
        self._skip_next = False
        self.skipped_steps = 0

    def skip_next_step(self) -> None:
        """Make the next ``step()`` a no-op (fp16 loss scaling found inf/nan gradients): no update, no step count."""
        self._skip_next = True

    # -- layout -------------------------------------------------------------------------------

    def _ensure_flat(self) -> list[list[FlatRun]]:
        """Lay out each group as flat runs, once, on first use (after a strategy placed the parameters)."""
        if self._runs is None:
            self._runs = [flat_runs([p for p in g["params"] if p.requires_grad]) for g in self.param_groups]
            self._flat_state = [[{} for _ in runs] for runs in self._runs]
        return self._runs

    def materialize_state(self) -> None:
        """Allocate every run's state now (zeros, step 0), as a checkpoint load needs somewhere to write."""
        for g, group_runs in enumerate(self._ensure_flat()):
            for r, run in enumerate(group_runs):
                self._init_state(g, r, run)

    def _init_state(self, group_index: int, run_index: int, run: FlatRun) -> dict[str, torch.Tensor]:
        """Allocate a run's state (zeros, one tensor per name) and expose per-parameter views in ``self.state``."""
        flat = self._flat_state[group_index][run_index]
        if not flat:
            flat["step"] = torch.zeros((), dtype=torch.float32, device=run.data.device)
            for name in self.state_names:
                flat[name] = torch.zeros_like(run.data)
            self._expose_state(run, flat)
        return flat

    def _expose_state(self, run: FlatRun, flat: dict[str, torch.Tensor]) -> None:
        buffer = run.buffer
        for i in range(run.first, run.last + 1):
            lo = buffer.offsets[i] - run.start
            hi = lo + buffer.numels[i]
            param = buffer.params[i]
            entry = {"step": flat["step"]}
            entry.update({name: flat[name][lo:hi].view_as(param) for name in self.state_names})
            self.state[param] = entry

    # -- the torch.optim.Optimizer API ----------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._skip_next:
            self._skip_next = False
            self.skipped_steps += 1
            return loss
        runs = self._ensure_flat()
        for g, (group, group_runs) in enumerate(zip(self.param_groups, runs)):
            for r, run in enumerate(group_runs):
                _gather_grads(run)
                state = self._init_state(g, r, run)
                self.update(group, run.data, run.grad, state)
        return loss

    def update(
        self, group: dict[str, Any], param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor]
    ) -> None:
        """Apply one step to the flat ``param`` from the flat ``grad``; ``state`` holds flat tensors."""
        raise NotImplementedError

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gradients, as torch does: set each ``.grad`` to None, or zero the flat buffer in place.

        ``set_to_none=True`` (the default) is the cheaper of the two here too: no pass over memory now,
        and in the next backward autograd hands each fresh gradient to the flat buffer's hook, which
        copies it into its slice (one write) instead of adding it to a zeroed one (a zeroing pass, then
        a read and a write). A parameter that then gets no gradient counts as zero in ``step()``.
        """
        for group_runs in self._ensure_flat():
            for run in group_runs:
                if set_to_none:
                    for param in run.buffer.params[run.first : run.last + 1]:
                        param.grad = None
                elif has_storage(run.buffer.grad):  # a released gradient is already gone
                    run.grad.zero_()
                    run.buffer.attach_grads()

    def state_dict(self) -> dict[str, Any]:
        """torch's format, with a ``step`` tensor of its own for each parameter.

        The flat state shares one step tensor per run; torch's optimizers add 1 to each parameter's
        step in place, so a shared tensor loaded there would advance once per parameter per step.
        """
        state_dict = super().state_dict()
        state_dict["state"] = {
            key: {**entry, "step": entry["step"].clone()} for key, entry in state_dict["state"].items()
        }
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a torch-format state dict, copying each parameter's state into fresh flat state.

        Like torch, loading replaces all state: a run with no state in ``state_dict`` starts over.
        """
        super().load_state_dict(state_dict)
        loaded = {p: dict(s) for p, s in self.state.items()}
        self.state.clear()
        runs = self._ensure_flat()
        self._flat_state = [[{} for _ in group_runs] for group_runs in runs]
        for g, group_runs in enumerate(runs):
            for r, run in enumerate(group_runs):
                members = run.buffer.params[run.first : run.last + 1]
                if not any(p in loaded for p in members):
                    continue
                flat = self._init_state(g, r, run)
                # torch's SGD keeps no step count: a parameter with state has taken at least one step.
                steps = {float(loaded[p].get("step", 1)) for p in members if p in loaded}
                if len(steps) != 1:
                    raise ValueError(f"parameters of one group have different step counts {sorted(steps)}")
                flat["step"].fill_(steps.pop())
                for p in members:
                    for name in self.state_names:
                        if p in loaded and loaded[p].get(name) is not None:
                            self.state[p][name].copy_(loaded[p][name])


def _gather_grads(run: FlatRun) -> None:
    """Make ``run.grad`` hold each parameter's gradient as of now.

    A parameter whose ``.grad`` is not its flat view was set to None (``model.zero_grad()``) and got
    no gradient since, or was handed a tensor made elsewhere; its flat slice still holds an older
    gradient, so it is zeroed (no gradient counts as zero, as in DDP) or overwritten. Only identity
    checks run when every view is attached, so the loop launches no kernels in the common case.
    """
    buffer = run.buffer
    restore_storage(buffer.grad, zero=True)  # stepping with no gradient since it was released: zeros
    for i in range(run.first, run.last + 1):
        param, view = buffer.params[i], buffer.grad_views[i]
        if param.grad is not view:
            if param.grad is None:
                view.zero_()
            else:
                view.copy_(param.grad)
            param.grad = view


def fused_kernels_available(tensor: torch.Tensor) -> bool:
    """torch ships fused AdamW/SGD kernels for floating-point tensors on CPU and CUDA."""
    return tensor.device.type in ("cpu", "cuda") and tensor.is_floating_point()
