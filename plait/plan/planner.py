"""``plait plan``: every candidate strategy for a model on this cluster, predicted, ranked, one picked.

The candidates are every strategy plait can run on ``N = hosts x ranks per host`` ranks: ddp, zero1/2/3
over all ranks; ddp with bf16 or PowerSGD (rank 4) gradients; tensor parallelism and pipelines of each degree that
divides N (the rest of the ranks data parallel, with ZeRO-1 on that axis as a second variant); local
SGD. ``plait.plan.cost.predict`` prices each one. The pick is the fastest candidate that computes
the same updates as one process (no lossy compression, no local steps) and fits: its model states
(what ``plait train --mem-cap-gb`` checks) within the cap, its whole footprint within the memory a
rank has. ``--validate`` runs each candidate for a few steps with ``plait train`` and sets the
measured step time and peak memory beside the prediction.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from plait.errors import ConfigError
from plait.plan.cost import Prediction, predict
from plait.plan.profile import Profile
from plait.plan.workload import Candidate, Workload


def candidates(workload: Workload, world: int, hosts: int) -> list[Candidate]:
    """Every strategy and mesh plait can run the workload with on ``world`` ranks."""
    found = [
        Candidate(name, dp=world, zero=int(name[-1]) if name != "ddp" else 0)
        for name in ("ddp", "zero1", "zero2", "zero3")
    ]
    if world == 1:
        return [Candidate("ddp", dp=1)]
    found.append(Candidate("ddp", dp=world, compression="bf16"))
    found.append(Candidate("ddp", dp=world, compression="powersgd"))
    if hosts > 1:
        found += [dataclasses.replace(c, hierarchical=True) for c in found if c.strategy == "ddp"]
    layers = len(workload.layer_params)
    for size in (d for d in range(2, world + 1) if world % d == 0):
        dp = world // size
        k = workload.global_batch // max(1, dp * workload.micro_batch)
        if workload.n_head % size == 0 and workload.vocab_size % size == 0:
            found.append(Candidate("tp" if dp == 1 else "hybrid", dp=dp, tp=size))
            if dp > 1:
                found.append(Candidate("hybrid", dp=dp, tp=size, zero=1))
        if size <= layers and k >= size:
            found.append(Candidate("pp" if dp == 1 else "hybrid", dp=dp, pp=size))
            if dp > 1:
                found.append(Candidate("hybrid", dp=dp, pp=size, zero=1))
    found.append(Candidate("local-sgd", dp=world, period=8))
    return [c for c in found if workload.global_batch % (c.dp * workload.micro_batch) == 0]


@dataclasses.dataclass(frozen=True)
class Plan:
    """The ranked predictions and the pick."""

    predictions: list[Prediction]
    """Fastest first."""
    pick: Prediction
    why: str


def fits(prediction: Prediction, cap_gb: float | None) -> bool:
    """Within the cap (model states, as ``plait train --mem-cap-gb`` counts) and the rank's memory."""
    return prediction.fits and (cap_gb is None or prediction.model_state_bytes <= cap_gb * 1e9)


def make_plan(
    workload: Workload, profile: Profile, world: int, hosts: int, cap_gb: float | None = None
) -> Plan:
    """Predict every candidate, rank them by step time, and pick the fastest exact one that fits."""
    predictions = sorted(
        (predict(c, workload, profile, hosts) for c in candidates(workload, world, hosts)),
        key=lambda p: p.step_s,
    )
    exact = [p for p in predictions if p.candidate.exact]
    fitting = [p for p in exact if fits(p, cap_gb)]
    if not fitting:
        smallest = min(exact, key=lambda p: p.model_state_bytes)
        raise ConfigError(
            f"no strategy fits: the smallest, {smallest.candidate.label}, holds "
            f"{smallest.model_state_bytes / 1e9:.3f} GB of model states per rank"
            + (f" over --mem-cap-gb {cap_gb:g}" if cap_gb is not None else "")
            + f" (predicted footprint {smallest.mem_bytes / 1e9:.2f} GB, a rank has "
            f"{profile.memory_per_rank_bytes / 1e9:.1f} GB); use more ranks or a smaller model"
        )
    pick = fitting[0]
    fastest = exact[0]
    if fastest is pick:
        why = (
            f"{pick.candidate.label} is the fastest that computes the same updates and fits "
            f"({pick.step_s * 1e3:,.0f} ms per step, {pick.mem_bytes / 1e9:.2f} GB per rank)"
        )
    else:
        why = (
            f"{pick.candidate.label} is the fastest that fits ({pick.step_s * 1e3:,.0f} ms per step, "
            f"{pick.model_state_bytes / 1e9:.3f} GB of model states); {fastest.candidate.label} would take "
            f"{fastest.step_s * 1e3:,.0f} ms but holds {fastest.model_state_bytes / 1e9:.3f} GB"
            + (f", over --mem-cap-gb {cap_gb:g}" if cap_gb is not None else ", more than a rank has")
        )
    return Plan(predictions, pick, why)


