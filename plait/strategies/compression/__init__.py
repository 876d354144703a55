"""Gradient compression for data parallelism: fewer bytes on the wire for (about) the same average.

``compression=`` of ``plait.DDP``, ``plait.Zero`` and a mesh's dp axis takes one of

    "bf16"              each gradient element in 16 bits: 1/2 of fp32's bytes
    plait.PowerSGD(4)   each m x n gradient matrix as two rank-r factors, r(m + n) numbers
                        (Vogels et al., NeurIPS 2019); see :mod:`.powersgd`
    plait.Sign()        1 bit per element plus one fp32 scale per chunk (EF-SignSGD, Karimireddy et
                        al., ICML 2019; the scaled sign of 1-bit Adam); see :mod:`.sign`

A *compressor* replaces a runtime's all-reduce of one flat gradient message (a bucket, or a shard
of one): ``all_reduce(key, flat)`` leaves in ``flat`` the same approximate average on every rank
of the group. Messages are registered up front (``register``) with their layout (which parameter
shapes lie where), so every piece of state exists before a checkpoint is loaded into it.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019): what compression leaves out of this
step's message is kept per rank (the *residual* e) and added to the next step's gradient, so no
gradient information is lost, only delayed:  x = g + e;  send C(x);  e <- x - C(x).  The residual
is as large as the message it compensates; ``residual_dtype="bf16"`` halves it. It is never wider
than the gradient: under bf16 mixed precision it is bf16 already, and PowerSGD's factors are too.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from plait.checkpoint.format import Piece
from plait.comm import Group
from plait.comm.hierarchy import StagedHandle
from plait.errors import ConfigError
from plait.precision import parse_dtype

Layout = list[tuple[int, tuple[int, ...]]]
"""(offset, shape) of each tensor in a flat message, in order; elements no entry covers are padding."""


def _residual_dtype(value: str) -> torch.dtype:
    if value not in ("fp32", "bf16"):
        raise ConfigError(f"residual_dtype={value!r} is not supported; use 'fp32' or 'bf16'")
    return parse_dtype(value, "residual_dtype")


@dataclasses.dataclass(frozen=True)
class PowerSGD:
    """Rank-``rank`` PowerSGD with error feedback and warm start (Vogels et al., NeurIPS 2019)."""

    name: ClassVar[str] = "powersgd"

    rank: int = 4
    """Columns of the factors P (m x rank) and Q (n x rank) each m x n gradient matrix is sent as."""
    min_compression_rate: float = 2.0
    """Send a matrix plainly unless mn >= rate x rank(m + n) (tiny matrices are not worth it)."""
    warm_start: bool = True
    """Start each step's power iteration from the previous step's Q (the paper's choice)."""
    error_feedback: bool = True
    """Keep what compression left out and add it to the next step's gradient."""
    residual_dtype: str = "fp32"
    """Dtype of the error-feedback residual: "fp32" or "bf16" (half the memory, rounded residual)."""
    seed: int = 0
    """Seed of the random initial Q (the same on every rank)."""

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"PowerSGD rank={self.rank!r} must be an integer >= 1 (4 is typical)")
        if not self.min_compression_rate >= 0:
            raise ConfigError(f"min_compression_rate={self.min_compression_rate} must be >= 0")
        _residual_dtype(self.residual_dtype)


@dataclasses.dataclass(frozen=True)
class Sign:
    """Scaled sign with error feedback: 1 bit per element and a mean-magnitude scale per chunk."""

    name: ClassVar[str] = "sign"

    chunk: int = 4096
    """Elements that share one fp32 scale (a multiple of 32, so the packed signs keep the scales aligned)."""
    error_feedback: bool = True
    """Keep what the sign left out and add it to the next step's gradient (EF-SignSGD)."""
    residual_dtype: str = "fp32"
    """Dtype of the error-feedback residual: "fp32" or "bf16"."""

    def __post_init__(self) -> None:
        if not isinstance(self.chunk, int) or self.chunk < 32 or self.chunk % 32:
            raise ConfigError(f"Sign chunk={self.chunk!r} must be a positive multiple of 32 (e.g. 4096)")
        _residual_dtype(self.residual_dtype)


