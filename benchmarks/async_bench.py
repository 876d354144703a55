"""Synchronous against asynchronous training: wall-clock time to a fixed validation loss.

    python benchmarks/async_bench.py --nproc 4 --steps 300 --target 2.6 --slow-factor 2 4

Trains plait's GPT on the default corpus (the standard library's own source) with 4 workers under
ddp, the parameter server (fully asynchronous with each staleness compensation, and SSP with
s=2), local SGD (H=8) and DiLoCo (H=8, its outer settings derived from H, and the paper's), once
with all workers equal and once per ``--slow-factor`` with one worker (``--slow-rank``, default the
last) that many times as slow. Every run is one ``plait train`` job writing metrics.jsonl; the
table gives the wall-clock seconds and steps until rank 0's validation loss first reaches
``--target``, and the final validation loss; a PNG plots validation loss against wall-clock time
and against step, one curve per strategy, one row per condition.

A full race is ~30 jobs of 2-3 minutes on 2 cores: ``--only`` and ``--conditions`` run a part of
it, ``--reuse`` keeps the jobs in ``--out`` that already finished, so the race can be run in
pieces and the table and plot made from all of them. The asynchronous runs are not reproducible
(the order of pushes is the OS's): ``--repeat K`` runs every job K times and gives each strategy's
mean final loss. ``--hosts 2 --rate 1gbit`` runs every job across two emulated hosts
(``plait.testing.hosts``, needs root), ``--nproc / 2`` ranks each.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

RUNS = {
    name: flags.split()
    for name, flags in {
        "ddp": "--strategy ddp",
        "async": "--strategy async --compensation none",
        "async staleness-lr": "--strategy async --compensation staleness-lr",
        "async dc": "--strategy async --compensation dc",
        "async lookahead": "--strategy async --compensation lookahead",
        "async lookahead+staleness-lr": "--strategy async --compensation lookahead+staleness-lr",
        "async default": "--strategy async",
        "async sync=0": "--strategy async --sync-steps 0",
        "async scale": "--strategy async --compensation none --update scale",
        "bsp s=0": "--strategy async --staleness 0",
        "ssp s=2": "--strategy async --staleness 2 --compensation staleness-lr",
        "ssp s=2 lookahead": "--strategy async --staleness 2 --compensation lookahead",
        "ssp s=2 lookahead+staleness-lr": "--strategy async --staleness 2 --compensation lookahead+staleness-lr",
        "ssp s=2 default": "--strategy async --staleness 2",
        "local-sgd H=8": "--strategy local-sgd --period 8",
        "diloco H=8": "--strategy local-sgd --period 8 --outer nesterov",
        "diloco H=8 paper": "--strategy local-sgd --period 8 --outer nesterov --outer-lr 0.7 --outer-momentum 0.9",
    }.items()
}


def base(name: str) -> str:
    """The strategy of a run name: ``"ddp #2"`` (the second run of ``--repeat``) is ddp's."""
    return name.split(" #")[0]


def condition_name(factor: float) -> str:
    return "equal workers" if factor == 1 else f"one worker {factor:g}x slow"


def run_dir_of(name: str, factor: float, args: argparse.Namespace) -> Path:
    strategy, _, repeat = name.partition(" #")
    return (
        Path(args.out)
        / f"{strategy.replace(' ', '_').replace('=', '')}{f'-slow{factor:g}' if factor > 1 else ''}"
        f"{f'-run{repeat}' if repeat else ''}"
    )


