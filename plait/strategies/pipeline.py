"""Pipeline parallelism: GPipe (Huang et al., 2019) and 1F1B, PipeDream-Flush (Narayanan et al., 2021).

The model's layer list (``model.pipeline_layers()``: for a GPT the embedding, each block, the head)
is cut into p contiguous *stages*, one per rank of the pipeline group; a rank keeps only its
stage's modules. The local batch is cut into m *micro-batches*. Stage s runs a micro-batch's
forward on the activation stage s-1 sends it and sends its own output on to s+1; backward runs the
other way with the gradients of those activations. Per micro-batch and stage boundary, one
activation goes forward and one gradient back (B/m x T x C elements each for a GPT), by
``isend``/``irecv`` on the pipeline group; before the first activation of a step, a 10-integer
header tells the next stage its shape and dtype, so no stage needs to know another's shapes.

Schedules (F = forward of one micro-batch, B = its backward; stage s of p):

    gpipe   F0 F1 ... F(m-1)  B0 B1 ... B(m-1)            activations of m micro-batches alive
    1f1b    p-s-1 warm-up forwards, then one F and one B in turn, then the remaining Bs:
            at most p-s micro-batches alive at once, the same bubble as GPipe

Either way every stage idles, at the start and the end of a step, for a fraction (p-1)/(m+p-1) of it
when the stages are equally fast: the *bubble*. It is measured as 1 - (mean busy time of the stages)
/ (the slowest stage's step time), a stage being busy whenever it is not blocked on a neighbour;
slower stages than others show up in it as they do in the step time.

A parameter owned by layers on two stages (GPT's tied embedding and head, on the first and the last)
is kept on both; their gradients are summed by an all-reduce over a group of just those ranks after
the schedule, as Megatron's embedding group does, so both copies take the same step.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from plait.comm import Group, Handle
from plait.errors import ConfigError
from plait.strategies.base import split_microbatches

SCHEDULES = ("1f1b", "gpipe")
Layer = tuple[tuple[str, ...], Callable[[torch.Tensor], torch.Tensor]]
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64)
_HEADER = 10  # dtype, ndim, up to 8 dims


def layers_of(model: nn.Module) -> list[Layer]:
    """The model's layer chain: ``model.pipeline_layers()``, a list of (module paths, function)."""
    if not hasattr(model, "pipeline_layers"):
        raise ConfigError(
            f"{type(model).__name__} has no pipeline_layers(): give it a method returning its layers in "
            "order as (module paths the layer owns, function of one tensor), as plait's GPT does"
        )
    return model.pipeline_layers()


def layer_sizes(model: nn.Module, layers: list[Layer]) -> list[int]:
    """Parameter elements of each layer (a parameter two layers share counts in both)."""
    sizes = []
    for paths, _ in layers:
        params = {id(p): p for path in paths for p in model.get_submodule(path).parameters()}
        sizes.append(sum(p.numel() for p in params.values()))
    return sizes


