"""plait tensor and pipeline parallelism beside torch's ``parallelize_module`` and ``torch.distributed.pipelining``.

    python benchmarks/model_parallel_bench.py --model gpt-bench-7m --nproc 2 --rounds 2

Every candidate splits the same GPT over all ``--nproc`` ranks (no data parallelism) and trains it
on the same global batch with AdamW:

  plait-tp            plait.TensorParallel(size=n): Megatron plan, vocabulary-parallel loss
  torch-tp            parallelize_module with the same plan (Colwise/Rowwise, the embedding rowwise,
                      q|k|v rows reordered so each rank's slice holds its heads), loss_parallel()
  plait-pp-1f1b / -gpipe    plait.Pipeline(stages=n, microbatches=m, schedule=...)
  torch-pp-1f1b / -gpipe    torch.distributed.pipelining PipelineStage + Schedule1F1B / ScheduleGPipe
                      over the same stages; the tied embedding/head gradient all-reduced between
                      the first and last stage after each step, as plait does

Each candidate is its own torchrun job (peak memory is its own), round-robin for ``--rounds``
rounds; the table gives the median over rounds of each job's median step. Memory: peak RSS, the
maximum over ranks, with ``MALLOC_MMAP_THRESHOLD_=131072`` so RSS follows live tensors. The bubble
is plait's measured idle fraction (mean over stages; torch does not expose one) beside the theory
(p-1)/(m+p-1).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import jobs
from jobs import every_rank, round_robin

CANDIDATES = ["plait-tp", "torch-tp", "plait-pp-1f1b", "torch-pp-1f1b", "plait-pp-gpipe", "torch-pp-gpipe"]


def _torch_tp(model, world: int):
    """parallelize_module over a 1-D mesh with Megatron's plan; returns a step function."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        loss_parallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (world,))
    plan = {"transformer.wte": RowwiseParallel(input_layouts=Replicate())}
    for i, block in enumerate(model.transformer.h):
        # ColwiseParallel cuts rows contiguously: order them q_0 k_0 v_0 | q_1 k_1 v_1 ... first
        with torch.no_grad():
            rows = block.attn.c_attn.weight.view(3, world, -1, block.attn.c_attn.weight.shape[1])
            block.attn.c_attn.weight.copy_(rows.transpose(0, 1).reshape_as(block.attn.c_attn.weight))
        block.attn.n_head //= world
        for name, style in (("attn.c_attn", ColwiseParallel()), ("attn.c_proj", RowwiseParallel())):
            plan[f"transformer.h.{i}.{name}"] = style
        plan[f"transformer.h.{i}.mlp.c_fc"] = ColwiseParallel()
        plan[f"transformer.h.{i}.mlp.c_proj"] = RowwiseParallel()
    plan["lm_head"] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    parallelize_module(model, mesh, plan)
    model.lm_head.weight = model.transformer.wte.weight  # both Shard(0): tie them again
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(x, y) -> float:
        with loss_parallel():
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss.backward()
        return loss.full_tensor().item()

    return step, opt, lambda: {}


