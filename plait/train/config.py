"""What ``plait train`` can be told, as frozen dataclasses: one section per concern.

Each field's docstring is its ``--help`` text; the CLI flags (``--n-layer``, ``--lr``...) and the TOML
sections (``[model]``, ``[data]``, ``[optim]``, ``[train]``) are derived from these classes, so a
field is declared once. All validation that needs no model or world lives in ``__post_init__``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import json
import textwrap
import tomllib
from pathlib import Path
from typing import Any

from plait.errors import ConfigError
from plait.models import PRESETS


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model: str = "gpt-tiny"
    """Preset to train: one of plait.models.PRESETS (gpt-tiny, gpt-mini, gpt-small, ...)."""
    n_layer: int | None = None
    """Override the preset's number of transformer blocks."""
    n_head: int | None = None
    """Override the preset's number of attention heads."""
    n_embd: int | None = None
    """Override the preset's embedding width."""
    block_size: int | None = None
    """Override the preset's context length (tokens per training sequence)."""
    dropout: float = 0.0
    """Dropout probability in attention and MLP."""

    def __post_init__(self) -> None:
        if self.model not in PRESETS:
            raise ConfigError(f"model={self.model!r} is not a preset; use one of {sorted(PRESETS)}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    data: str = "stdlib"
    """Training text: "stdlib" (the bytes of this Python's standard library .py files) or "synthetic"."""
    val_fraction: float = 0.05
    """Share of the corpus files held out for validation."""
    synthetic_tokens: int = 2_000_000
    """Length of the synthetic token stream (with --data synthetic)."""

    def __post_init__(self) -> None:
        if self.data not in ("stdlib", "synthetic"):
            raise ConfigError(f"data={self.data!r} is not known; use 'stdlib' or 'synthetic'")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction} must be in (0, 1)")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate, reached after warmup."""
    min_lr: float = 3e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 20
    """Steps of linear warmup from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to matrices and embeddings only (not to norms or biases)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= min_lr <= lr and lr > 0; got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps} and grad_clip={self.grad_clip} must be >= 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    """Optimizer steps to train."""
    batch_size: int = 32
    """Global batch in sequences per optimizer step: the same whatever the number of ranks."""
    micro_batch: int = 8
    """Sequences per rank per forward/backward; batch_size / (micro_batch x ranks) micro-steps accumulate."""
    strategy: str = "ddp"
    """How to split the work: none, ddp, zero1, zero2, zero3, async, local-sgd, tp, pp or hybrid."""
    bucket_mb: float = 25.0
    """DDP gradient bucket size in MiB."""
    grad_dtype: str | None = None
    """DDP: dtype gradients travel in (bf16, fp16, fp32); default: the parameters' dtype."""
    mixed_precision: str | None = None
    """bf16 or fp16 compute and communication with an fp32 master copy (ddp, zero1/2/3)."""
    staleness: int | None = None
    """async: most steps the fastest worker may run ahead of the slowest (unset: fully asynchronous)."""
    servers: int = 0
    """async: ranks that only serve parameters (0: every worker also serves a shard)."""
    period: int = 8
    """local-sgd: optimizer steps between synchronizations (H)."""
    outer: str = "average"
    """local-sgd: "average" (local SGD) or "nesterov" (DiLoCo)."""
    outer_lr: float = 0.7
    """local-sgd with outer=nesterov: DiLoCo's outer learning rate."""
    tp: int | None = None
    """tp / hybrid: tensor-parallel ranks per replica (default 2 under tp, 1 under hybrid)."""
    pp: int | None = None
    """pp / hybrid: pipeline stages (default 2 under pp, 1 under hybrid). A step's local batch runs
    through them as batch_size / (data-parallel ranks x micro_batch) micro-batches, at least pp."""
    schedule: str = "1f1b"
    """pp / hybrid: the pipeline schedule, "1f1b" or "gpipe"."""
    zero: int = 0
    """hybrid: ZeRO stage (0, 1 or 2) within the data-parallel axis, which is the remaining ranks."""
    slow_rank: int | None = None
    """Make this rank a straggler (experiments): its steps take slow_factor times as long."""
    slow_factor: float = 1.0
    """How much longer the slow rank's steps take (2.0: twice as long)."""
    save_every: int = 0
    """Save a checkpoint to RUN_DIR/checkpoints every this many steps (0: never). A run that finds a
    complete checkpoint there resumes from the latest one, as an elastic restart does."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    async_checkpoint: bool = False
    """Write checkpoints from a background thread while training goes on."""
    desync_every: int = 0
    """Every this many steps compare a checksum of the replicated parameters across ranks (0: never)."""
    mem_cap_gb: float | None = None
    """Fail with a clear error when a rank's model states (parameters, gradients, optimizer state and
    master, counted from live tensors after the first step) exceed this many GB."""
    eval_every: int = 100
    """Measure validation loss every this many steps (and at the end); 0 disables."""
    eval_batches: int = 8
    """Validation batches (of batch_size sequences) per evaluation."""
    seed: int = 0
    """Seed for the model's initialisation and the data order."""
    run_dir: str = "runs/latest"
    """Where metrics.jsonl and summary.json are written."""
    progress: bool = True
    """Show a progress bar on rank 0."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "micro_batch", "eval_batches"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every={self.eval_every} must be >= 0")
        if self.save_every < 0 or self.keep_checkpoints < 1:
            raise ConfigError(
                f"save_every={self.save_every} must be >= 0 and keep_checkpoints={self.keep_checkpoints} >= 1"
            )
        if self.slow_factor < 1:
            raise ConfigError(
                f"slow_factor={self.slow_factor} must be >= 1 (a straggler is slower, not faster)"
            )
        mesh_options = {"tp": self.tp, "pp": self.pp, "zero": self.zero or None}
        if self.strategy not in ("tp", "pp", "hybrid") and any(v is not None for v in mesh_options.values()):
            given = ", ".join(f"{k}={v}" for k, v in mesh_options.items() if v is not None)
            raise ConfigError(f"{given} needs strategy tp, pp or hybrid, not {self.strategy!r}")
        if self.mem_cap_gb is not None and self.mem_cap_gb <= 0:
            raise ConfigError(f"mem_cap_gb={self.mem_cap_gb} must be > 0")
        if self.batch_size % self.micro_batch:
            raise ConfigError(
                f"batch_size={self.batch_size} is not a multiple of micro_batch={self.micro_batch}; "
                f"use a micro_batch that divides it"
            )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs, one section per concern."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal right after it in the class body)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def build(values: dict[str, dict[str, Any]]) -> RunConfig:
    """A RunConfig from nested ``{section: {field: value}}``; unknown names are a ConfigError."""
    sections = {}
    for section, cls in SECTIONS.items():
        given = dict(values.get(section, {}))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(given) - known
        if unknown:
            raise ConfigError(f"[{section}] has no field(s) {sorted(unknown)}; known: {sorted(known)}")
        sections[section] = cls(**given)
    extra = set(values) - set(SECTIONS)
    if extra:
        raise ConfigError(f"unknown config section(s) {sorted(extra)}; use {sorted(SECTIONS)}")
    return RunConfig(**sections)


def to_toml(config: RunConfig) -> str:
    """The config as TOML that :func:`load_toml` and :func:`build` read back to an equal RunConfig."""
    lines = []
    for section, values in config.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{name} = {json.dumps(value)}" for name, value in values.items() if value is not None]
        lines.append("")
    return "\n".join(lines)


def load_toml(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a TOML file with ``[model] [data] [optim] [train]`` tables."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