def record(prediction: Prediction, cap_gb: float | None) -> dict[str, object]:
    """One candidate as the ``--json`` object."""
    return {
        "strategy": prediction.candidate.label,
        "train_options": prediction.candidate.train_options(),
        "predicted_step_s": prediction.step_s,
        "predicted_tokens_per_s": prediction.tokens_per_s,
        "predicted_mem_gb": prediction.mem_bytes / 1e9,
        "predicted_model_state_gb": prediction.model_state_bytes / 1e9,
        "compute_s": prediction.compute_s,
        "optimizer_s": prediction.optimizer_s,
        "comm_s": prediction.comm_s,
        "exposed_comm_s": prediction.exposed_comm_s,
        "bubble": prediction.bubble,
        "bytes_per_level": prediction.bytes_per_level,
        "exact": prediction.candidate.exact,
        "fits": fits(prediction, cap_gb),
    }


def print_table(plan: Plan, cap_gb: float | None, measured: dict[str, dict] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="plait plan: predicted cost per step, fastest first")
    for column in (
        "strategy",
        "step",
        "tokens/s",
        "mem/rank",
        "model states",
        "bytes host",
        "bytes network",
        "fits",
    ):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    if measured:
        table.add_column("measured step", justify="right")
        table.add_column("measured mem", justify="right")
    for p in plan.predictions:
        mark = " *" if p is plan.pick else ("" if p.candidate.exact else " ~")
        row = [
            p.candidate.label + mark,
            f"{p.step_s * 1e3:,.0f} ms",
            f"{p.tokens_per_s:,.0f}",
            f"{p.mem_bytes / 2**20:,.0f} MiB",
            f"{p.model_state_bytes / 2**20:,.1f} MiB",
            f"{p.bytes_per_level.get('host', 0) / 2**20:,.1f} MiB",
            f"{p.bytes_per_level.get('network', 0) / 2**20:,.1f} MiB",
            "yes" if fits(p, cap_gb) else "no",
        ]
        if measured:
            m = measured.get(p.candidate.label)
            row += (
                [f"{m['measured_step_s'] * 1e3:,.0f} ms", f"{m['measured_mem_gb'] * 1e3:,.0f} MB"]
                if m
                else ["-", "-"]
            )
        table.add_row(*row)
    Console(width=160).print(table)
    print("* the pick; ~ not the same updates as one process (lossy or local steps): never picked")
    print(f"pick: {plan.why}")


def _run_here(argv: list[str]) -> tuple[int, str]:
    done = subprocess.run(argv, capture_output=True, text=True, env=os.environ.copy())
    return done.returncode, done.stderr


def train_flags(candidate: Candidate) -> list[str]:
    """The ``plait train`` flags that run ``candidate`` (a boolean as ``--name`` / ``--no-name``, a table inline)."""
    flags = []
    for name, value in candidate.train_options().items():
        if name == "strategy" and value in ("tp", "pp"):  # the candidate's tp x pp layout is a mesh's
            value = "hybrid"
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{flag}" if value else f"--no-{flag}")
        elif isinstance(value, dict):  # an options table, as TOML writes it inline: {rank = 4}
            flags += [f"--{flag}", "{" + ", ".join(f"{k} = {v!r}" for k, v in value.items()) + "}"]
        else:
            flags += [f"--{flag}", str(value)]
    return flags


def measure_candidate(
    candidate: Candidate,
    model: str,
    world: int,
    workload: Workload,
    steps: int,
    extra: list[str],
    run: Callable[[list[str]], tuple[int, str]] = _run_here,
) -> dict[str, float]:
    """Train ``candidate`` for ``steps`` steps with ``plait train``; its median step and peak memory.

    ``world``: ranks per host (``--nproc``); ``run`` starts the command and returns its exit status
    and stderr (by default here; on several hosts, one launcher per host with ``extra`` naming the
    rendezvous)."""
    run_dir = tempfile.mkdtemp(prefix="plait-plan-")
    argv = [
        sys.executable, "-m", "plait.cli", "train", "--model", model, "--nproc", str(world),
        "--steps", str(steps), "--batch-size", str(workload.global_batch),
        "--micro-batch", str(workload.micro_batch), "--eval-every", "0", "--no-progress",
        "--data", "synthetic", "--run-dir", run_dir, "--mem-cap-gb", "1000", *extra,
    ]  # fmt: skip
    code, stderr = run(argv + train_flags(candidate))
    if code != 0:
        raise ConfigError(f"validating {candidate.label} failed:\n{stderr[-2000:]}")
    summary = json.loads(Path(run_dir, "summary.json").read_text())
    return {
        "measured_step_s": summary["step_time_s"],
        "measured_mem_gb": max(summary["peak_memory_bytes"]) / 1e9,
        "measured_model_state_gb": summary["model_state_bytes"] / 1e9,
        "measured_bytes_per_step": summary["bytes_per_step"],
        "measured_comm_s": summary["comm_seconds_per_step"],
    }
