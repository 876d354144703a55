"""What the benchmarks that run every candidate as its own torchrun job share.

A candidate's job is this same script under ``torch.distributed.run`` with ``--worker``; rank 0
writes its figures as JSON to ``--out``. Candidates run round-robin for a number of rounds (this
machine's speed swings 10-50% between runs), every job in the same environment, including
``MALLOC_MMAP_THRESHOLD_=131072`` so resident memory follows live tensors (shared/FACTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}


def parser(description: str, rounds: int, candidates: str) -> argparse.ArgumentParser:
    """The options every job benchmark takes: model, ranks, batch, steps, rounds, candidates; and the
    hidden ones a job's ranks get (``--worker --candidate C --out FILE``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="gpt-bench-7m")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=8, help="sequences per step over all ranks")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4, help="timed steps per job")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--candidates", default=candidates, help="comma-separated")
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--candidate", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p


def run_job(
    script: str,
    candidate: str,
    nproc: int,
    options: dict[str, object],
    timeout: float,
    env: dict | None = None,
) -> dict | None:
    """Run ``script --worker --candidate C`` on ``nproc`` ranks; rank 0's figures, or None if it failed."""
    out = Path(tempfile.mkdtemp()) / "result.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        script, "--worker", "--candidate", candidate, "--out", str(out),
    ]  # fmt: skip
    for name, value in options.items():
        cmd += [f"--{name.replace('_', '-')}", str(value)]
    done = subprocess.run(
        cmd, env={**os.environ, **ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0 or not out.exists():
        print(
            f"  {candidate}: failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-3:]}",
            flush=True,
        )
        return None
    return json.loads(out.read_text())


def round_robin(title: str, candidates: list[str], rounds: int, run: Callable[[str], dict | None]) -> dict:
    """Each round runs every candidate once, starting one further along; their results by candidate."""
    print(f"{title}, {rounds} rounds, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    results: dict[str, list[dict]] = {c: [] for c in candidates}
    for round_ in range(rounds):
        order = candidates[round_ % len(candidates) :] + candidates[: round_ % len(candidates)]
        for candidate in order:
            result = run(candidate)
            if result is not None:
                results[candidate].append(result)
                print(f"  round {round_}: {candidate}: {result['tokens_per_s']:.1f} tok/s", flush=True)
    return results


def every_rank(figures: list[float]) -> list[list[float]]:
    """Each rank's ``figures``, in rank order, on every rank (one all-gather; call it on all ranks)."""
    import torch
    import torch.distributed as dist

    mine = torch.tensor(figures, dtype=torch.float64)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return [t.tolist() for t in everyone]
