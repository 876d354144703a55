"""Why Sign's error feedback helps under SGD and hurts under AdamW: N ranks simulated in one process.

    python benchmarks/sign_feedback_sim.py --optimizer adamw --layout chunk --chunk 4096
    python benchmarks/sign_feedback_sim.py --optimizer sgd --lr 0.3 --layout tensor --no-error-feedback

The model, chain, batches and val loss of tests/test_compression_training.py's ``val_loss_after``;
each simulated rank's gradient (its slice of the global batch) is sent as a scaled sign, s sign(p)
with s = ||p||_1 / d over each chunk of the flat gradient (``--layout chunk``, as plait.Sign) or
each tensor (``--layout tensor``, EF-SignSGD's per-layer scale), p = g + e with error feedback;
the decoded messages are averaged and handed to the optimizer. Prints the val loss and, at steps
50 and the last, |e| / |g|, mean |C(p)| / mean |g| and cos(C(p), g) of rank 0.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import plait
from tests.reference import make_model
from tests.test_compression_training import LEARN_BATCH, TOKENS


def scaled_sign(x: torch.Tensor, pieces: list[tuple[int, int]]) -> torch.Tensor:
    out = torch.empty_like(x)
    for lo, hi in pieces:
        part = x[lo:hi]
        out[lo:hi] = part.abs().mean() * torch.where(part >= 0, 1.0, -1.0)
    return out


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    model = make_model()
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    if args.layout == "tensor":
        ends = np.cumsum([0, *sizes])
        pieces = list(itertools.pairwise(ends))
    else:
        pieces = [(lo, min(lo + args.chunk, total)) for lo in range(0, total, args.chunk)]
    optimizer = {
        "adamw": lambda: plait.optim.AdamW(params, lr=args.lr or 3e-3),
        "momentum": lambda: plait.optim.SGD(params, lr=args.lr or 0.1, momentum=0.9),
        "sgd": lambda: plait.optim.SGD(params, lr=args.lr or 0.3),
    }[args.optimizer]()
    residuals = [torch.zeros(total) for _ in range(args.ranks)]
    generator = np.random.default_rng(0)
    tokens = torch.from_numpy(TOKENS)
    local = LEARN_BATCH // args.ranks
    for step in range(args.steps):
        starts = generator.integers(0, 32_000 - 17, LEARN_BATCH)
        average = torch.zeros(total)
        for r in range(args.ranks):
            batch = torch.stack([tokens[s : s + 17] for s in starts[r * local : (r + 1) * local]])
            model.zero_grad()
            F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).backward()
            g = torch.cat([p.grad.reshape(-1) for p in params])
            if args.layout == "none":
                average += g / args.ranks
                continue
            p = g + residuals[r] if args.error_feedback else g
            sent = scaled_sign(p, pieces)
            if args.error_feedback:
                residuals[r] = p - sent  # this rank's own compressed value, not the average
            if r == 0 and step in (50, args.steps - 1):
                print(
                    f"step {step}: |e|/|g| {residuals[r].norm() / g.norm():.2f}"
                    f"  mean|C|/mean|g| {sent.abs().mean() / g.abs().mean():.2f}"
                    f"  cos(C, g) {F.cosine_similarity(sent, g, 0):.3f}"
                )
            average += sent / args.ranks
        for param, chunk in zip(params, average.split(sizes)):
            param.grad = chunk.view_as(param).clone()
        optimizer.step()
    val = tokens[32_000:].unfold(0, 17, 17)[:400]
    with torch.no_grad():
        loss = F.cross_entropy(model(val[:, :-1]).flatten(0, 1), val[:, 1:].flatten()).item()
    print(f"val loss {loss:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", choices=["adamw", "momentum", "sgd"], default="adamw")
    parser.add_argument("--lr", type=float, default=None, help="default: 3e-3 adamw, 0.1 momentum, 0.3 sgd")
    parser.add_argument(
        "--layout", choices=["chunk", "tensor", "none"], default="chunk", help="none: uncompressed"
    )
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--no-error-feedback", dest="error_feedback", action="store_false")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
