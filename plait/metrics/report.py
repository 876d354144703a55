"""``plait report RUN_DIR [RUN_DIR ...]``: the pictures of :mod:`plait.metrics.plots` and a markdown summary."""

from __future__ import annotations

import statistics
from pathlib import Path

from plait.metrics.plots import (
    Run,
    comm_share,
    plot_comm_share,
    plot_loss,
    plot_peak_memory,
    plot_tokens_per_s,
    read_run,
)


def summary_markdown(runs: list[Run]) -> str:
    """One table row per run: steps, first and last losses, median tokens/s, peak memory, communication share."""
    lines = [
        "# plait report",
        "",
        "| run | steps | train loss first -> last | val loss last | tokens/s (median) | "
        "peak memory, largest rank (MiB) | communication share (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        steady = run.steps[1:] or run.steps  # the first step pays one-time costs
        val = f"{run.evals[-1]['val_loss']:.4f}" if run.evals else "-"
        lines.append(
            f"| {run.label} | {len(run.steps)} | {run.steps[0]['loss']:.4f} -> {run.steps[-1]['loss']:.4f} | "
            f"{val} | {statistics.median(r['tokens_per_s'] for r in steady):,.0f} | "
            f"{max(run.peak_memory.values(), default=0) / 2**20:,.1f} | "
            f"{statistics.median(comm_share(r) for r in steady):.1%} |"
        )
    lines += ["", "Figures: " + ", ".join(f"`{name}`" for name in FIGURES), ""]
    return "\n".join(lines)


FIGURES = ("loss_vs_step.png", "loss_vs_time.png", "tokens_per_s.png", "peak_memory.png", "comm_share.png")


def write_report(run_dirs: list[str | Path], out: str | Path) -> list[Path]:
    """Write every figure and ``summary.md`` for ``run_dirs`` (overlaid) into ``out``; return the paths."""
    runs = [read_run(d) for d in run_dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_loss(runs, out, "step")
    plot_loss(runs, out, "time")
    plot_tokens_per_s(runs, out)
    plot_peak_memory(runs, out)
    plot_comm_share(runs, out)
    (out / "summary.md").write_text(summary_markdown(runs))
    return [out / name for name in (*FIGURES, "summary.md")]