def _stage_module(model, start: int, stop: int):
    """Layers [start, stop) of the GPT's ``pipeline_layers()`` as one module; the others are removed."""
    import torch

    layers = model.pipeline_layers()
    for paths, _ in layers[:start] + layers[stop:]:
        for path in paths:
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, torch.nn.Identity())
    mine = layers[start:stop]

    class Stage(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.owned = torch.nn.ModuleList(model.get_submodule(p) for paths, _ in mine for p in paths)

        def forward(self, x):
            for _, fn in mine:
                x = fn(x)
            return x

    return Stage()


def _torch_pp(model, world: int, rank: int, microbatches: int, schedule: str):
    """torch.distributed.pipelining over plait's balanced stages; returns a step function."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from plait.strategies.pipeline import balance, layer_sizes

    layers = model.pipeline_layers()
    starts = (0, *balance(layer_sizes(model, layers), world), len(layers))
    stage_module = _stage_module(model, starts[rank], starts[rank + 1])
    stage = PipelineStage(stage_module, rank, world, torch.device("cpu"))
    kind = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
    runner = kind(stage, microbatches, loss_fn=lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten()))
    opt = torch.optim.AdamW(stage_module.parameters(), lr=1e-4)
    tied = {0: model.transformer.wte, world - 1: model.lm_head}.get(rank)  # the tied weight's holders
    ends = dist.new_group([0, world - 1])

    def step(x, y) -> float:
        losses: list = []
        if rank == 0:
            runner.step(x)
        elif rank == world - 1:
            runner.step(target=y, losses=losses)
        else:
            runner.step()
        if tied is not None:
            dist.all_reduce(tied.weight.grad, group=ends)
        loss = torch.stack(losses).mean() if losses else torch.zeros(())
        dist.broadcast(loss, src=world - 1)
        return loss.item()

    return step, opt, lambda: {}


def _plait(model, candidate: str, world: int, microbatches: int):
    import plait

    if candidate == "plait-tp":
        strategy = plait.TensorParallel(size=world)
    else:
        schedule = candidate.rsplit("-", 1)[1]
        strategy = plait.Pipeline(stages=world, microbatches=microbatches, schedule=schedule)
    model, opt = plait.setup(model, strategy, lambda ps: plait.optim.AdamW(ps, lr=1e-4))
    return (lambda x, y: model.train_step(x, y)), opt, model.plait_runtime.metrics


def worker(args: argparse.Namespace) -> None:
    """One job: every rank trains the candidate for warmup + timed steps and reports its figures."""
    import torch

    import plait
    from plait.models import GPT, preset

    ctx = plait.init()
    torch.manual_seed(0)
    config = preset(args.model, block_size=args.block_size)
    model = GPT(config)
    if args.candidate.startswith("plait"):
        step, opt, metrics = _plait(model, args.candidate, ctx.world_size, args.microbatches)
    elif args.candidate == "torch-tp":
        step, opt, metrics = _torch_tp(model, ctx.world_size)
    else:
        schedule = args.candidate.rsplit("-", 1)[1]
        step, opt, metrics = _torch_pp(model, ctx.world_size, ctx.rank, args.microbatches, schedule)
    tokens = torch.randint(
        0, config.vocab_size, (args.warmup + args.steps, args.global_batch, args.block_size + 1),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    times, bubbles = [], []
    for i, batch in enumerate(tokens):
        start = time.perf_counter()
        loss = step(batch[:, :-1], batch[:, 1:])
        opt.step()
        opt.zero_grad()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            bubbles.append(metrics().get("bubble", float("nan")))
    everyone = every_rank(
        [statistics.median(times), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0,
         statistics.mean(bubbles), metrics().get("bubble_theory", float("nan"))]
    )  # fmt: skip
    if ctx.rank == 0:
        step_s = max(float(t[0]) for t in everyone)
        result = {
            "tokens_per_s": args.global_batch * args.block_size / step_s,
            "peak_rss": max(float(t[1]) for t in everyone),
            "bubble": statistics.mean(float(t[2]) for t in everyone),
            "bubble_theory": float(everyone[0][3]),
            "loss": loss,
        }
        Path(args.out).write_text(json.dumps(result))
    plait.shutdown(exit_code=0)


def run_job(args: argparse.Namespace, candidate: str) -> dict | None:
    options = {
        k: getattr(args, k)
        for k in ("model", "global_batch", "block_size", "microbatches", "steps", "warmup")
    }
    return jobs.run_job(__file__, candidate, args.nproc, options, args.timeout)


def _table(results: dict[str, list[dict]]) -> None:
    median = {c: statistics.median(r["tokens_per_s"] for r in rs) for c, rs in results.items() if rs}
    print("\n| candidate | tokens/s | plait / torch | peak RSS / rank | bubble (theory) | final loss |")
    print("|---|---|---|---|---|---|")
    for candidate, rs in results.items():
        if not rs:
            print(f"| {candidate} | failed | | | | |")
            continue
        peer = candidate.replace("plait-", "torch-")
        ratio = f"{median[candidate] / median[peer]:.2f}x" if peer != candidate and peer in median else ""
        peak = statistics.median(r["peak_rss"] for r in rs) / 2**20
        bubble = statistics.median(r["bubble"] for r in rs)
        bubble_text = f"{bubble:.2f} ({rs[0]['bubble_theory']:.2f})" if bubble == bubble else "-"
        print(
            f"| {candidate} | {median[candidate]:,.0f} | {ratio} | {peak:,.0f} MiB | {bubble_text} "
            f"| {rs[-1]['loss']:.3f} |"
        )


def main() -> None:
    parser = jobs.parser(__doc__.split("\n")[0], rounds=2, candidates=",".join(CANDIDATES))
    parser.add_argument("--microbatches", type=int, default=4)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    title = (
        f"{args.model}, {args.nproc} ranks, {args.global_batch * args.block_size} tokens/step, "
        f"{args.microbatches} micro-batches"
    )
    results = round_robin(title, args.candidates.split(","), args.rounds, lambda c: run_job(args, c))
    _table(results)


if __name__ == "__main__":
    main()
