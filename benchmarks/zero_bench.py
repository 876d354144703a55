"""plait ZeRO beside torch's ZeroRedundancyOptimizer, FSDP2 and DeepSpeed: tokens/s and memory per rank.

    python benchmarks/zero_bench.py --model gpt-bench-168m --nproc 2 --rounds 3
    python benchmarks/zero_bench.py --model gpt-bench-7m --nproc 4 --candidates plait-ddp,plait-zero3,fsdp2

Each candidate runs as its own torchrun job (so peak memory is its own), candidates in round-robin
order for ``--rounds`` rounds (this machine's speed swings 10-50% between runs): the table gives
the median over rounds of each job's median step. Every job gets the same environment, including
``MALLOC_MMAP_THRESHOLD_=131072`` so resident memory follows live tensors (shared/FACTS.md).

Memory per rank: peak RSS (``ru_maxrss``) and steady RSS (``/proc/self/statm`` after the timed
steps, i.e. what training holds between steps), the maximum over ranks.

Candidates: plait-ddp, plait-zero1, plait-zero2, plait-zero3, torch-ddp, torch-zero (DDP +
ZeroRedundancyOptimizer), fsdp2 (fully_shard, reshard_after_forward=True: stage 3),
fsdp2-noreshard (reshard_after_forward=False: stage 2), deepspeed-zero1/2/3 (when the deepspeed
package imports; it is an optional benchmark dependency: DS_BUILD_OPS=0 pip install deepspeed==0.19.8).
Each uses AdamW (plait's, torch's fused, or DeepSpeed's CPU Adam).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

import jobs
from jobs import every_rank, round_robin

CANDIDATES = [
    "plait-ddp",
    "plait-zero1",
    "plait-zero2",
    "plait-zero3",
    "plait-ddp-bf16",
    "plait-zero1-bf16",
    "plait-zero2-bf16",
    "torch-ddp",
    "torch-zero",
    "fsdp2",
    "fsdp2-noreshard",
    "deepspeed-zero1",
    "deepspeed-zero2",
    "deepspeed-zero3",
]


def _steady_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _build(candidate: str, model, lr: float):
    """(model, optimizer, backward) for a candidate; the model is already on every rank."""
    import torch

    import plait

    if candidate.startswith("plait-"):
        strategy = candidate.removeprefix("plait-")
        if strategy.endswith("-bf16"):  # bf16 compute and communication, fp32 master and AdamW state
            name = strategy.removesuffix("-bf16")
            strategy = (
                plait.DDP(mixed_precision="bf16")
                if name == "ddp"
                else plait.Zero(stage=int(name[-1]), mixed_precision="bf16")
            )
        model, opt = plait.setup(model, strategy, lambda ps: plait.optim.AdamW(ps, lr=lr))
        return model, opt, lambda loss: loss.backward()
    if candidate in ("torch-ddp", "torch-zero"):
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
        if candidate == "torch-zero":
            opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=lr)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
        return model, opt, lambda loss: loss.backward()
    if candidate.startswith("fsdp2"):
        from torch.distributed.fsdp import fully_shard

        reshard = candidate == "fsdp2"
        for block in model.transformer.h:
            fully_shard(block, reshard_after_forward=reshard)
        fully_shard(model, reshard_after_forward=reshard)
        return model, torch.optim.AdamW(model.parameters(), lr=lr, fused=True), lambda loss: loss.backward()
    if candidate.startswith("deepspeed-"):
        import deepspeed

        stage = int(candidate[-1])
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": lr}},
        }
        engine, opt, _, _ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=config
        )
        return engine, _DeepSpeedStep(engine), engine.backward
    raise SystemExit(f"unknown candidate {candidate}; use one of {CANDIDATES}")


class _DeepSpeedStep:
    """DeepSpeed's engine steps and zeroes gradients itself."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def step(self) -> None:
        self.engine.step()

    def zero_grad(self) -> None:
        pass


def worker(args: argparse.Namespace) -> None:
    """One job: every rank trains the candidate for warmup + timed steps and reports its figures."""
    import torch
    import torch.nn.functional as F

    import plait
    from plait.models import GPT, preset

    if args.candidate.startswith("deepspeed-"):
        import deepspeed

        os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))
        deepspeed.init_distributed(dist_backend="gloo")
    ctx = plait.init()
    torch.manual_seed(0)
    config = preset(args.model, block_size=args.block_size)
    model, opt, backward = _build(args.candidate, GPT(config), lr=1e-4)
    local = args.global_batch // ctx.world_size
    generator = torch.Generator().manual_seed(ctx.rank)
    tokens = torch.randint(
        0, config.vocab_size, (args.warmup + args.steps, local, args.block_size + 1), generator=generator
    )
    times = []
    for i, batch in enumerate(tokens):
        start = time.perf_counter()
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1).float(), batch[:, 1:].flatten())
        backward(loss)
        opt.step()
        opt.zero_grad()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    everyone = every_rank(
        [
            statistics.median(times),
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0,
            float(_steady_rss()),
        ]
    )
    if ctx.rank == 0:
        step = max(float(t[0]) for t in everyone)
        result = {
            "candidate": args.candidate,
            "step_s": step,
            "tokens_per_s": args.global_batch * args.block_size / step,
            "peak_rss": max(float(t[1]) for t in everyone),
            "steady_rss": max(float(t[2]) for t in everyone),
            "loss": float(loss),
        }
        Path(args.out).write_text(json.dumps(result))
    plait.shutdown(exit_code=0)


def run_job(args: argparse.Namespace, candidate: str) -> dict | None:
    env = {
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", "/tmp/plait-torch-extensions"),
    }
    options = {k: getattr(args, k) for k in ("model", "global_batch", "block_size", "steps", "warmup")}
    return jobs.run_job(__file__, candidate, args.nproc, options, args.timeout, env)


def main() -> None:
    parser = jobs.parser(
        __doc__.split("\n")[0],
        rounds=3,
        candidates=",".join(c for c in CANDIDATES if not c.startswith("deepspeed")),
    )
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    title = f"{args.model}, {args.nproc} ranks, {args.global_batch * args.block_size} tokens/step"
    results = round_robin(title, args.candidates.split(","), args.rounds, lambda c: run_job(args, c))
    baseline = {c: statistics.median(r["tokens_per_s"] for r in rs) for c, rs in results.items() if rs}
    print(
        "\n| candidate | tokens/s (median of rounds) | vs plait-ddp | peak RSS / rank | steady RSS / rank | final loss |"
    )
    print("|---|---|---|---|---|---|")
    for candidate, rs in results.items():
        if not rs:
            print(f"| {candidate} | failed | | | | |")
            continue
        tps = baseline[candidate]
        ratio = f"{tps / baseline['plait-ddp']:.2f}x" if "plait-ddp" in baseline else "-"
        peak = statistics.median(r["peak_rss"] for r in rs) / 2**20
        steady = statistics.median(r["steady_rss"] for r in rs) / 2**20
        loss = rs[-1]["loss"]
        print(f"| {candidate} | {tps:,.1f} | {ratio} | {peak:,.0f} MiB | {steady:,.0f} MiB | {loss:.3f} |")


if __name__ == "__main__":
    main()
