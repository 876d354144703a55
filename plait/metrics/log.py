"""``RUN_DIR/metrics.jsonl``: one JSON object per line, written by every rank.

Each line is one ``os.write`` on a file opened with O_APPEND, so lines from different ranks interleave
whole and never tear. Every record carries ``rank`` and ``kind`` ("step", "eval", ...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSONL metrics file shared by the ranks of one run."""

    def __init__(self, run_dir: str | Path, rank: int, sinks: Sequence[Any] = ()) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.sinks = list(sinks)
        """Further writers (TensorBoard) given every record as ``sink.write(kind, values)``; closed with this."""
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, kind: str, **values: Any) -> None:
        line = json.dumps({"rank": self.rank, "kind": kind, **values}, separators=(",", ":")) + "\n"
        os.write(self._fd, line.encode())
        for sink in self.sinks:
            sink.write(kind, values)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            for sink in self.sinks:
                sink.close()


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """All records of a run (optionally of one kind), in file order."""
    with open(Path(run_dir) / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if kind is None or r["kind"] == kind]
