"""``plait bench --comm``: measure every reduce-scatter and all-gather algorithm, print what the comm layer picks.

Runs on every rank (``plait bench --comm --nproc 2`` starts them through torchrun). For each op,
dtype and message size, each candidate is timed on the world group, as the comm layer does the
first time it meets such a message (``plait.comm.algorithms``), and rank 0 prints the bus bandwidth
of each and the one chosen.
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

import plait
from plait.comm.algorithms import CANDIDATES, AlgorithmTable


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="plait bench --comm")
    parser.add_argument(
        "--sizes-mb", default="1,16,64", help="message sizes (full tensor, MiB), comma-separated"
    )
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    ctx = plait.init()
    table = AlgorithmTable(pinned={})
    group = ctx.world
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for op in CANDIDATES:
        for dtype_name in args.dtypes.split(","):
            for mb in args.sizes_mb.split(","):
                table.calibrate(group, op, dtypes[dtype_name], int(float(mb) * 2**20), repeats=args.repeats)
    if ctx.rank == 0:
        out = Table(title=f"collectives on {ctx.world_size} ranks ({ctx.backend}): bus bandwidth, GB/s")
        out.add_column("op")
        out.add_column("dtype")
        out.add_column("size", justify="right")
        for name in sorted({a for c in CANDIDATES.values() for a in c}):
            out.add_column(name, justify="right")
        out.add_column("chosen")
        for m in table.measurements:
            cells = [
                f"{m.bus_gbps[a]:.2f}" if a in m.bus_gbps else "-"
                for a in sorted({a for c in CANDIDATES.values() for a in c})
            ]
            out.add_row(m.op, m.dtype, f"{m.nbytes / 2**20:.0f} MiB", *cells, m.chosen)
        Console().print(out)
    plait.shutdown(exit_code=0)


if __name__ == "__main__":
    main()