def launch(cmd: list[str], args: argparse.Namespace, job: int) -> subprocess.CompletedProcess:
    """``cmd`` here, or with ``--hosts H`` on H emulated hosts at once (``--nproc / H`` ranks each,
    the rendezvous on host a by name, every host's link shaped to ``--rate``)."""
    if args.hosts is None:
        return subprocess.run(cmd, capture_output=True, text=True)
    hosts = args.hosts
    node = [*cmd, "--nproc", str(args.nproc // len(hosts)), "--nnodes", str(len(hosts)),
            "--rdzv-endpoint", hosts.endpoint(29500 + job), "--rdzv-id", secrets.token_hex(16)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    jobs = [hosts.popen(i, node, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(len(hosts))]  # fmt: skip
    outputs = [j.communicate() for j in jobs]
    failed = [j for j in jobs if j.returncode != 0]
    code = failed[0].returncode if failed else 0
    return subprocess.CompletedProcess(node, code, outputs[0][0], "".join(err for _, err in outputs))


def run(name: str, args: argparse.Namespace, factor: float) -> list[dict]:
    """One ``plait train`` job (or, with ``--reuse``, the one that already finished); rank 0's evaluations."""
    label = f"{name} ({condition_name(factor)})"
    run_dir = run_dir_of(name, factor, args)
    if finished(run_dir, args):
        print(f"  {label}: reusing {run_dir}", flush=True)
        return evals_of(run_dir)
    cmd = [
        sys.executable, "-m", "plait.cli", "train", "--model", args.model,
        "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--micro-batch", str(args.batch_size // args.nproc),
        "--eval-every", str(args.eval_every), "--eval-batches", "2", "--lr", str(args.lr), "--warmup-steps", "10",
        "--run-dir", str(run_dir), "--no-progress", *RUNS[base(name)],
    ]  # fmt: skip
    if factor > 1:
        cmd += ["--slow-rank", str(args.slow_rank), "--slow-factor", str(factor)]
    if args.hosts is None:
        cmd += ["--nproc", str(args.nproc)]
    start = time.perf_counter()
    done = launch(cmd, args, args.names.index(name) + len(args.names) * int(factor))
    evals = evals_of(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    if done.returncode != 0:  # rank 0's evaluations up to the failure still stand, marked in the table
        print(f"  {label}: failed: {done.stderr.strip().splitlines()[-3:]}", flush=True)
        if not evals:
            return []
    print(
        f"  {label}: {time.perf_counter() - start:.0f} s, final val {evals[-1]['val_loss']:.3f}", flush=True
    )
    return evals


def evals_of(run_dir: Path) -> list[dict]:
    """Rank 0's evaluations in the run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "eval" and r["rank"] == 0]


def finished(run_dir: Path, args: argparse.Namespace) -> bool:
    """Whether ``--reuse`` keeps an earlier job in ``run_dir``: one that recorded evaluations.

    A job stopped early (a time limit) still counts: its curve and its time to the target stand;
    the table marks its last step.
    """
    path = run_dir / "metrics.jsonl"
    return args.reuse and path.exists() and bool(evals_of(run_dir))


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
    parser.add_argument("--slow-rank", type=int, default=None, help="the straggler (default: the last rank)")
    parser.add_argument("--slow-factor", type=float, nargs="+", default=[2.0, 4.0])
    parser.add_argument("--only", nargs="+", choices=list(RUNS), help="run only these strategies")
    parser.add_argument(
        "--conditions", type=float, nargs="+", help="run only these slow factors (1: equal workers)"
    )
    parser.add_argument("--out", default="runs/async_bench")
    parser.add_argument("--plot", default="docs/async_comparison.png")
    parser.add_argument(
        "--reuse", action="store_true", help="keep the results of runs in --out that already finished"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="run every job this many times (the runs differ)"
    )
    parser.add_argument("--hosts", type=int, default=1, help="run every job across this many emulated hosts")
    parser.add_argument("--rate", default="1gbit", help="with --hosts > 1: each host's link (tc tbf rate)")
    args = parser.parse_args()
    if args.nproc % args.hosts:
        parser.error(f"--nproc {args.nproc} does not split over --hosts {args.hosts}")
    if args.hosts > 1:
        from plait.testing.hosts import Hosts

        with Hosts(args.hosts, rate=args.rate) as args.hosts:
            race(args)
    else:
        args.hosts = None
        race(args)


def race(args: argparse.Namespace) -> None:
    args.slow_rank = args.nproc - 1 if args.slow_rank is None else args.slow_rank
    factors = [1.0, *args.slow_factor]
    where = "one host" if args.hosts is None else f"{len(args.hosts)} hosts at {args.rate}"
    print(
        f"{args.model}, {args.nproc} workers on {where}, {args.steps} steps, target val loss {args.target}, "
        f"slow rank {args.slow_rank}, {time.strftime('%Y-%m-%d %H:%M')}",
        flush=True,
    )
    args.names = [f"{n}{f' #{i + 1}' if i else ''}" for n in RUNS for i in range(args.repeat)]
    curves = {}
    for factor in factors:
        for name in args.names:
            chosen = (not args.only or base(name) in args.only) and (
                not args.conditions or factor in args.conditions
            )
            if chosen:
                curves[(name, factor)] = run(name, args, factor)
            else:
                done = finished(run_dir_of(name, factor, args), args)
                curves[(name, factor)] = evals_of(run_dir_of(name, factor, args)) if done else []
    table(curves, factors, args)
    plot(curves, factors, args)


def table(curves: dict, factors: list[float], args: argparse.Namespace) -> None:
    heads = [f"{condition_name(f)}: s to {args.target} (step)" for f in factors]
    print(
        f"\n| strategy | {' | '.join(heads)} | final val ({' / '.join(condition_name(f) for f in factors)}) |"
    )
    print("|---|" + "---|" * (len(factors) + 1))
    for name in args.names:
        if not any(curves[(name, f)] for f in factors):
            continue
        cells = []
        for factor in factors:
            evals = curves[(name, factor)]
            hit = reached(evals, args.target) if evals else None
            cells.append(f"{hit[0]:.1f} s ({hit[1]})" if hit else ("not reached" if evals else "-"))
        finals = " / ".join(final(curves[(name, f)], args) for f in factors)
        print(f"| {name} | {' | '.join(cells)} | {finals} |")
    if args.repeat > 1:
        print(
            f"\nmean final val over the runs of each strategy ({' / '.join(condition_name(f) for f in factors)}):"
        )
        for strategy in RUNS:
            means = []
            for factor in factors:
                finals = [curves[(n, factor)][-1]["val_loss"] for n in args.names
                          if base(n) == strategy and curves[(n, factor)]]  # fmt: skip
                means.append(f"{sum(finals) / len(finals):.3f} ({len(finals)} runs)" if finals else "-")
            if any(m != "-" for m in means):
                print(f"  {strategy}: {' / '.join(means)}")


def final(evals: list[dict], args: argparse.Namespace) -> str:
    """The last validation loss, with its step if the job stopped before the end."""
    if not evals:
        return "-"
    last = evals[-1]
    return f"{last['val_loss']:.3f}" + ("" if last["step"] == args.steps - 1 else f" (step {last['step']})")


def plot(curves: dict, factors: list[float], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in args.names if n == base(n)]  # one curve per strategy: its first run
    fig, axes = plt.subplots(len(factors), 2, figsize=(12, 4 * len(factors)), sharey=True, squeeze=False)
    for row, factor in enumerate(factors):
        for name in names:
            evals = curves[(name, factor)]
            if not evals:
                continue
            axes[row][0].plot([r["time"] for r in evals], [r["val_loss"] for r in evals], label=name)
            axes[row][1].plot([r["step"] for r in evals], [r["val_loss"] for r in evals], label=name)
        axes[row][0].set_title(f"validation loss vs wall-clock ({condition_name(factor)})")
        axes[row][1].set_title(f"validation loss vs step ({condition_name(factor)})")
        axes[row][0].set_xlabel("seconds")
        axes[row][1].set_xlabel("optimizer step (rank 0)")
        for ax in axes[row]:
            ax.axhline(args.target, color="grey", linestyle=":", linewidth=1)
            ax.set_ylabel("validation loss")
            ax.set_ylim(top=3.2)
            ax.legend(fontsize=8)
    fig.suptitle(f"{args.model}, {args.nproc} workers on 2 cores, stdlib corpus")
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=80)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
