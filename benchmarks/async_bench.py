"""Synchronous against asynchronous training: wall-clock time to a fixed validation loss.

    python benchmarks/async_bench.py --nproc 4 --steps 300 --target 2.6

Trains plait's GPT on the default corpus (the standard library's own source) with 4 workers under
ddp, the parameter server fully asynchronous (s=None) and with staleness bounds s=2 and s=8,
local SGD (H=8) and DiLoCo (H=8, outer Nesterov), each once with all workers equal and once with
one worker twice as slow (``--slow-rank 3 --slow-factor 2``). Every run is one ``plait train``
job writing metrics.jsonl; the table gives the wall-clock seconds and steps until rank 0's
validation loss first reaches ``--target``, and a PNG plots validation loss against wall-clock
time and against step, one curve per strategy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RUNS = {
    "ddp": ["--strategy", "ddp"],
    "async": ["--strategy", "async"],
    "ssp s=2": ["--strategy", "async", "--staleness", "2"],
    "ssp s=8": ["--strategy", "async", "--staleness", "8"],
    "local-sgd H=8": ["--strategy", "local-sgd", "--period", "8"],
    "diloco H=8": ["--strategy", "local-sgd", "--period", "8", "--outer", "nesterov"],
}


def run(name: str, args: argparse.Namespace, slow: bool, out: Path) -> list[dict]:
    run_dir = out / f"{name.replace(' ', '_').replace('=', '')}{'-slow' if slow else ''}"
    cmd = [
        sys.executable, "-m", "plait.cli", "train", "--nproc", str(args.nproc), "--model", args.model,
        "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--micro-batch", str(args.batch_size // args.nproc),
        "--eval-every", str(args.eval_every), "--eval-batches", "2", "--lr", str(args.lr), "--warmup-steps", "10",
        "--run-dir", str(run_dir), "--no-progress", *RUNS[name],
    ]  # fmt: skip
    if slow:
        cmd += ["--slow-rank", str(args.nproc - 1), "--slow-factor", "2"]
    if args.reuse and finished(run_dir, args):
        print(f"  {name}{' (slow rank)' if slow else ''}: reusing {run_dir}", flush=True)
        return evals_of(run_dir)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(
            f"  {name}{' (slow rank)' if slow else ''}: failed: {done.stderr.strip().splitlines()[-3:]}",
            flush=True,
        )
        return []
    evals = evals_of(run_dir)
    print(
        f"  {name}{' (slow rank)' if slow else ''}: {time.perf_counter() - start:.0f} s, final val {evals[-1]['val_loss']:.3f}",
        flush=True,
    )
    return evals


def evals_of(run_dir: Path) -> list[dict]:
    """Rank 0's evaluations in the run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "eval" and r["rank"] == 0]


def finished(run_dir: Path, args: argparse.Namespace) -> bool:
    """Whether an earlier job in ``run_dir`` ran to its last step (its final evaluation is there)."""
    path = run_dir / "metrics.jsonl"
    return path.exists() and any(r["step"] == args.steps - 1 for r in evals_of(run_dir))


def reached(evals: list[dict], target: float) -> tuple[float, int] | None:
    for r in evals:
        if r["val_loss"] <= target:
            return r["time"], r["step"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--model", default="gpt-tiny")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--target", type=float, default=2.6)
    parser.add_argument("--out", default="runs/async_bench")
    parser.add_argument("--plot", default="docs/async_comparison.png")
    parser.add_argument(
        "--reuse", action="store_true", help="keep the results of runs in --out that already finished"
    )
    args = parser.parse_args()
    out = Path(args.out)
    print(
        f"{args.model}, {args.nproc} workers, {args.steps} steps, target val loss {args.target}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}",
        flush=True,
    )
    curves = {(name, slow): run(name, args, slow, out) for slow in (False, True) for name in RUNS}

    print(
        f"\n| strategy | equal workers: s to {args.target} (step) | one worker 2x slow: s to {args.target} (step) | final val (equal / slow) |"
    )
    print("|---|---|---|---|")
    for name in RUNS:
        cells = []
        for slow in (False, True):
            hit = reached(curves[(name, slow)], args.target)
            cells.append(f"{hit[0]:.1f} s ({hit[1]})" if hit else "not reached")
        finals = " / ".join(
            f"{curves[(name, s)][-1]['val_loss']:.3f}" if curves[(name, s)] else "-" for s in (False, True)
        )
        print(f"| {name} | {cells[0]} | {cells[1]} | {finals} |")
    plot(curves, args)


def plot(curves: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharey=True)
    for row, slow in enumerate((False, True)):
        for name in RUNS:
            evals = curves[(name, slow)]
            if not evals:
                continue
            axes[row][0].plot([r["time"] for r in evals], [r["val_loss"] for r in evals], label=name)
            axes[row][1].plot([r["step"] for r in evals], [r["val_loss"] for r in evals], label=name)
        condition = "one worker 2x slow" if slow else "equal workers"
        axes[row][0].set_title(f"validation loss vs wall-clock ({condition})")
        axes[row][1].set_title(f"validation loss vs step ({condition})")
        axes[row][0].set_xlabel("seconds")
        axes[row][1].set_xlabel("optimizer step (rank 0)")
        for ax in axes[row]:
            ax.axhline(args.target, color="grey", linestyle=":", linewidth=1)
            ax.set_ylabel("validation loss")
            ax.legend(fontsize=8)
    fig.suptitle(f"{args.model}, {args.nproc} workers on 2 cores, stdlib corpus")
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=90)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
