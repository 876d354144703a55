"""Flat buffers, buckets and shards: the one memory layout every strategy and optimizer shares.

A :class:`FlatBuffer` moves a list of parameters of one dtype and device into one contiguous
tensor and makes each parameter a view into it (``param.data`` points inside ``flat.data``); their
gradients likewise live in ``flat.grad``. A collective or an optimizer update then touches one
tensor instead of hundreds, and a slice of it (a :class:`Bucket`, a shard) is still one tensor.

Invariants:

* ``flat.data[offsets[i] : offsets[i] + numels[i]]`` *is* parameter ``i`` (same storage).
* After any backward, ``param.grad`` is the matching view of ``flat.grad``: a gradient autograd
  created elsewhere (after ``zero_grad(set_to_none=True)``, say) is copied in and replaced by the view.
* ``flat.data.numel()`` is a multiple of ``pad_to``; the padding is zero and belongs to no parameter,
  so the buffer splits into ``pad_to`` equal shards.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

_OWNER_ATTR = "_plait_flat"


def free_storage(tensor: torch.Tensor) -> None:
    """Release the memory under ``tensor`` (and every view of it); the tensors themselves stay valid objects."""
    tensor.untyped_storage().resize_(0)


def restore_storage(tensor: torch.Tensor, zero: bool = False) -> bool:
    """Give ``tensor`` its memory back if it was freed (contents undefined unless ``zero``); True if it was."""
    storage = tensor.untyped_storage()
    if storage.nbytes():
        return False
    storage.resize_(tensor.numel() * tensor.element_size())
    if zero:
        tensor.zero_()
    return True


def has_storage(tensor: torch.Tensor) -> bool:
    return tensor.untyped_storage().nbytes() > 0


def padded_size(numel: int, pad_to: int) -> int:
    """The smallest multiple of ``pad_to`` that holds ``numel`` elements."""
    return -(-numel // pad_to) * pad_to


class FlatBuffer:
    """Parameters of one dtype and device as views into one contiguous tensor; gradients likewise.

    ``dtype`` casts the parameters on the way in (mixed precision stores the compute copy this way).
    ``with_grad=False`` keeps no gradient buffer: the strategy collects gradients elsewhere (ZeRO-2/3
    copy each into a transient bucket) and the hooks only report readiness.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        pad_to: int = 1,
        names: Sequence[str] | None = None,
        with_grad: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not params:
            raise ValueError("FlatBuffer needs at least one parameter")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(
                f"FlatBuffer holds one dtype on one device; got {sorted(map(str, dtypes | devices))}"
            )
        if any(hasattr(p, _OWNER_ATTR) for p in params):
            raise ValueError("a parameter already lives in a FlatBuffer; flatten each parameter once")
        self._layout(params, names, pad_to)
        dtype = dtype or params[0].dtype
        self.data = torch.zeros(padded_size(self.numel, pad_to), dtype=dtype, device=params[0].device)
        torch.cat([p.detach().reshape(-1).to(dtype) for p in params], out=self.data[: self.numel])
        self.grad = torch.zeros_like(self.data) if with_grad else None
        for i, p in enumerate(params):
            grad = p.grad
            p.data = self.view(i)
            p.grad = None
            if self.grad is not None:
                if grad is not None:  # flattened between backward and step: keep the gradient
                    self.grad_views[i].copy_(grad)
                p.grad = self.grad_views[i]
            setattr(p, _OWNER_ATTR, (self, i))

    @classmethod
    def adopt(
        cls, params: Sequence[nn.Parameter], offsets: Sequence[int], data: torch.Tensor, grad: torch.Tensor
    ) -> FlatBuffer:
        """A FlatBuffer over parameters that already are views of ``data`` at ``offsets`` (nothing is copied).

        Gaps between them (padding) belong to no parameter. Used for the fp32 master shard of ZeRO,
        whose layout the strategy decides.
        """
        self = cls.__new__(cls)
        self._layout(params, None, 1)
        self.offsets = list(offsets)
        self.data, self.grad = data, grad
        self.grad_views = [grad[o : o + n].view_as(p) for o, n, p in zip(self.offsets, self.numels, params)]
        for i, p in enumerate(params):
            p.grad = self.grad_views[i]
            setattr(p, _OWNER_ATTR, (self, i))
        return self

    def _layout(self, params: Sequence[nn.Parameter], names: Sequence[str] | None, pad_to: int) -> None:
        self.params = list(params)
        self.names = list(names) if names is not None else [f"param{i}" for i in range(len(params))]
        self.numels = [p.numel() for p in params]
        self.offsets = [0]
        for n in self.numels[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.numel = sum(self.numels)
        self.pad_to = pad_to
        self._hooks: list = []

    def cast_(self, dtype: torch.dtype) -> None:
        """Move the parameters (and gradient buffer) to ``dtype`` in place: mixed precision's compute copy."""
        if dtype == self.data.dtype:
            return
        self.data = self.data.to(dtype)
        if self.grad is not None:
            self.grad = torch.zeros_like(self.data)
            self.__dict__.pop("grad_views", None)
        for i, p in enumerate(self.params):
            p.data = self.view(i)
            if self.grad is not None:
                p.grad = self.grad_views[i]

    def view(self, i: int) -> torch.Tensor:
        """Parameter ``i``'s slice of the flat data, in the parameter's shape."""
        return self.data[self.offsets[i] : self.offsets[i] + self.numels[i]].view(self.params[i].shape)

    @functools.cached_property
    def grad_views(self) -> list[torch.Tensor]:
        return [self.grad[o : o + n].view_as(p) for o, n, p in zip(self.offsets, self.numels, self.params)]

    def __repr__(self) -> str:
        return f"FlatBuffer({len(self.params)} params, {self.numel} elements, {self.data.dtype}, pad_to={self.pad_to})"

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def install_grad_hooks(self, on_ready: Callable[[int], None] | None = None) -> None:
        """After autograd accumulates parameter ``i``'s gradient, keep it in ``flat.grad``, then call ``on_ready(i)``.

        Autograd adds into an existing ``param.grad`` in place, so while the view is attached the
        gradient lands in the flat buffer with no copy; only a gradient made elsewhere is copied in.
        """
        self.remove_hooks()
        for i, p in enumerate(self.params):
            self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(i, on_ready)))

    def _make_hook(self, i: int, on_ready: Callable[[int], None] | None) -> Callable[[nn.Parameter], None]:
        if self.grad is None:
            return lambda param: on_ready(i) if on_ready is not None else None
        view = self.grad_views[i]

        def hook(param: nn.Parameter) -> None:
            if param.grad is not view:
                view.copy_(param.grad)
                param.grad = view
            if on_ready is not None:
                on_ready(i)

        return hook

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def attach_grads(self) -> None:
        """Point every ``param.grad`` at its view again (after someone set it to None)."""
        for p, view in zip(self.params, self.grad_views):
            p.grad = view

    def shard(self, rank: int, world: int) -> slice:
        """The slice of the flat buffer rank ``rank`` of ``world`` owns: equal sizes, padding in the last."""
        if self.data.numel() % world:
            raise ValueError(f"a buffer padded to {self.pad_to} does not split over {world} ranks")
        size = self.data.numel() // world
        return slice(rank * size, (rank + 1) * size)


