"""Pictures of runs (``plait report``, and the loss plot ``plait train`` leaves): PNGs from metrics.jsonl.

Each figure overlays every run given, one colour per run, so strategies compare in one picture:

* ``loss_vs_step.png`` and ``loss_vs_time.png``: rank 0's training loss (solid) and the validation
  loss (dashed, where evaluated) against the step and against wall-clock seconds since the start;
* ``tokens_per_s.png``: throughput of every step;
* ``peak_memory.png``: each rank's peak memory (MiB), bars grouped by run;
* ``comm_share.png``: the share of each step rank 0 spent in communication (comm seconds / step time).

Every function returns what it drew, read back from the figure: ``{(png name, line label): (x, y)}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, also on a headless rank
import matplotlib.pyplot as plt

from plait.errors import ConfigError
from plait.metrics.log import read_metrics

Series = dict[tuple[str, str], tuple[list[float], list[float]]]


@dataclass
class Run:
    """One run directory's records, as the plots use them."""

    label: str
    steps: list[dict[str, Any]]
    """Rank 0's step records, in step order."""
    evals: list[dict[str, Any]]
    """Rank 0's eval records, in step order."""
    peak_memory: dict[int, int]
    """Each rank's largest ``peak_memory`` over its steps (bytes)."""
    summary: dict[str, Any] | None


def read_run(run_dir: str | Path) -> Run:
    """The run in ``run_dir`` (its metrics.jsonl, and summary.json when the run finished)."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        raise ConfigError(
            f"{str(run_dir)!r} has no metrics.jsonl; give a directory plait train wrote (--run-dir)"
        )
    records = read_metrics(run_dir)
    # a resumed run appends: the last record of a step is the one the final model went through
    steps = _last_per_step(r for r in records if r["kind"] == "step" and r["rank"] == 0)
    if not steps:
        raise ConfigError(f"{str(run_dir)!r} records no training step of rank 0 yet")
    evals = _last_per_step(r for r in records if r["kind"] == "eval" and r["rank"] == 0)
    peak: dict[int, int] = {}
    for r in records:
        if r["kind"] == "step" and r.get("peak_memory") is not None:
            peak[r["rank"]] = max(peak.get(r["rank"], 0), int(r["peak_memory"]))
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    label = run_dir.name
    if summary:
        label += f" ({summary['strategy']}, {summary['world_size']} rank{'s' if summary['world_size'] > 1 else ''})"
    return Run(label, steps, evals, peak, summary)


def _last_per_step(records: Any) -> list[dict[str, Any]]:
    return sorted({r["step"]: r for r in records}.values(), key=lambda r: r["step"])


def _drawn(name: str, axes: plt.Axes) -> Series:
    return {(name, line.get_label()): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.lines}


def _save(figure: plt.Figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _lines_figure(name: str, out: Path, figure: plt.Figure, axes: plt.Axes, xlabel: str, ylabel: str,
                  title: str) -> Series:  # fmt: skip
    """Label, grid and legend a figure of lines, save it as ``out/name``; the series as drawn."""
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    drawn = _drawn(name, axes)
    _save(figure, out / name)
    return drawn


def plot_loss(runs: list[Run], out: Path, against: str = "step", name: str | None = None) -> Series:
    """Training (solid) and validation (dashed) loss against ``step`` or wall ``time``, as ``out/name``."""
    name = name or f"loss_vs_{against}.png"
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for i, run in enumerate(runs):
        colour = f"C{i}"
        axes.plot([r[against] for r in run.steps], [r["loss"] for r in run.steps], color=colour,
                  label=f"{run.label} train")  # fmt: skip
        if run.evals:
            axes.plot([r[against] for r in run.evals], [r["val_loss"] for r in run.evals], color=colour,
                      linestyle="--", marker="o", markersize=3, label=f"{run.label} val")  # fmt: skip
    xlabel = "step" if against == "step" else "wall time (s)"
    return _lines_figure(name, out, figure, axes, xlabel, "loss (nats/token)", "loss")


def plot_tokens_per_s(runs: list[Run], out: Path) -> Series:
    name = "tokens_per_s.png"
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for i, run in enumerate(runs):
        axes.plot([r["step"] for r in run.steps], [r["tokens_per_s"] for r in run.steps], color=f"C{i}",
                  label=run.label)  # fmt: skip
    return _lines_figure(name, out, figure, axes, "step", "tokens / s (whole job)", "throughput")


def plot_peak_memory(runs: list[Run], out: Path) -> dict[str, list[float]]:
    """Bars of each rank's peak memory in MiB; returns ``{run label: [MiB of rank 0, 1, ...]}`` as drawn."""
    name = "peak_memory.png"
    figure, axes = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / len(runs)
    drawn = {}
    for i, run in enumerate(runs):
        ranks = sorted(run.peak_memory)
        bars = axes.bar([r + i * width for r in ranks], [run.peak_memory[r] / 2**20 for r in ranks], width,
                        color=f"C{i}", label=run.label)  # fmt: skip
        drawn[run.label] = [bar.get_height() for bar in bars]
    axes.set_xlabel("rank")
    axes.set_ylabel("peak memory (MiB)")
    axes.set_title("peak memory per rank")
    axes.legend(fontsize=8)
    _save(figure, out / name)
    return drawn


def comm_share(record: dict[str, Any]) -> float:
    """The share of a step spent in communication (time inside plait's collectives / step time)."""
    return record["comm_seconds"] / record["step_time"] if record["step_time"] > 0 else 0.0


def plot_comm_share(runs: list[Run], out: Path) -> Series:
    name = "comm_share.png"
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for i, run in enumerate(runs):
        axes.plot([r["step"] for r in run.steps], [comm_share(r) for r in run.steps], color=f"C{i}",
                  label=run.label)  # fmt: skip
    axes.set_ylim(0, 1)
    title = "communication share of the step (rank 0)"
    return _lines_figure(name, out, figure, axes, "step", "communication / step time", title)


def write_loss_plot(run_dir: str | Path) -> Path:
    """``RUN_DIR/loss.png``: the run's loss against the step (what ``plait train`` leaves at the end)."""
    plot_loss([read_run(run_dir)], Path(run_dir), "step", "loss.png")
    return Path(run_dir) / "loss.png"
