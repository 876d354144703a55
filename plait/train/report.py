"""What rank 0 shows of a run: a progress bar while it trains (:class:`Progress`), then what it achieved
(:class:`Summary`, also ``summary.json``) as a table."""

from __future__ import annotations

import dataclasses

from rich.console import Console
from rich.table import Table


@dataclasses.dataclass
class Summary:
    """What a run achieved, as the summary table and ``summary.json`` report it."""

    strategy: str
    world_size: int
    params: int
    steps: int
    tokens_per_step: int
    train_loss_first: float
    train_loss_last: float
    val_loss_first: float | None
    val_loss_last: float | None
    tokens_per_s: float
    step_time_s: float
    peak_memory_bytes: list[int]
    bytes_per_step: float
    theory_bytes_per_step: int
    theory: str
    comm_seconds_per_step: float
    strategy_metrics: dict
    """This rank's (rank 0's) strategy-specific figures: staleness histogram, pushes, synchronizations."""
    mesh: dict[str, int] | None = None
    """Ranks along each axis (dp, pp, tp) under tp, pp or hybrid."""
    model_state_bytes: float | None = None
    """The largest rank's model states (live tensors) after the first step, when a memory cap is set."""
    mem_cap_gb: float | None = None
    """The cap those model states were checked against (``--mem-cap-gb``)."""
    inter_host_bytes_per_step: list[float] = dataclasses.field(default_factory=list)
    """Per rank, the mean bytes per step it sent to a rank on another host (plait.comm.stats' link levels)."""


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
    if any(summary.inter_host_bytes_per_step):
        across = summary.inter_host_bytes_per_step
        table.add_row("bytes across hosts / step, all ranks", f"{_mib(sum(across))} ({len(across)} ranks)")
    table.add_row("time in communication / step", f"{summary.comm_seconds_per_step * 1000:,.1f} ms")
    for name, value in summary.strategy_metrics.items():
        table.add_row(name.replace("_", " "), _format(value))
    console = Console()
    console.print(table)
    console.print(f"metrics: {run_dir}/metrics.jsonl  summary: {run_dir}/summary.json")


class Progress:
    """Rank 0's progress bar: step, loss, tokens/s."""

    def __init__(self, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[tps]:,.0f} tok/s"),
            TimeRemainingColumn(),
        )
        self._task = self._bar.add_task("train", total=total, loss=float("nan"), tps=0.0)
        self._bar.start()

    def update(self, step: int, record: dict[str, float]) -> None:
        self._bar.update(self._task, completed=step + 1, loss=record["loss"], tps=record["tokens_per_s"])

    def close(self) -> None:
        self._bar.stop()