def owner(param: torch.Tensor) -> tuple[FlatBuffer, int] | None:
    """The FlatBuffer a parameter lives in and its index there, or None."""
    return getattr(param, _OWNER_ATTR, None)


@dataclasses.dataclass(frozen=True)
class Bucket:
    """A run of whole parameters, consecutive in a flat buffer, reduced as one message."""

    index: int
    start: int
    stop: int
    params: tuple[int, ...]

    @property
    def numel(self) -> int:
        return self.stop - self.start


def make_buckets(numels: Sequence[int], bucket_numel: int) -> list[Bucket]:
    """Cut consecutive parameters (sizes ``numels``, in buffer order) into buckets of about ``bucket_numel``.

    A bucket closes once it holds at least ``bucket_numel`` elements, so each is a little over the cap
    rather than splitting a parameter; a parameter larger than the cap gets a bucket of its own.
    """
    if bucket_numel <= 0:
        raise ValueError(f"bucket_numel={bucket_numel} must be positive")
    buckets: list[Bucket] = []
    start, members, size, offset = 0, [], 0, 0
    for i, n in enumerate(numels):
        members.append(i)
        size += n
        offset += n
        if size >= bucket_numel:
            buckets.append(Bucket(len(buckets), start, offset, tuple(members)))
            start, members, size = offset, [], 0
    if members:
        buckets.append(Bucket(len(buckets), start, offset, tuple(members)))
    return buckets


@dataclasses.dataclass(frozen=True)
class FlatRun:
    """A contiguous slice of one FlatBuffer covering whole parameters: what an optimizer updates as one tensor."""

    buffer: FlatBuffer
    first: int
    last: int
    """Parameter indices ``first .. last`` (inclusive) of ``buffer``."""

    @property
    def start(self) -> int:
        return self.buffer.offsets[self.first]

    @property
    def stop(self) -> int:
        return self.buffer.offsets[self.last] + self.buffer.numels[self.last]

    @property
    def data(self) -> torch.Tensor:
        return self.buffer.data[self.start : self.stop]

    @property
    def grad(self) -> torch.Tensor:
        return self.buffer.grad[self.start : self.stop]


def flat_runs(params: Sequence[nn.Parameter]) -> list[FlatRun]:
    """Express ``params`` as as few contiguous flat runs as possible.

    Parameters that already live in a FlatBuffer (a strategy laid them out) are used where they are;
    the others are flattened here, one new FlatBuffer per dtype and device. When a strategy laid
    parameters out group by group, each optimizer group is exactly one run.
    """
    placed, loose = [], []
    for p in params:
        (placed if owner(p) is not None else loose).append(p)
    by_kind: dict[tuple, list[nn.Parameter]] = {}
    for p in loose:
        by_kind.setdefault((p.dtype, p.device), []).append(p)
    for group in by_kind.values():
        FlatBuffer(group).install_grad_hooks()
        placed.extend(group)
    located = sorted((owner(p) for p in placed), key=lambda bi: (id(bi[0]), bi[1]))
    runs: list[FlatRun] = []
    for buffer, i in located:
        if runs and runs[-1].buffer is buffer and runs[-1].last == i - 1:
            runs[-1] = FlatRun(buffer, runs[-1].first, i)
        else:
            runs.append(FlatRun(buffer, i, i))
    return runs
