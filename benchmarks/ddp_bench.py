"""plait DDP beside torch DDP on the same GPT, same global batch, in alternating pairs.

Run on 2 ranks (each rank builds both models and alternates between them, so both see the same
machine state; this machine's speed swings 10-50% between runs, hence the median of per-pair ratios):

    plait launch -n 2 benchmarks/ddp_bench.py --model gpt-bench-7m --pairs 7

Candidates, each with its natural optimizer (both use torch's fused AdamW kernel underneath):
  fp32:   plait.DDP()                    vs  torch DDP
  16-bit: plait.DDP(grad_dtype="bf16")   vs  torch DDP + fp16_compress_hook
          (torch's bf16_compress_hook needs CUDA; gloo carries bf16 fine)
Prints tokens/s of each, their ratio, and plait's measured bytes per step per rank against the theory.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

import plait
from plait.models import GPT, preset


def build_plait(config, grad_dtype):
    torch.manual_seed(0)
    model = GPT(config)
    return plait.setup(model, plait.DDP(grad_dtype=grad_dtype), lambda ps: plait.optim.AdamW(ps, lr=1e-4))


def build_torch(config, compress):
    torch.manual_seed(0)
    model = DistributedDataParallel(GPT(config))
    if compress:
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def step_times(model, optimizer, batches) -> list[float]:
    times = []
    for x, y in batches:
        start = time.perf_counter()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt-bench-7m")
    parser.add_argument("--global-batch", type=int, default=8, help="sequences per step, over all ranks")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per candidate per pair")
    parser.add_argument(
        "--comm",
        choices=["fp32", "16-bit", "both"],
        default="both",
        help="which comparison(s) to run (one at a time halves the memory: each builds two models)",
    )
    args = parser.parse_args()

    ctx = plait.init()
    config = preset(args.model, block_size=args.block_size)
    local = args.global_batch // ctx.world_size
    generator = torch.Generator().manual_seed(ctx.rank)
    batches = [
        (t[:, :-1], t[:, 1:])
        for t in torch.randint(
            0, config.vocab_size, (args.steps, local, args.block_size + 1), generator=generator
        )
    ]
    tokens_per_step = args.global_batch * args.block_size
    builders = {
        "fp32": lambda: (build_plait(config, None), build_torch(config, False)),
        "16-bit": lambda: (build_plait(config, "bf16"), build_torch(config, True)),
    }
    if ctx.rank == 0:
        params = sum(p.numel() for p in GPT(config).parameters())
        print(
            f"{args.model}: {params:,} params, {tokens_per_step} tokens/step, {ctx.world_size} ranks, {args.pairs} pairs"
        )
    rows = []
    for label, build in builders.items():
        if args.comm not in (label, "both"):
            continue
        (pmodel, popt), (tmodel, topt) = build()
        step_times(pmodel, popt, batches[:2])  # warm up both before timing
        step_times(tmodel, topt, batches[:2])
        plait_tps, torch_tps, ratios = [], [], []
        for pair in range(args.pairs):
            if pair % 2:  # alternate who goes first, so neither always runs on a warmer machine
                t = statistics.median(step_times(tmodel, topt, batches))
            sent = ctx.stats.bytes_sent
            p = statistics.median(step_times(pmodel, popt, batches))
            bytes_per_step = (ctx.stats.bytes_sent - sent) / len(batches)
            if not pair % 2:
                t = statistics.median(step_times(tmodel, topt, batches))
            plait_tps.append(tokens_per_step / p)
            torch_tps.append(tokens_per_step / t)
            ratios.append(t / p)
        theory = pmodel.plait_runtime.theory_bytes_per_step()
        rows.append(
            (
                label,
                statistics.median(plait_tps),
                statistics.median(torch_tps),
                statistics.median(ratios),
                min(ratios),
                max(ratios),
                bytes_per_step,
                theory,
            )
        )
    if ctx.rank == 0:
        print(
            "| comm | plait tok/s | torch DDP tok/s | plait/torch (median of pairs) | min..max | bytes/step/rank | theory |"
        )
        print("|---|---|---|---|---|---|---|")
        for label, ptps, ttps, ratio, lo, hi, sent, theory in rows:
            print(
                f"| {label} | {ptps:,.0f} | {ttps:,.0f} | {ratio:.3f}x | {lo:.2f}..{hi:.2f} | "
                f"{sent / 2**20:.2f} MiB | {theory / 2**20:.2f} MiB |"
            )
    dist.barrier()
    plait.shutdown()


if __name__ == "__main__":
    main()