@dataclasses.dataclass(frozen=True)
class Bf16:
    """Gradients rounded to bf16 on the wire (summed in bf16 by the backend)."""

    name: ClassVar[str] = "bf16"

    error_feedback: bool = False
    """Keep the rounding error for the next step. Off by default: round-to-nearest loses ~2^-9 of
    each value, unbiased, and the residual would cost a full fp32 gradient per rank."""
    residual_dtype: str = "fp32"
    """Dtype of the error-feedback residual when it is on."""

    def __post_init__(self) -> None:
        _residual_dtype(self.residual_dtype)


Compression = PowerSGD | Sign | Bf16
NAMES = {"bf16": Bf16, "powersgd": PowerSGD, "sign": Sign}


def parse_compression(value: object, rank: int | None = None) -> Compression | None:
    """``compression=`` as given (None, "none", a name, or a config object) -> a config or None.

    ``rank`` sets PowerSGD's rank when ``value`` is the name "powersgd" (the CLI's --compress-rank).
    """
    if value is None or value == "none":
        return None
    if isinstance(value, PowerSGD | Sign | Bf16):
        return value
    if isinstance(value, str) and value in NAMES:
        if value == "powersgd" and rank is not None:
            return PowerSGD(rank=rank)
        return NAMES[value]()
    raise ConfigError(
        f"compression={value!r} is not known; use 'none', 'bf16', 'powersgd', 'sign', "
        "plait.PowerSGD(rank=...) or plait.Sign(chunk=...)"
    )


