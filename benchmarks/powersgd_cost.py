"""PowerSGD's CPU cost alone: one step of plait's compressor on a model's whole gradient, collectives stubbed.

    python benchmarks/powersgd_cost.py --model gpt-bench-7m --rank 4 [--dtype bf16]

One thread, the gradient as one message (one bucket) laid out as the model's parameters, in fp32 or
(``--dtype bf16``) as bf16 mixed precision makes it. Prints the sizes of the plan (matrices, P, Q and
plain numbers), the median of timed calls, and a cProfile of where the time goes (matmuls, the
residual, error feedback's add, the QR).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch

from plait.models import GPT, PRESETS
from plait.strategies.compression import PowerSGD
from plait.strategies.compression.powersgd import PowerSGDCompressor


class _NoGroup:
    """A group of one whose all-reduce does nothing: only the compressor's own compute is timed."""

    size = 1
    rank = 0

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", async_op: bool = False) -> None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt-bench-7m")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="the gradient's dtype")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.set_num_threads(1)
    layout, numel = [], 0
    for p in GPT(PRESETS[args.model]).parameters():
        layout.append((numel, tuple(p.shape)))
        numel += p.numel()
    compressor = PowerSGDCompressor(PowerSGD(rank=args.rank), _NoGroup())
    compressor.register(0, numel, layout, torch.device("cpu"), dtype)
    plan = compressor.plans[0]
    print(
        f"{numel:,} elements: {len(plan.matrices)} matrices compressed, P {plan.p_numel:,}, "
        f"Q {plan.q_numel:,}, plain {plan.plain_numel:,} numbers"
    )
    gradient = torch.randn(numel).to(dtype)
    compressor.all_reduce(0, gradient.clone())  # warm up
    seconds = []
    for _ in range(args.calls):
        message = gradient.clone()
        start = time.perf_counter()
        compressor.all_reduce(0, message)
        seconds.append(time.perf_counter() - start)
    print(f"median of {args.calls} calls: {statistics.median(seconds) * 1e3:.1f} ms")
    profile = cProfile.Profile()
    messages = [gradient.clone() for _ in range(args.calls)]
    profile.enable()
    for message in messages:
        compressor.all_reduce(0, message)
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(8)


if __name__ == "__main__":
    main()
