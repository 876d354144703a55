"""What a run leaves for a person to look at: TensorBoard events, the loss plot, ``plait report``."""

import subprocess
import sys

import pytest
from torch.testing import assert_close

from plait.metrics import read_metrics
from plait.metrics.plots import (
    comm_share,
    plot_comm_share,
    plot_loss,
    plot_peak_memory,
    plot_tokens_per_s,
    read_run,
)
from plait.train import Trainer
from plait.train.config import build
from tests.harness import run_ranks

PNG = b"\x89PNG\r\n\x1a\n"


def _fit(strategy: str, run_dir: str) -> None:
    values = {
        "model": {"model": "gpt-tiny", "n_layer": 2, "n_embd": 64, "block_size": 32},
        "data": {"data": "synthetic", "synthetic_tokens": 50_000},
        "optim": {"warmup_steps": 2},
        "train": {
            "steps": 5, "batch_size": 8, "micro_batch": 2, "eval_every": 2, "eval_batches": 2,
            "progress": False, "strategy": strategy, "tensorboard": True, "run_dir": run_dir,
        },
    }  # fmt: skip
    Trainer(build(values)).fit()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for strategy in ("ddp", "zero2"):
        run_ranks(_fit, 2, strategy, str(root / strategy))
    return root


def test_tensorboard_event_files_hold_the_runs_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs / "ddp" / "tensorboard"))
    events.Reload()
    steps = [r for r in read_metrics(runs / "ddp", "step")]
    for tag, field in (("train/loss", "loss"), ("train/lr", "lr"), ("perf/tokens_per_s", "tokens_per_s"),
                       ("perf/step_time_s", "step_time"), ("comm/bytes_sent", "bytes_sent"),
                       ("comm/seconds", "comm_seconds")):  # fmt: skip
        _same(events.Scalars(tag), sorted((r["step"], r[field]) for r in steps if r["rank"] == 0))
    for rank in range(2):
        peaks = sorted((r["step"], r["peak_memory"] / 2**20) for r in steps if r["rank"] == rank)
        _same(events.Scalars(f"memory/peak_mib/rank{rank}"), peaks)
    evals = sorted((r["step"], r["val_loss"]) for r in read_metrics(runs / "ddp", "eval") if r["rank"] == 0)
    _same(events.Scalars("val/loss"), evals)
    assert len(evals) == 3  # steps 0, 2 and 4


def _same(events: list, want: list[tuple[int, float]]) -> None:
    """TensorBoard's (step, value) pairs against metrics.jsonl's (values stored as float32)."""
    assert [e.step for e in events] == [step for step, _ in want]
    assert [e.value for e in events] == pytest.approx([value for _, value in want], rel=1e-6)


def test_train_leaves_its_loss_plot(runs):
    assert (runs / "ddp" / "loss.png").read_bytes()[:8] == PNG


def test_plotted_series_are_the_metrics(runs, tmp_path):
    both = [read_run(runs / "ddp"), read_run(runs / "zero2")]
    for run, name in zip(both, ("ddp", "zero2")):
        steps = sorted(
            (r for r in read_metrics(runs / name, "step") if r["rank"] == 0), key=lambda r: r["step"]
        )
        evals = sorted(
            (r for r in read_metrics(runs / name, "eval") if r["rank"] == 0), key=lambda r: r["step"]
        )
        loss = plot_loss(both, tmp_path, "step")
        assert_close(
            loss["loss_vs_step.png", f"{run.label} train"],
            ([r["step"] for r in steps], [r["loss"] for r in steps]),
        )
        assert_close(
            loss["loss_vs_step.png", f"{run.label} val"],
            ([r["step"] for r in evals], [r["val_loss"] for r in evals]),
        )
        wall = plot_loss(both, tmp_path, "time")
        assert_close(
            wall["loss_vs_time.png", f"{run.label} train"],
            ([r["time"] for r in steps], [r["loss"] for r in steps]),
        )
        speed = plot_tokens_per_s(both, tmp_path)
        assert_close(speed["tokens_per_s.png", run.label][1], [r["tokens_per_s"] for r in steps])
        comm = plot_comm_share(both, tmp_path)
        assert_close(
            comm["comm_share.png", run.label][1], [r["comm_seconds"] / r["step_time"] for r in steps]
        )
        assert 0 < comm_share(steps[-1]) < 1
        memory = plot_peak_memory(both, tmp_path)
        every = read_metrics(runs / name, "step")
        want = [max(r["peak_memory"] for r in every if r["rank"] == rank) / 2**20 for rank in range(2)]
        assert_close(memory[run.label], want)
    assert "(zero2, 2 ranks)" in both[1].label  # fmt: skip


def test_plait_report_overlays_two_runs(runs, tmp_path):
    out = tmp_path / "report"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "plait.cli",
            "report",
            str(runs / "ddp"),
            str(runs / "zero2"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("loss_vs_step", "loss_vs_time", "tokens_per_s", "peak_memory", "comm_share"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG
        assert str(out / f"{name}.png") in done.stdout
    summary = (out / "summary.md").read_text()
    assert "| ddp (ddp, 2 ranks) | 5 |" in summary and "| zero2 (zero2, 2 ranks) | 5 |" in summary
