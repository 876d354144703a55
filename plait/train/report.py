"""The end-of-run summary table."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from plait.train.trainer import Summary


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def _format(value: object) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}:{v}" for k, v in sorted(value.items(), key=lambda kv: int(kv[0])))
    if isinstance(value, float):
        return f"{value:,.2f}"
    return str(value)


def print_summary(summary: Summary, run_dir: str) -> None:
    """Print the run's summary as a table: losses, speed, memory per rank, bytes against theory."""
    title = f"plait train: {summary.strategy} on {summary.world_size} rank(s)"
    if summary.mesh:
        title += " (" + " x ".join(f"{axis} {n}" for axis, n in summary.mesh.items()) + ")"
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("parameters", f"{summary.params:,}")
    table.add_row("steps", f"{summary.steps}")
    table.add_row(
        "train loss (first -> last)", f"{summary.train_loss_first:.4f} -> {summary.train_loss_last:.4f}"
    )
    if summary.val_loss_first is not None:
        table.add_row(
            "val loss (first -> last)", f"{summary.val_loss_first:.4f} -> {summary.val_loss_last:.4f}"
        )
    table.add_row("tokens/s (median step)", f"{summary.tokens_per_s:,.0f}")
    table.add_row("step time (median)", f"{summary.step_time_s * 1000:,.1f} ms")
    for rank, peak in enumerate(summary.peak_memory_bytes):
        table.add_row(f"peak memory rank {rank}", _mib(peak))
    if summary.model_state_bytes is not None:
        table.add_row(
            "model states, largest rank (cap)",
            f"{summary.model_state_bytes / 1e9:.3f} GB (--mem-cap-gb {summary.mem_cap_gb:g})",
        )
    table.add_row("bytes sent / rank / step", _mib(summary.bytes_per_step))
    ratio = (
        summary.bytes_per_step / summary.theory_bytes_per_step
        if summary.theory_bytes_per_step
        else float("nan")
    )
    table.add_row(
        f"theory: {summary.theory}",
        f"{_mib(summary.theory_bytes_per_step)} (sent x{ratio:.3f})"
        if summary.theory_bytes_per_step
        else "-",
    )
    table.add_row("time in communication / step", f"{summary.comm_seconds_per_step * 1000:,.1f} ms")
    for name, value in summary.strategy_metrics.items():
        table.add_row(name.replace("_", " "), _format(value))
    console = Console()
    console.print(table)
    console.print(f"metrics: {run_dir}/metrics.jsonl  summary: {run_dir}/summary.json")