def cut_layout(layout: Layout, lo: int, hi: int) -> Layout:
    """The part of ``layout`` inside elements [lo, hi), offsets relative to ``lo``.

    A tensor cut by the range keeps its whole rows as a matrix (rows x trailing elements); the
    ragged head and tail of a cut row become 1-D pieces (sent plainly by PowerSGD).
    """
    out: Layout = []
    for offset, shape in layout:
        numel = 1
        for d in shape:
            numel *= d
        start, stop = max(offset, lo), min(offset + numel, hi)
        if start >= stop:
            continue
        if start == offset and stop == offset + numel:
            out.append((start - lo, shape))
            continue
        row = numel // shape[0] if len(shape) >= 2 else numel
        first = -(-(start - offset) // row) * row + offset  # the first whole row inside
        last = (stop - offset) // row * row + offset
        if len(shape) < 2 or first >= last:
            out.append((start - lo, (stop - start,)))
            continue
        if start < first:
            out.append((start - lo, (first - start,)))
        out.append((first - lo, ((last - first) // row, row)))
        if last < stop:
            out.append((last - lo, (stop - last,)))
    return out


class ErrorFeedback:
    """The per-rank residual of each message: what compression left out, added back next step."""

    def __init__(self, enabled: bool, dtype: torch.dtype) -> None:
        self.enabled = enabled
        self.dtype = dtype
        self.residuals: dict[int, torch.Tensor] = {}

    def register(self, key: int, numel: int, device: torch.device, gradient_dtype: torch.dtype) -> None:
        """The residual is never wider than the gradient it is added to (the sum rounds to the gradient's
        dtype): under bf16 mixed precision it is bf16 whatever ``residual_dtype`` asks."""
        if self.enabled:
            narrow = torch.finfo(gradient_dtype).bits < torch.finfo(self.dtype).bits
            dtype = gradient_dtype if narrow else self.dtype
            self.residuals[key] = torch.zeros(numel, dtype=dtype, device=device)

    def compensate(self, key: int, x: torch.Tensor) -> None:
        """x <- x + e: this step's gradient plus what earlier steps did not send."""
        if self.enabled:
            x.add_(self.residuals[key])

    def keep(self, key: int, residual: torch.Tensor, lo: int = 0) -> None:
        """e[lo : lo + len] <- ``residual`` (x minus what was sent for it)."""
        if self.enabled:
            self.residuals[key][lo : lo + residual.numel()].copy_(residual.reshape(-1))

    def residual(self, key: int, lo: int, numel: int) -> torch.Tensor:
        """The residual of message ``key``'s elements [lo, lo + numel), a view to add or write."""
        return self.residuals[key][lo : lo + numel]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.residuals.values())


class Compressor:
    """Averages registered flat messages over ``group`` in fewer bytes than an all-reduce."""

    def __init__(self, config: Compression, group: Group) -> None:
        self.config = config
        self.group = group
        self.feedback = ErrorFeedback(config.error_feedback, _residual_dtype(config.residual_dtype))
        self.sizes: dict[int, int] = {}
        self.dtypes: dict[int, torch.dtype] = {}

    def register(
        self, key: int, numel: int, layout: Layout, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> None:
        """Message ``key`` will be ``numel`` elements of ``dtype`` (the gradient's: bf16 under mixed
        precision) laid out as ``layout``: make its state now."""
        self.sizes[key] = numel
        self.dtypes[key] = dtype
        self.feedback.register(key, numel, device, dtype)

    def all_reduce(self, key: int, flat: torch.Tensor) -> None:
        """In place and blocking: ``flat`` becomes the (compressed) average over the group."""
        raise NotImplementedError

    def start(self, key: int, flat: torch.Tensor) -> StagedHandle:
        """:meth:`all_reduce` begun: ``flat`` is the average once the handle's ``wait`` returns.

        Every collective is issued from the caller's thread, at ``start`` or at ``wait`` (never from a
        completion callback), so ranks that start and wait in the same order issue them alike. This
        default does it all at once; PowerSGD leaves its second half to ``wait``.
        """
        self.all_reduce(key, flat)
        return StagedHandle(None, lambda: None)

    def wire_bytes(self) -> int:
        """Bytes one rank sends per step for all registered messages (the scheme's formula)."""
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        """State every rank of the group holds identically (PowerSGD's Q), by name."""
        return {}

    def checkpoint_pieces(self, prefix: str, rank: int, share: tuple[int, int] | None = None) -> list[Piece]:
        """The residuals (this rank's own, under ``rank``) and the shared state, for ``plait.checkpoint``.

        ``share``: this rank's index among the ranks holding the same state, and their number
        (default: the whole world; a cross-host compressor's group is one local rank of each host).

        Not required on load: a checkpoint from a run without compression (or of another world
        size, whose ranks' residuals do not map onto ours) starts from zero residuals.
        """
        pieces = [
            Piece(f"{prefix}/rank{rank}/residual{key}", tuple(t.shape), (0,), t, required=False)
            for key, t in self.feedback.residuals.items()
        ]
        pieces += [
            Piece(
                f"{prefix}/{name}",
                tuple(t.shape),
                (0,) * t.dim(),
                t,
                replicated=True,
                required=False,
                share=share,
            )
            for name, t in self.state().items()
        ]
        return pieces

    def memory_tensors(self) -> list[torch.Tensor]:
        """What the compressor keeps alive between steps: the residuals and its state."""
        return list(self.feedback.residuals.values()) + list(self.state().values())


class Bf16Compressor(Compressor):
    """Pre-divide by N, round to bf16, all-reduce (sum), widen back: 2(N-1)/N x 2 bytes per element."""

    def all_reduce(self, key: int, flat: torch.Tensor) -> None:
        self.feedback.compensate(key, flat)
        message = flat.div(self.group.size).to(torch.bfloat16)
        if self.feedback.enabled:
            self.feedback.keep(key, flat - message.float().mul_(self.group.size))
        self.group.all_reduce(message, op="sum")
        flat.copy_(message)

    def wire_bytes(self) -> int:
        n = self.group.size
        return sum(2 * (n - 1) * numel * 2 // n for numel in self.sizes.values())


def make_compressor(config: Compression, group: Group) -> Compressor:
    """The compressor for ``config`` on ``group``."""
    from plait.strategies.compression.powersgd import PowerSGDCompressor
    from plait.strategies.compression.sign import SignCompressor

    kind = {PowerSGD: PowerSGDCompressor, Sign: SignCompressor, Bf16: Bf16Compressor}[type(config)]
    return kind(config, group)


__all__ = [
    "Bf16",
    "Compression",
    "Compressor",
    "ErrorFeedback",
    "Layout",
    "PowerSGD",
    "Sign",
    "cut_layout",
    "make_compressor",
    "parse_compression",
]
