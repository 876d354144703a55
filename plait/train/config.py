"""What ``plait train`` can be told, as frozen dataclasses: one section per concern.

Each field's docstring is its ``--help`` text; the CLI flags (``--n-layer``, ``--lr``...) and the TOML
sections (``[model]``, ``[data]``, ``[optim]``, ``[train]``) are derived from these classes, so a
field is declared once. The strategy's options are the fields of the strategy's own dataclass
(``plait.DDP``, ``plait.Zero``...): flags of ``plait train --strategy NAME`` and the ``[strategy]`` table.

Validation is in one place, :func:`plait.train.fields.check_fields`, called by every section's
``__post_init__``: each value's type is checked against the field's annotation, then its range (the
class's ``ranges``). Checks that relate fields follow in the same ``__post_init__``; all run on every rank.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any, ClassVar

from plait.errors import ConfigError
from plait.models import PRESETS
from plait.strategies import DDP, Strategy, options, resolve, strategy_class
from plait.train.fields import NON_NEGATIVE, POSITIVE, Range, check_fields, from_mapping, hints, plain, typed

AUTO = "auto"
"""``--strategy auto``: the planner (``plait.plan``) picks the strategy before training. Until it does, the
run carries ddp's options (bucket_mb, mixed_precision...), which the planner takes into account."""


