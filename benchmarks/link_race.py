"""Time to a validation loss over a slow link: plait's compression against torch DDP, in real training runs.

    python benchmarks/link_race.py --rate 1gbit --model gpt-bench-7m --steps 300 --target 2.0 \
        --candidates torch-ddp,plait-ddp-powersgd,plait-ddp

Every candidate is one training job on 2 emulated hosts (``plait.testing.hosts``, egress shaped to
``--rate``, needs root) x ``--nproc-per-node`` ranks, started the same way: ``torch.distributed.run``
on each host, c10d rendezvous on host a by name. plait's candidates run ``plait train``; torch's run
the same trainer with the gradient's communication handed to torch DDP (benchmarks/torch_peer.py),
so the data, model, optimizer, schedule, clipping and evaluation are identical and only the
communication differs. The default corpus (the standard library's source), byte-level.

Candidates: torch-ddp, torch-ddp-powersgd (torch's hook, one bucket), plait-<ddp|zero1|zero2|zero3>
[-<bf16|powersgd|sign>], plait-ddp-hierarchical, plait-none (each rank trains alone: the step with no
communication; its loss is not comparable). The table gives the median step, the seconds and steps
until rank 0's validation loss first reaches ``--target``, the final validation loss, the ratios
to the first candidate, and the bytes per step all ranks sent across hosts (plait's candidates:
the run summary's count by link level); ``--reuse`` keeps jobs in ``--out`` that finished; ``--plot`` draws validation
loss against wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

from async_bench import evals_of, reached

ROOT = Path(__file__).resolve().parents[1]


def command(candidate: str, args: argparse.Namespace, run_dir: Path) -> list[str]:
    """What each host's torchrun starts for ``candidate``: the trainer's flags, and the entry point."""
    flags = ["--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
             "--micro-batch", str(args.micro_batch), "--lr", str(args.lr), "--warmup-steps", "10",
             "--eval-every", str(args.eval_every), "--eval-batches", "2", "--run-dir", str(run_dir),
             "--no-progress"]  # fmt: skip
    kind, base, *scheme = candidate.split("-")
    if kind == "torch":
        peer = ["--powersgd-rank", str(args.rank)] if scheme == ["powersgd"] else []
        return [str(ROOT / "benchmarks" / "torch_peer.py"), *peer, "--", *flags, "--strategy", "ddp"]
    flags += ["--strategy", base]
    if scheme == ["hierarchical"]:
        flags += ["--hierarchical"]
    elif scheme:
        flags += [
            "--compress",
            scheme[0],
            *(["--compress-rank", str(args.rank)] if scheme == ["powersgd"] else []),
        ]
    return ["-m", "plait.cli", "train", *flags]


def run(candidate: str, hosts, args: argparse.Namespace, job: int) -> Path:
    run_dir = Path(args.out, candidate)
    if args.reuse and (run_dir / "summary.json").exists():
        print(f"  {candidate}: reusing {run_dir}", flush=True)
        return run_dir
    if run_dir.exists():
        for path in sorted(run_dir.rglob("*"), reverse=True):  # a stale or failed job's files
            path.unlink() if path.is_file() or path.is_symlink() else path.rmdir()
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(hosts)),
            "--nproc-per-node", str(args.nproc_per_node), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", hosts.endpoint(29600 + job), "--rdzv-id", secrets.token_hex(8),
            *command(candidate, args, run_dir)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "eth0"}
    start = time.perf_counter()
    jobs = [hosts.popen(i, argv, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(len(hosts))]  # fmt: skip
    outputs = [j.communicate(timeout=args.timeout) for j in jobs]
    if any(j.returncode for j in jobs):
        print(f"  {candidate}: failed: {outputs[0][1].strip().splitlines()[-5:]}", flush=True)
    else:
        print(f"  {candidate}: {time.perf_counter() - start:.0f} s", flush=True)
    return run_dir


def figures(candidate: str, run_dir: Path, args: argparse.Namespace) -> dict | None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [r["step_time"] for r in records if r["kind"] == "step" and r["rank"] == 0]
    evals = evals_of(run_dir)
    if not steps or not evals:
        return None
    hit = reached(evals, args.target)
    summary = run_dir / "summary.json"  # torch's candidates: its collectives bypass plait's counters
    across = json.loads(summary.read_text()).get("inter_host_bytes_per_step", []) if summary.exists() else []
    return {"candidate": candidate, "across_mib": sum(across) / 2**20 if candidate.startswith("plait") else None, "median_step_s": statistics.median(steps[2:] or steps),
            "to_target_s": hit[0] if hit else None, "to_target_step": hit[1] if hit else None,
            "final_val": evals[-1]["val_loss"], "final_step": evals[-1]["step"], "evals": evals}  # fmt: skip


def table(rows: list[dict], args: argparse.Namespace) -> None:
    first = rows[0]
    print(f"\n| candidate | median step | s to {args.target} (step) | final val | "
          f"step vs {first['candidate']} | time to target vs {first['candidate']} | MiB across hosts / step |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        hit = (
            f"{r['to_target_s']:.1f} s ({r['to_target_step']})"
            if r["to_target_s"] is not None
            else "not reached"
        )
        speed = first["median_step_s"] / r["median_step_s"]
        sooner = (
            f"{first['to_target_s'] / r['to_target_s']:.2f}x"
            if r["to_target_s"] and first["to_target_s"]
            else "-"
        )
        final = f"{r['final_val']:.3f}" + (
            "" if r["final_step"] == args.steps - 1 else f" (step {r['final_step']})"
        )
        across = f"{r['across_mib']:.2f}" if r["across_mib"] is not None else "-"
        print(
            f"| {r['candidate']} | {r['median_step_s']:.3f} s | {hit} | {final} | {speed:.2f}x | {sooner} | {across} |"
        )
    for r in rows:
        print("JSON " + json.dumps({k: v for k, v in r.items() if k != "evals"}))


def plot(rows: list[dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        if r["candidate"] != "plait-none":
            ax.plot(
                [e["time"] for e in r["evals"]], [e["val_loss"] for e in r["evals"]], label=r["candidate"]
            )
    ax.axhline(args.target, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("seconds")
    ax.set_ylabel("validation loss")
    ax.set_title(
        f"{args.model}, 2 hosts x {args.nproc_per_node} at {args.rate}: validation loss vs wall-clock"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=80)
    print(f"plot: {args.plot}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", default="1gbit", help="tc tbf rate of every host's link")
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--model", default="gpt-bench-7m")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4, help="global batch in sequences")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--target", type=float, default=2.0)
    parser.add_argument("--rank", type=int, default=4, help="PowerSGD rank (plait and torch)")
    parser.add_argument("--candidates", default="torch-ddp,plait-ddp-powersgd,plait-ddp,torch-ddp-powersgd")
    parser.add_argument("--out", default="runs/link_race")
    parser.add_argument("--plot")
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--timeout", type=int, default=3600)
    args = parser.parse_args()
    from plait.testing.hosts import Hosts

    candidates = args.candidates.split(",")
    print(f"{args.model}, 2 hosts x {args.nproc_per_node} at {args.rate}, {args.steps} steps, global batch "
          f"{args.batch_size}, target {args.target}, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)  # fmt: skip
    with Hosts(2, rate=args.rate) as hosts:
        dirs = [run(c, hosts, args, job) for job, c in enumerate(candidates)]
    rows = [row for c, d in zip(candidates, dirs) if (row := figures(c, d, args)) is not None]
    if rows:
        table(rows, args)
        if args.plot:
            plot(rows, args)


if __name__ == "__main__":
    main()
