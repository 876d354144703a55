"""Data parallelism over a slow link: 2 emulated hosts x 1 or more ranks (plait.testing.hosts), median step.

    flock /tmp/plait-cpu.lock python benchmarks/link_bench.py --rate 1gbit --steps 12 \
        --candidates plait-ddp,plait-ddp-powersgd,torch-ddp-powersgd
    flock /tmp/plait-cpu.lock python benchmarks/link_bench.py --nproc-per-node 2 \
        --candidates torch-ddp,torch-hsdp,plait-ddp-hier,plait-zero3-hier

Candidates: plait-none (no communication), plait-none-sync (the same, the ranks starting each step
together: one 4-byte all-reduce), plait-<ddp|zero1|zero2|zero3>[-<bf16|powersgd|sign>][-hier]
(e.g. plait-ddp-powersgd, plait-zero3-powersgd; -hier: two-level, HSDP for zero3; -bMB: buckets of MB
MiB instead of 25, e.g. plait-ddp-powersgd-b100), torch-ddp,
torch-ddp-powersgd, torch-fsdp2 (fully_shard per block and at the root, resharded after forward:
ZeRO-3), torch-hsdp (the same on a 2-D mesh: replicated across hosts, sharded within one). plait's
rows also give the median seconds per step its comm layer spent in collectives (median_comm_s).

--precision bf16 trains every candidate in bf16 mixed precision, each the way its library does it:
plait's mixed_precision="bf16" (bf16 parameters, gradients and messages, an fp32 master; plait-none is
that step on a world of one), torch DDP under torch.autocast (fp32 parameters and gradients, so fp32
on the wire), FSDP2 with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16).

Needs root (network namespaces, tc). Each candidate is one torchrun job per host (c10d rendezvous on
host a by name, gloo on the shaped veth link), run in turn; the GPT trains on random tokens,
--batch (default 4) x block_size per rank, AdamW. torch's PowerSGD hook runs with one bucket
(bucket_cap_mb above the gradient): with several it aborts on gloo (shared/FACTS.md). Prints one
JSON line per candidate and round: median step after the first --warmup (2), first and last loss; with
--repeat R, a table of the median over the R rounds (one run swings 10-20% on this shared VM).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

PORT = 29517


def worker(
    candidate: str, model_name: str, steps: int, rank_param: int, batch: int, precision: str, warmup: int
) -> None:
    import torch.distributed as dist

    import plait
    from plait.models import GPT, PRESETS

    config = PRESETS[model_name]
    torch.set_flush_denormal(True)  # as `plait train` does on CPU, for every candidate (docs/benchmarks.md)
    torch.manual_seed(0)
    model = GPT(config)
    mixed = "bf16" if precision == "bf16" else None
    autocast = contextlib.nullcontext()
    if candidate.startswith("plait"):
        base, *scheme = candidate.split("-")[1:]  # plait-<none|ddp|zero1|zero2|zero3>[-<scheme>][-hier][-bMB]
        ctx = plait.init()
        rank = ctx.rank
        sync = "sync" in scheme  # plait-none-sync: the ranks start every step together
        scheme = [s for s in scheme if s != "sync"]
        setup_ctx = ctx
        if base == "none" and mixed:
            # bf16's limit: plait's mixed-precision ddp step (bf16 compute, fp32 master) on a world of
            # one, each rank alone (its own one-rank group): the step with no communication
            solo = ctx.split([[r] for r in range(ctx.world_size)], "solo")
            setup_ctx = dataclasses.replace(
                ctx, rank=0, world_size=1, local_rank=0, world=solo, watchdog=None
            )
            os.environ.pop("GROUP_RANK", None)  # this rank is host 0 of its world of one
        hierarchical = "hier" in scheme
        buckets = [s for s in scheme if s[:1] == "b" and s[1:].replace(".", "").isdigit()]  # -b100
        bucket_mb = float(buckets[0][1:]) if buckets else 25.0
        scheme = [s for s in scheme if s != "hier" and s not in buckets]
        compression = {"powersgd": plait.PowerSGD(rank=rank_param), "bf16": "bf16", "sign": "sign"}.get(
            scheme[0] if scheme else None
        )
        # "none": each rank trains alone, the step with no communication (the physical limit)
        if base == "none":
            strategy = plait.DDP(mixed_precision=mixed) if mixed else "none"
        elif base == "ddp":
            strategy = plait.DDP(
                compression=compression, hierarchical=hierarchical, bucket_mb=bucket_mb, mixed_precision=mixed
            )
        else:
            strategy = plait.Zero(
                stage=int(base[-1]),
                compression=compression,
                hierarchical=hierarchical,
                bucket_mb=bucket_mb,
                mixed_precision=mixed,
            )
        model, opt = plait.setup(model, strategy, lambda ps: plait.optim.AdamW(ps, lr=3e-4), ctx=setup_ctx)
    else:
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
        from torch.nn.parallel import DistributedDataParallel

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        if mixed and candidate != "torch-fsdp2" and candidate != "torch-hsdp":
            # torch's mixed precision for DDP: fp32 parameters and gradients, bf16 compute
            autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        if candidate == "torch-ddp":
            model = DistributedDataParallel(model)
        elif candidate in ("torch-fsdp2", "torch-hsdp"):
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            local = int(os.environ["LOCAL_WORLD_SIZE"])
            hosts = dist.get_world_size() // local
            shape = (hosts, local) if candidate == "torch-hsdp" else (dist.get_world_size(),)
            names = ("replicate", "shard") if candidate == "torch-hsdp" else ("shard",)
            mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
            from torch.distributed.fsdp import MixedPrecisionPolicy

            policy = (
                MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
                if mixed
                else None
            )
            options = {"mp_policy": policy} if policy is not None else {}
            for block in model.transformer.h:
                fully_shard(block, mesh=mesh, **options)
            fully_shard(model, mesh=mesh, **options)
        else:
            gradient_mb = sum(p.numel() for p in model.parameters()) * 4 / 2**20
            model = DistributedDataParallel(model, bucket_cap_mb=gradient_mb + 16)  # one bucket
            state = powersgd.PowerSGDState(None, matrix_approximation_rank=rank_param, start_powerSGD_iter=2)
            model.register_comm_hook(state, powersgd.powerSGD_hook)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    generator = torch.Generator().manual_seed(1 + rank)
    times, losses, comm = [], [], []
    for _ in range(steps):
        before = sum(t.seconds for t in ctx.stats.totals.values()) if candidate.startswith("plait") else 0.0
        tokens = torch.randint(0, config.vocab_size, (batch, config.block_size + 1), generator=generator)
        start = time.perf_counter()
        if candidate.startswith("plait") and sync:
            ctx.world.all_reduce(torch.zeros(1))  # 4 bytes: the memory-bound phases now coincide
        with autocast:
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if candidate.startswith("plait"):  # seconds the comm layer spent in its ops (launch + wait)
            comm.append(sum(t.seconds for t in ctx.stats.totals.values()) - before)
    if rank == 0:
        result = {"candidate": candidate, "median_step_s": round(statistics.median(times[warmup:]), 4)}
        result.update(
            first_loss=round(losses[0], 4),
            last_loss=round(losses[-1], 4),
            steps=steps,
            batch=batch,
            precision=precision,
        )
        if comm:
            result.update(median_comm_s=round(statistics.median(comm[warmup:]), 4))
        print("RESULT " + json.dumps(result), flush=True)
    if candidate.startswith("plait"):
        plait.shutdown(exit_code=0)
    else:
        dist.destroy_process_group()
    os._exit(0)


def drive(args: argparse.Namespace) -> None:
    from plait.testing.hosts import Hosts

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "GLOO_SOCKET_IFNAME": "eth0"}
    nproc = args.nproc_per_node
    candidates = args.candidates.split(",")
    steps: dict[str, list[float]] = {}
    with Hosts(2, rate=args.rate) as hosts:
        for n, candidate in enumerate(candidates * args.repeat):  # rounds in turn: drift hits all alike
            argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", str(nproc),
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", hosts.endpoint(PORT + n),
                    "--rdzv-id", f"link-bench-{n}", __file__, "--worker", candidate, "--model", args.model,
                    "--steps", str(args.steps), "--rank", str(args.rank), "--batch", str(args.batch),
                    "--precision", args.precision, "--warmup", str(args.warmup)]  # fmt: skip
            jobs = [hosts.popen(i, argv, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    for i in range(2)]  # fmt: skip
            outputs = [job.communicate(timeout=300) for job in jobs]
            lines = [line for out, _ in outputs for line in out.splitlines() if line.startswith("RESULT ")]
            if not lines:
                errors = [line for _, err in outputs for line in err.splitlines() if "Error" in line]
                print(
                    json.dumps({"candidate": candidate, "error": errors[:4] or outputs[0][1][-1500:]}),
                    flush=True,
                )
                continue
            result = json.loads(lines[0][len("RESULT ") :])
            result.update(
                rate=args.rate, model=args.model, hosts=f"2 x {nproc} rank{'s' if nproc > 1 else ''}"
            )
            steps.setdefault(candidate, []).append(result["median_step_s"])
            print(json.dumps(result), flush=True)
    if args.repeat > 1:
        summarize(steps)


def summarize(steps: dict[str, list[float]]) -> None:
    """The median over rounds of each candidate's median step, and its ratio to torch-ddp and plait-none."""
    median = {c: statistics.median(v) for c, v in steps.items()}
    print("| candidate | median step over rounds (each round) | vs torch-ddp | vs plait-none |")
    print("|---|---|---|---|")
    for c, m in median.items():
        runs = ", ".join(f"{1000 * s:.0f}" for s in steps[c])
        vs_torch = f"{median['torch-ddp'] / m:.2f}x" if "torch-ddp" in median else "-"
        vs_none = f"{m / median['plait-none']:.2f}" if "plait-none" in median else "-"
        print(f"| {c} | {1000 * m:.0f} ms ({runs}) | {vs_torch} | {vs_none} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rate", default="1gbit", help="tc tbf rate of every host's link")
    parser.add_argument("--model", default="gpt-bench-7m")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--nproc-per-node", type=int, default=1, help="ranks per emulated host")
    parser.add_argument("--repeat", type=int, default=1, help="rounds over the candidates, in turn")
    parser.add_argument("--rank", type=int, default=4, help="PowerSGD rank (plait and torch)")
    parser.add_argument(
        "--batch", type=int, default=4, help="sequences of block_size tokens per rank and step"
    )
    parser.add_argument("--candidates", default="plait-ddp,plait-ddp-powersgd,torch-ddp-powersgd")
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="bf16: plait's mixed_precision='bf16' (bf16 parameters, gradients and wire, fp32 master), torch "
        "DDP under torch.autocast (fp32 parameters and gradients), FSDP2 with a bf16 MixedPrecisionPolicy",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="first steps left out of the median (PowerSGD settles by its 4th)",
    )
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.steps, args.rank, args.batch, args.precision, args.warmup)
    else:
        drive(args)


if __name__ == "__main__":
    main()