def parsed_as(strategy: str) -> str:
    """The strategy whose options a run naming ``strategy`` takes: itself, or ddp's for auto."""
    return "ddp" if strategy == AUTO else strategy


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model: str = "gpt-tiny"
    """Preset to train: one of plait.models.PRESETS (gpt-tiny, gpt-mini, gpt-small, ...), or
    hf:PATH/config.json, a Hugging Face causal LM built from that config (pip install 'plait[hf]')."""
    n_layer: int | None = None
    """Override the preset's number of transformer blocks."""
    n_head: int | None = None
    """Override the preset's number of attention heads."""
    n_embd: int | None = None
    """Override the preset's embedding width."""
    block_size: int | None = None
    """Override the preset's context length (tokens per training sequence)."""
    vocab_size: int | None = None
    """Override the preset's vocabulary size (with --data train.bin: above its largest token id)."""
    dropout: float = 0.0
    """Dropout probability in attention and MLP."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in backward instead of keeping them (torch's
    non-reentrant checkpoint; an hf: model's decoder layers through HF's own), under any strategy."""

    ranges: ClassVar[dict[str, Range]] = {
        "n_layer": POSITIVE,
        "n_head": POSITIVE,
        "n_embd": POSITIVE,
        "block_size": POSITIVE,
        "vocab_size": POSITIVE,
        "dropout": Range(ge=0, lt=1),
    }

    def __post_init__(self) -> None:
        check_fields(self)
        if self.model not in PRESETS and not self.model.startswith("hf:"):
            raise ConfigError(
                f"model={self.model!r} is not a preset; use one of {sorted(PRESETS)} or hf:PATH/config.json"
            )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    data: str = "stdlib"
    """Training text: "stdlib" (the bytes of this Python's standard library .py files), "synthetic", or a
    path: a text file, a directory of text files (bytes as tokens), or nanoGPT's train.bin (uint16 ids;
    val.bin beside it validates), read by memory map."""
    val_fraction: float = 0.05
    """Share of the corpus files held out for validation."""
    synthetic_tokens: int = 2_000_000
    """Length of the synthetic token stream (with --data synthetic)."""

    ranges: ClassVar[dict[str, Range]] = {"val_fraction": Range(gt=0, lt=1), "synthetic_tokens": POSITIVE}

    def __post_init__(self) -> None:
        check_fields(self)
        if self.data not in ("stdlib", "synthetic") and not Path(self.data).exists():
            raise ConfigError(
                f"data={self.data!r} is not known: use 'stdlib', 'synthetic' or the path of an existing file or "
                "directory (text, or nanoGPT's train.bin)"
            )


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
    eps: float = 1e-8
    """AdamW's epsilon, added to the root of the second moment."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""

    ranges: ClassVar[dict[str, Range]] = {
        "lr": POSITIVE,
        "min_lr": NON_NEGATIVE,
        "warmup_steps": NON_NEGATIVE,
        "weight_decay": NON_NEGATIVE,
        "beta1": Range(ge=0, lt=1),
        "beta2": Range(ge=0, lt=1),
        "grad_clip": NON_NEGATIVE,
        "eps": POSITIVE,
    }

    def __post_init__(self) -> None:
        check_fields(self)
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr={self.min_lr} must be <= lr={self.lr}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    """Optimizer steps to train."""
    batch_size: int = 32
    """Global batch in sequences per optimizer step: the same whatever the number of ranks."""
    micro_batch: int = 8
    """Sequences per rank per forward/backward; batch_size / (micro_batch x ranks) micro-steps accumulate."""
    strategy: str = "ddp"
    """How to split the work: none, ddp, zero1, zero2, zero3, async, local-sgd, tp, pp, hybrid or auto. Its
    options are flags too (plait train --strategy NAME --help lists them) and the [strategy] table of a
    config file."""
    slow_rank: int | None = None
    """Make this rank a straggler (experiments): its compute (the step less its time blocked in
    collectives) takes slow_factor times as long."""
    slow_factor: float = 1.0
    """How much longer the slow rank computes (2.0: twice as long; waiting for others is not scaled)."""
    balance: str = "equal"
    """Data-parallel shares of the global batch: "equal"; "auto" (from the third step, proportional to each
    rank's measured speed); or sequences per rank, "24,8". The loss is weighted so the update is the
    equal split's (plait.data.balance)."""
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
    flush_denormal: bool = True
    """Compute with subnormal floats (below 1.2e-38 in fp32) as zero on CPU (``torch.set_flush_denormal``).
    A CPU computes on them many times slower, and a transformer's forward and backward make more of them
    as it trains: without this a GPT's step here grows ~1.5x in 300 steps (docs/benchmarks.md). GPUs are
    unaffected; the results differ from an unflushed run only through values below that bound."""
    run_dir: str | None = None
    """Where run.toml, checkpoints/, metrics.jsonl and summary.json go; default: a new runs/<time>-<strategy>,
    with runs/latest pointing at the newest. One job at a time uses a run dir (run.lock names it)."""
    resume: str = "auto"
    """"auto": continue from the run dir's newest checkpoint if its recorded settings (run.toml: model, data,
    optim, and batch_size, seed) match these, else stop naming the difference; "never": start afresh
    (a run dir that holds checkpoints is an error); or a checkpoint directory to start from (its state, these
    settings)."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    tensorboard: bool = False
    """Also write the run's scalars as TensorBoard event files under RUN_DIR/tensorboard/."""
    print_every: int = 0
    """Print a line with the step's loss and learning rate on rank 0 every this many steps (0: never)."""
    deepspeed: str | None = None
    """A DeepSpeed JSON config (ds_config.json) to take the batch, ZeRO stage, precision, optimizer,
    scheduler and clipping from; flags and --config still win over it."""
    deepspeed_lenient: bool = False
    """Train even when the DeepSpeed config asks for what plait does not implement (listed, ignored)."""

    ranges: ClassVar[dict[str, Range]] = {
        "steps": POSITIVE,
        "batch_size": POSITIVE,
        "micro_batch": POSITIVE,
        "slow_rank": NON_NEGATIVE,
        "slow_factor": Range(ge=1),
        "save_every": NON_NEGATIVE,
        "keep_checkpoints": Range(ge=1),
        "desync_every": NON_NEGATIVE,
        "mem_cap_gb": POSITIVE,
        "eval_every": NON_NEGATIVE,
        "eval_batches": POSITIVE,
        "seed": Range(ge=0, lt=2**63),
        "print_every": NON_NEGATIVE,
    }

    def __post_init__(self) -> None:
        check_fields(self)
        strategy_class(parsed_as(self.strategy))
        if self.batch_size % self.micro_batch:
            raise ConfigError(
                f"batch_size={self.batch_size} is not a multiple of micro_batch={self.micro_batch}; "
                f"use a micro_batch that divides it"
            )
        if self.run_dir is not None and Path(self.run_dir).exists() and not Path(self.run_dir).is_dir():
            raise ConfigError(f"run_dir={self.run_dir!r} is a file, not a directory; give a directory")
        if self.resume not in ("auto", "never") and not Path(self.resume, "manifest.json").is_file():
            raise ConfigError(
                f"resume={self.resume!r} is not 'auto', 'never' or a checkpoint directory (one with a manifest.json)"
            )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs, one section per concern."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    strategy: Strategy = dataclasses.field(default_factory=DDP)
    """The strategy object ``train.strategy`` names, with the options of the ``[strategy]`` table."""

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain values only (an import path for a class, lists for tuples): what TOML holds."""
        sections = {name: plain(getattr(self, name)) for name in SECTIONS}
        sections["strategy"] = {
            f.name: plain(getattr(self.strategy, f.name)) for f in options(parsed_as(self.train.strategy))
        }
        return sections


RECORDED_TRAIN_FIELDS = ("batch_size", "seed")
"""Of ``[train]``, what decides the numbers a run computes (the global batch, the data order and
initialisation); how the work is split (the strategy, micro_batch) and cadences do not. ``steps`` may
differ: raising it is how a finished run trains further (the lr schedule then spans the new length)."""


def recorded(config: RunConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the run that wrote the checkpoint, as ``section.field``."""
    values = config.to_dict()
    fields = {
        f"{section}.{k}": v for section in ("model", "data", "optim") for k, v in values[section].items()
    }
    return fields | {f"train.{k}": values["train"][k] for k in RECORDED_TRAIN_FIELDS}


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
}
"""The training sections; ``[strategy]`` holds the fields of the strategy ``train.strategy`` names."""