def balance(sizes: list[int], stages: int) -> tuple[int, ...]:
    """Where stages 1..p-1 begin so that the largest stage (in parameters) is as small as possible."""
    n = len(sizes)
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    # best[k][i]: the smallest possible largest stage when layers [0, i) form k stages
    best = [[float("inf")] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    starts, i = [], n
    for k in range(stages, 1, -1):
        i = cut[k][i]
        starts.append(i)
    return tuple(reversed(starts))


def check_pipeline(
    model: nn.Module, stages: int, microbatches: int, schedule: str, boundaries: tuple[int, ...] | None
) -> None:
    """Raise ConfigError naming the value and what would fit, before anything is split."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule={schedule!r} is not known; use one of {SCHEDULES}")
    if microbatches < stages:
        raise ConfigError(
            f"microbatches={microbatches} is fewer than pp={stages} stages: the pipeline never fills; "
            f"use microbatches >= {stages}"
        )
    n = len(layers_of(model))
    if n < stages:
        raise ConfigError(
            f"pp={stages} stages need at least {stages} layers, but {type(model).__name__} has {n} "
            f"(its pipeline_layers(): for a GPT n_layer + 2); use pp in {{{', '.join(map(str, range(1, n + 1)))}}}"
        )
    if boundaries is not None and (
        len(boundaries) != stages - 1
        or list(boundaries) != sorted(set(boundaries))
        or not all(0 < b < n for b in boundaries)
    ):
        raise ConfigError(
            f"boundaries={boundaries} must be {stages - 1} increasing layer indices in [1, {n - 1}]: "
            "where each stage after the first begins"
        )


def pipeline_microbatches(stages: int, dp: int, batch_size: int, micro_batch: int) -> int:
    """Micro-batches per step when each of ``dp`` pipelines takes ``batch_size / dp`` sequences, ``micro_batch``
    at a time; at least ``stages`` of them, or a ConfigError naming the micro_batch (or batch_size) that fits."""
    per_step = dp * micro_batch
    if stages > 1 and batch_size // per_step < stages:
        local = batch_size // dp
        fits = [str(m) for m in range(1, local + 1) if local % m == 0 and local // m >= stages]
        raise ConfigError(
            f"pp={stages} stages need at least {stages} micro-batches per step, but batch_size / (dp x micro_batch) "
            f"= {batch_size} / ({dp} x {micro_batch}) gives {batch_size // per_step}; "
            + (
                f"use a micro_batch in {{{', '.join(fits)}}}"
                if fits
                else f"use a batch_size of at least {dp * stages}"
            )
        )
    return max(1, batch_size // per_step)


def schedule_actions(kind: str, stage: int, stages: int, microbatches: int) -> list[tuple[str, int]]:
    """The order in which ``stage`` runs forwards ("F", i) and backwards ("B", i) of micro-batches i."""
    m = microbatches
    if kind == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    warmup = min(stages - stage - 1, m)
    actions = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        actions += [("F", warmup + i), ("B", i)]
    return actions + [("B", i) for i in range(m - warmup, m)]


class PipelineStage:
    """This rank's layers of the model; the rest are removed (replaced by ``nn.Identity``).

    Also records, for every key of the whole model's state dict, the stage that holds it, and which
    parameters several stages hold (tied ones), grouped by the set of stages that share them.
    """

    def __init__(self, model: nn.Module, stages: int, boundaries: tuple[int, ...] | None, stage: int):
        layers = layers_of(model)
        starts = (0, *(boundaries or balance(layer_sizes(model, layers), stages)), len(layers))
        stage_of = [s for s in range(stages) for _ in range(starts[s], starts[s + 1])]
        self.stage, self.stages, self.starts = stage, stages, starts
        self.functions = [fn for (_, fn), s in zip(layers, stage_of) if s == stage]
        self.owner = self._owners(model, layers, stage_of)
        holders: dict[nn.Parameter, set[int]] = {}
        for (paths, _), s in zip(layers, stage_of):
            for path in paths:
                for p in model.get_submodule(path).parameters():
                    holders.setdefault(p, set()).add(s)
        shared = {p: tuple(sorted(h)) for p, h in holders.items() if len(h) > 1}
        self.tied_sets = sorted(set(shared.values()))
        """Every set of stages that share parameters (the same list on every rank)."""
        self.tied = {s: [p for p, h in shared.items() if h == s] for s in self.tied_sets if stage in s}
        """This stage's shared parameters, by the set of stages sharing them."""
        for (paths, _), s in zip(layers, stage_of):
            if s != stage:
                for path in paths:
                    parent, _, child = path.rpartition(".")
                    setattr(model.get_submodule(parent), child, nn.Identity())

    @staticmethod
    def _owners(model: nn.Module, layers: list[Layer], stage_of: list[int]) -> dict[str, int]:
        """State-dict key -> the stage holding it (the first stage of a tied parameter's keys)."""
        owner = {}
        for key in model.state_dict():
            for (paths, _), s in zip(layers, stage_of):
                if any(key.startswith(path + ".") for path in paths):
                    owner[key] = s
                    break
            else:
                raise ConfigError(f"{key} belongs to no layer of pipeline_layers(); every module must")
        return owner

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self.functions:
            x = fn(x)
        return x


def header_of(tensor: torch.Tensor) -> torch.Tensor:
    """The shape and dtype of ``tensor`` as one 10-element int64 message (80 bytes)."""
    header = torch.zeros(_HEADER, dtype=torch.int64)
    header[0], header[1] = _DTYPES.index(tensor.dtype), tensor.dim()
    header[2 : 2 + tensor.dim()] = torch.tensor(tensor.shape)
    return header


def read_header(header: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
    return tuple(header[2 : 2 + int(header[1])].tolist()), _DTYPES[int(header[0])]


ForwardLoss = Callable[[Callable[[], torch.Tensor], torch.Tensor], torch.Tensor]
"""(a function producing the last stage's output, the targets) -> the loss of that output."""


class PipelineSchedule:
    """Runs one step's micro-batches through a stage under a schedule; measures the bubble."""

    def __init__(self, stage: PipelineStage, group: Group, microbatches: int, kind: str) -> None:
        self.stage, self.group, self.kind = stage, group, kind
        self.microbatches = microbatches
        """Micro-batches of the last step (the schedule's default until one ran)."""
        self.bubble = 0.0
        """Idle fraction of the pipeline in the last step (the same on every stage; see the module doc)."""
        self.peak_in_flight = 0
        """Most micro-batches whose activations this stage held at once in the last step."""
        self._sends: list[tuple[Handle, torch.Tensor]] = []
        self._idle, self._busy, self._wall = 0.0, 0.0, 0.0

    @property
    def bubble_theory(self) -> float:
        p, m = self.stage.stages, self.microbatches
        return (p - 1) / (m + p - 1)

    def _send(self, tensor: torch.Tensor, dst: int) -> None:
        """Asynchronous: a rank only ever blocks receiving, so the schedule cannot deadlock."""
        self._sends.append((self.group.send(tensor, dst, async_op=True), tensor))

    def _recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=dtype, device=self.group.device)
        start = time.perf_counter()
        self.group.recv(buffer, src)
        self._idle += time.perf_counter() - start
        return buffer

    def run(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        forward_loss: ForwardLoss,
        microbatches: int | None = None,
        loss_scale: float = 1.0,
    ) -> torch.Tensor:
        """Forward and backward every micro-batch; the summed loss (of means / m) on the last stage, else 0.

        ``microbatches``: m for this step (default: the schedule's). ``loss_scale`` multiplies the
        loss before backward (fp16 loss scaling; the returned loss is not scaled).
        """
        m, stage = microbatches or self.microbatches, self.stage
        if m < stage.stages:
            raise ConfigError(
                f"microbatches={m} is fewer than pp={stage.stages} stages: the pipeline never fills; "
                f"use microbatches >= {stage.stages}"
            )
        chunks = split_microbatches(inputs, targets, m)
        self.microbatches = m
        saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        total = torch.zeros((), device=self.group.device)
        self._idle, self.peak_in_flight, shape = 0.0, 0, None
        start = time.perf_counter()
        for kind, i in schedule_actions(self.kind, stage.stage, stage.stages, m):
            if kind == "F":
                if stage.first:
                    x = chunks[i][0]
                else:
                    if shape is None:
                        shape = read_header(self._recv((_HEADER,), torch.int64, stage.stage - 1))
                    x = self._recv(*shape, stage.stage - 1).requires_grad_()
                if stage.last:
                    out = forward_loss(lambda x=x: stage.forward(x), chunks[i][1]) / m
                    total += out.detach().float()
                    out = out * loss_scale if loss_scale != 1.0 else out
                else:
                    out = stage.forward(x)
                    if i == 0:
                        self._send(header_of(out), stage.stage + 1)
                    self._send(out.detach(), stage.stage + 1)
                saved[i] = (x, out)
                self.peak_in_flight = max(self.peak_in_flight, len(saved))
            else:
                x, out = saved.pop(i)
                grad = None if stage.last else self._recv(tuple(out.shape), out.dtype, stage.stage + 1)
                torch.autograd.backward(out, grad)
                if not stage.first:
                    self._send(x.grad, stage.stage - 1)
        waited = time.perf_counter()
        for handle, _ in self._sends:
            handle.wait()
        self._sends = []
        end = time.perf_counter()
        self._busy, self._wall = end - start - self._idle - (end - waited), end - start
        return total

    def step_figures(self, loss: torch.Tensor) -> torch.Tensor:
        """This stage's [loss, busy seconds, wall seconds] of the last step (float64), for one gather."""
        return torch.tensor([float(loss), self._busy, self._wall], dtype=torch.float64)

    def record_bubble(self, busy: torch.Tensor, wall: torch.Tensor) -> None:
        """The bubble from every stage's busy and wall seconds of the last step (this pipeline's stages)."""
        self.bubble = 1.0 - busy.mean().item() / wall.max().item()

    def broadcast_from_last(self, tensor: torch.Tensor | None) -> torch.Tensor:
        """Every stage gets the last stage's tensor: two broadcasts on the group, its header and itself."""
        last = self.stage.stages - 1
        header = header_of(tensor) if self.stage.last else torch.empty(_HEADER, dtype=torch.int64)
        self.group.broadcast(header, src=last)
        if not self.stage.last:
            shape, dtype = read_header(header)
            tensor = torch.empty(shape, dtype=dtype, device=self.group.device)
        self.group.broadcast(tensor, src=last)
        return tensor

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """``model(idx)`` under a pipeline: inference only; every stage returns the last stage's output."""
        if torch.is_grad_enabled():
            raise RuntimeError(
                "under pipeline parallelism model(x) runs inference only (inside torch.no_grad()); "
                "train with model.train_step(inputs, targets, loss_fn), which runs the schedule"
            )
        stage, x = self.stage, idx
        if not stage.first:
            shape = read_header(self._recv((_HEADER,), torch.int64, stage.stage - 1))
            x = self._recv(*shape, stage.stage - 1)
        out = stage.forward(x)
        if not stage.last:
            self.group.send(header_of(out), stage.stage + 1)
            self.group.send(out, stage.stage + 1)
        return self.broadcast_from_last(out if stage.last else None)

    def gather_state(
        self, state: dict[str, torch.Tensor], shapes: dict[str, tuple[torch.Size, torch.dtype]]
    ) -> dict[str, torch.Tensor]:
        """The whole model's state from every stage's part: per stage and dtype, one broadcast of its tensors."""
        full = {}
        for s in range(self.stage.stages):
            keys = [k for k in shapes if self.stage.owner[k] == s]
            for dtype in dict.fromkeys(shapes[k][1] for k in keys):
                mine = [k for k in keys if shapes[k][1] == dtype]
                if s == self.stage.stage:
                    packed = torch.cat([state[k].reshape(-1).to(dtype) for k in mine])
                else:
                    packed = torch.empty(sum(shapes[k][0].numel() for k in mine), dtype=dtype)
                self.group.broadcast(packed, src=s)
                for k, piece in zip(mine, packed.split([shapes[k][0].numel() for k in mine])):
                    full[k] = piece.view(shapes[k][0]).clone()
        return full
