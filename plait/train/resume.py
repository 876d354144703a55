"""Continuing a run (``--resume auto|never|PATH``): which checkpoint it starts from, checked against run.toml.

A checkpoint carries state, not settings: the run's own settings (the live optimizer's hyperparameters,
the data order) always win. So a run dir's checkpoints are continued (``auto``) only by a run whose
recorded settings (``run.toml``: model, data, optim; batch size, seed) equal the ones it was trained
with; otherwise the error names each differing field and how to proceed. Every rank decides from the
same files; then rank 0 records this run's settings in ``run.toml``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from plait import checkpoint
from plait.errors import ConfigError
from plait.train.config import RunConfig, build, load_toml, recorded, to_toml


def resume(
    config: RunConfig, checkpoints: Path, model: torch.nn.Module, optimizer: Any, rank: int
) -> tuple[Path, Any] | None:
    """Load the checkpoint ``config.train.resume`` names (collective): its directory and ``extra``, or None.

    ``checkpoints`` is the run dir's checkpoint root; then rank 0 writes ``run.toml``.
    """
    train = config.train
    record = Path(train.run_dir, "run.toml")
    if train.resume == "never":
        found = checkpoint.complete(checkpoints)
        if found:
            raise ConfigError(
                f"--resume never, but run dir {train.run_dir!r} holds checkpoints (up to step {found[-1][0]}); "
                "give a new --run-dir, or --resume auto to continue that run"
            )
        resumed = None
    elif train.resume == "auto":
        resumed = None
        if checkpoint.complete(checkpoints):
            check_recorded(config, record, checkpoints)
            resumed = checkpoint.resume(checkpoints, model, optimizer)
    else:
        step, extra = checkpoint.load(train.resume, model, optimizer)
        resumed = Path(train.resume), step, extra
    if rank == 0:  # atomically: a rank reading it sees the old settings or the new, which
        # agree on every recorded field whenever the reading rank goes on (otherwise all ranks stop)
        record.parent.mkdir(parents=True, exist_ok=True)
        partial = record.with_suffix(".toml.partial")
        partial.write_text(to_toml(config))
        os.replace(partial, record)
    if resumed is None:
        return None
    found, _, extra = resumed
    return found, extra


def check_recorded(config: RunConfig, record: Path, checkpoints: Path) -> None:
    """The run dir's recorded settings equal this run's, else a ConfigError naming what differs."""
    train = config.train
    if not record.is_file():
        raise ConfigError(
            f"run dir {train.run_dir!r} holds checkpoints but no run.toml recording their settings; give "
            f"--resume {checkpoints}/<step_...> to start from one with these settings, or a new --run-dir"
        )
    then = recorded(build(load_toml(record)))
    now = recorded(config)
    differ = [f"{k}: {then[k]!r} then, {now[k]!r} now" for k in now if then.get(k) != now[k]]
    if differ:
        raise ConfigError(
            f"run dir {train.run_dir!r} holds checkpoints of a run with other settings ({'; '.join(differ)}). "
            f"To continue it, use its settings (plait train --config {record}); to start over, give a new "
            f"--run-dir; to start from its checkpoint with the new settings, --resume {checkpoints}/<step_...>"
        )