def strategy_from(name: str, given: collections.abc.Mapping[str, Any]) -> Strategy:
    """The strategy ``name`` with the options ``given`` (plain values, type-checked against its fields)."""
    cls, _ = strategy_class(name)
    known = hints(cls)
    return resolve(name, **{k: typed(k, v, known[k]) if k in known else v for k, v in given.items()})


def check_tables(values: Any) -> None:
    """``values`` is ``{section: {field: value}}`` with known section names, else a ConfigError."""
    if not isinstance(values, collections.abc.Mapping):
        raise ConfigError(f"a config is a table of sections, not {values!r}")
    extra = set(values) - set(SECTIONS) - {"strategy"}
    if extra:
        raise ConfigError(f"unknown config section(s) {sorted(extra)}; use {[*sorted(SECTIONS), 'strategy']}")
    for section, given in values.items():
        if not isinstance(given, collections.abc.Mapping):
            raise ConfigError(f"[{section}] must be a table of fields (name = value), not {given!r}")


def build(values: collections.abc.Mapping[str, Any]) -> RunConfig:
    """A RunConfig from nested ``{section: {field: value}}``; unknown names are a ConfigError."""
    check_tables(values)
    sections = {}
    for section in [*SECTIONS, "strategy"]:
        given = values.get(section, {})
        if section == "strategy":
            sections[section] = strategy_from(parsed_as(sections["train"].strategy), given)
        else:
            sections[section] = from_mapping(SECTIONS[section], given, section)
    return RunConfig(**sections)


def _toml_value(value: Any) -> str:
    if isinstance(value, collections.abc.Mapping):
        pairs = [f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items() if v is not None]
        return "{" + ", ".join(pairs) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)


def to_toml(config: RunConfig) -> str:
    """The config as TOML that :func:`load_toml` and :func:`build` read back to an equal RunConfig."""
    lines = []
    for section, values in config.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{name} = {_toml_value(value)}" for name, value in values.items() if value is not None]
        lines.append("")
    return "\n".join(lines)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file with ``[model] [data] [optim] [train] [strategy]`` tables."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {str(path)!r} is a directory; give a TOML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text ({e}); give a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {e.strerror}") from None
