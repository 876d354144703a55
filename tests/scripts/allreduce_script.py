"""Started by `plait launch` in tests: every rank all-reduces its rank and writes what it saw."""

import sys
from pathlib import Path

import torch

import plait

ctx = plait.init()
value = torch.tensor([float(ctx.rank + 1)])
ctx.world.all_reduce(value)
Path(sys.argv[1], f"rank{ctx.rank}.txt").write_text(
    f"{ctx.rank} {ctx.world_size} {value.item():.0f} {sys.argv[2]}\n"
)
plait.shutdown()
