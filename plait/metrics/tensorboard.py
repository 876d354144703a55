"""``plait train --tensorboard``: the run's scalars as TensorBoard event files under RUN_DIR/tensorboard/.

Written with torch's ``SummaryWriter`` from the records every rank logs to metrics.jsonl (it is a sink
of :class:`~plait.metrics.MetricsLog`). Rank 0 writes the job's figures, each against the step:
``train/loss``, ``val/loss``, ``train/lr``, ``perf/tokens_per_s``, ``perf/step_time_s``,
``comm/bytes_sent`` (rank 0's, per step) and ``comm/seconds``; every rank writes its own
``memory/peak_mib/rank<r>``. All ranks write into the one directory, so TensorBoard shows one run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_RANK0_SCALARS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "tokens_per_s": "perf/tokens_per_s",
    "step_time": "perf/step_time_s",
    "bytes_sent": "comm/bytes_sent",
    "comm_seconds": "comm/seconds",
}
"""metrics.jsonl step field -> TensorBoard tag."""


class TensorBoardLog:
    """One rank's TensorBoard writer, fed the same records as metrics.jsonl."""

    def __init__(self, run_dir: str | Path, rank: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.directory = Path(run_dir) / "tensorboard"
        self.rank = rank
        self.writer = SummaryWriter(log_dir=str(self.directory), filename_suffix=f".rank{rank}")

    def write(self, kind: str, values: dict[str, Any]) -> None:
        step = values.get("step")
        if kind == "step":
            if self.rank == 0:
                for field, tag in _RANK0_SCALARS.items():
                    if values.get(field) is not None:
                        self.writer.add_scalar(tag, values[field], step)
            if values.get("peak_memory") is not None:
                self.writer.add_scalar(
                    f"memory/peak_mib/rank{self.rank}", values["peak_memory"] / 2**20, step
                )
        elif kind == "eval" and self.rank == 0:
            self.writer.add_scalar("val/loss", values["val_loss"], step)

    def close(self) -> None:
        self.writer.close()
