"""One optimizer step on a model-sized set of parameters: plait's flat optimizers beside torch.optim.

    python benchmarks/optim_bench.py --params 168e6 --repeats 7 [--threads 2]

The parameters are split into ~100 tensors shaped like a 12-layer transformer's (embeddings,
attention and MLP matrices, biases, norms), so torch's default implementation pays its real
per-tensor overhead. Candidates, per family:

  AdamW:        torch default, torch fused=True, plait fused=None, plait fused=False (textbook)
  SGD momentum: torch default, torch fused=True, plait fused=None, plait fused=False (textbook)

The families run one after the other to keep memory in check (168M fp32 parameters with their
gradient and AdamW state are 2.7 GB per candidate); within a family all candidates read the same
gradients, the torch ones literally the same tensors. Each repeat times one step of every
candidate, in an order rotated per repeat, because this machine's speed swings 10-50% between
runs; the table reports medians.

Bandwidth counts the memory a step must move: AdamW reads p, g, m, v and writes p, m, v (28 bytes
per fp32 element), SGD with momentum reads p, g, b and writes p, b (20 bytes per element).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import plait

# Relative sizes (d^2 = 1) of one transformer block's tensors, weight then bias:
# attention qkv and output projection, norm, MLP up and down projection, norm.
BLOCK = [3.0, 3e-3, 1.0, 1e-3, 1e-3, 1e-3, 4.0, 4e-3, 4.0, 1e-3, 1e-3, 1e-3]
LAYERS = 8
EMBEDDINGS = [16.0, 1.0]  # token and position embedding
FINAL_NORM = [1e-3, 1e-3]


def tensor_sizes(total: int) -> list[int]:
    """``total`` elements split like a transformer's parameters (100 tensors)."""
    weights = EMBEDDINGS + BLOCK * LAYERS + FINAL_NORM
    scale = total / sum(weights)
    sizes = [max(1, round(w * scale)) for w in weights]
    sizes[0] += total - sum(sizes)
    return sizes


@dataclasses.dataclass
class Candidate:
    name: str
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    times: list[float] = dataclasses.field(default_factory=list)

    def step(self) -> float:
        start = time.perf_counter()
        self.optimizer.step()
        return time.perf_counter() - start


def build(
    name: str,
    make: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    init: list[torch.Tensor],
    grads: list[torch.Tensor],
) -> Candidate:
    """A candidate with its own copy of the parameters; ``.grad`` is the shared gradient tensor.

    torch's optimizers only read the gradient, so sharing it is safe; plait's copy it into their
    flat gradient buffer when they flatten the parameters in the first step.
    """
    params = [nn.Parameter(t.clone()) for t in init]
    for p, g in zip(params, grads):
        p.grad = g
    return Candidate(name, params, make(params))


def max_difference(a: Candidate, b: Candidate) -> float:
    return max((x.detach() - y.detach()).abs().max().item() for x, y in zip(a.params, b.params))


def run_family(
    family: str, makers: dict[str, Callable], sizes: list[int], repeats: int, bytes_per_element: int
) -> list[tuple[str, str, float, float, float]]:
    """Time every candidate of one optimizer family; return table rows and print the parity checks."""
    generator = torch.Generator().manual_seed(0)
    init = [torch.randn(n, generator=generator) for n in sizes]
    grads = [torch.randn(n, generator=generator) * 1e-2 for n in sizes]
    candidates = [build(name, make, init, grads) for name, make in makers.items()]
    del init
    for c in candidates:  # allocate state, flatten plait's parameters
        c.step()
    for r in range(repeats):
        shift = r % len(candidates)
        for c in candidates[shift:] + candidates[:shift]:
            c.times.append(c.step())

    by_name = {c.name: c for c in candidates}
    fused_ms = statistics.median(by_name["torch fused"].times) * 1e3
    total_bytes = bytes_per_element * sum(sizes)
    rows = []
    for c in candidates:
        ms = statistics.median(c.times) * 1e3
        rows.append((family, c.name, ms, ms / fused_ms, total_bytes / (ms / 1e3) / 1e9))
    for ours, theirs in (("plait fused", "torch fused"), ("plait textbook", "torch default")):
        print(
            f"{family}: max |{ours} - {theirs}| after {repeats + 1} steps = "
            f"{max_difference(by_name[ours], by_name[theirs]):.3g}"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=float, default=168e6, help="number of fp32 parameters")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per candidate")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = tensor_sizes(int(args.params))

    adamw = {
        "torch default": lambda ps: torch.optim.AdamW(ps, lr=1e-4),
        "torch fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
        "plait fused": lambda ps: plait.optim.AdamW(ps, lr=1e-4),
        "plait textbook": lambda ps: plait.optim.AdamW(ps, lr=1e-4, fused=False),
    }
    sgd = {
        "torch default": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
        "torch fused": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=True),
        "plait fused": lambda ps: plait.optim.SGD(ps, lr=1e-2, momentum=0.9),
        "plait textbook": lambda ps: plait.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=False),
    }
    print(
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {sum(sizes) / 1e6:.0f}M fp32 parameters in {len(sizes)} tensors, "
        f"{args.repeats} timed steps each (median)"
    )
    rows = run_family("AdamW", adamw, sizes, args.repeats, bytes_per_element=28)
    gc.collect()
    rows += run_family("SGD momentum", sgd, sizes, args.repeats, bytes_per_element=20)

    print()
    print("| optimizer | candidate | ms / step | vs torch fused | GB/s |")
    print("|---|---|---:|---:|---:|")
    for family, name, ms, ratio, bandwidth in rows:
        print(f"| {family} | {name} | {ms:.1f} | {ratio:.2f}x | {bandwidth:.1f} |")


if __name__ == "__main__":
    main()
