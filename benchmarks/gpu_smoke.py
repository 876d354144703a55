"""GPU smoke check: run on a machine with one CUDA GPU (CI never has one).

    python benchmarks/gpu_smoke.py [--params 168e6]

1. ``plait.init()`` opens an NCCL group at world size 1 with no environment, and NCCL answers.
2. A few GPT training steps on CUDA under bf16 autocast through ``plait.setup(..., "ddp")``.
3. plait's AdamW beside ``torch.optim.AdamW(fused=True)`` on the same ~168M parameters (about 100
   tensors) and the same gradients: time per step, the largest difference after the timed steps,
   and the bandwidth reached (AdamW reads p, g, m, v and writes p, m, v: 28 bytes per element)
   against a device-to-device copy measured in the same run.
Prints a markdown report for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import plait
from plait.models import GPT, preset


def cuda_ms(fn, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` runs, timed with CUDA events after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def check_init() -> str:
    ctx = plait.init()
    assert ctx.backend == "nccl" and ctx.device.type == "cuda", ctx
    probe = torch.full((4,), 3.0, device=ctx.device)
    dist.all_reduce(probe)
    dist.barrier()
    return f"plait.init(): backend={ctx.backend}, device={ctx.device}, world_size={ctx.world_size}, nccl all_reduce ok ({probe[0].item():.0f})"


def check_training(steps: int = 20) -> str:
    ctx = plait.current()
    torch.manual_seed(0)
    model, optimizer = plait.setup(GPT(preset("gpt-mini")), "ddp", lambda ps: plait.optim.AdamW(ps, lr=1e-3))
    data = torch.randint(0, 256, (steps, 16, 257), device=ctx.device)
    data[:, :, 1::2] = data[:, :, 0:-1:2]  # learnable: every odd token repeats the one before it
    losses = []
    torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in data:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    elapsed = time.perf_counter() - start
    tokens = data[:, :, :-1].numel()
    return (
        f"gpt-mini ({sum(p.numel() for p in model.parameters()):,} params), bf16 autocast, ddp at world size 1: "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps, {tokens / elapsed:,.0f} tok/s (incl. warm-up)"
    )


def check_adamw(total: float, repeats: int) -> list[str]:
    device = torch.device("cuda")
    shapes = [(50304, 768), (1024, 768)] + [
        (768, 2304),
        (768, 768),
        (768, 3072),
        (3072, 768),
        (768,),
        (768,),
    ] * 12
    scale = total / sum(torch.Size(s).numel() for s in shapes)
    shapes = [tuple(max(1, int(d * scale**0.5)) if len(s) == 2 else d for d in s) for s in shapes]
    generator = torch.Generator(device=device).manual_seed(0)
    base = [torch.randn(s, device=device, generator=generator) for s in shapes]
    grads = [torch.randn(s, device=device, generator=generator) * 1e-2 for s in shapes]
    numel = sum(t.numel() for t in base)

    def make(cls, **kwargs):
        params = [torch.nn.Parameter(t.clone()) for t in base]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        return params, cls(params, lr=1e-3, weight_decay=0.1, **kwargs)

    torch_params, torch_opt = make(torch.optim.AdamW, fused=True)
    plait_params, plait_opt = make(plait.optim.AdamW)
    torch_ms = cuda_ms(torch_opt.step, repeats)
    plait_ms = cuda_ms(plait_opt.step, repeats)
    diff = max((a - b).abs().max().item() for a, b in zip(plait_params, torch_params))
    copy_src = torch.empty(numel, device=device)
    copy_dst = torch.empty_like(copy_src)
    copy_ms = cuda_ms(lambda: copy_dst.copy_(copy_src), repeats)
    copy_bw = 2 * 4 * numel / copy_ms / 1e6  # read + write, GB/s
    bw = lambda ms: 28 * numel / ms / 1e6  # noqa: E731
    return [
        f"AdamW on {numel:,} fp32 params in {len(shapes)} tensors, {repeats} timed steps (CUDA events, median):",
        "| optimizer | ms/step | GB/s | share of copy bandwidth |",
        "|---|---|---|---|",
        f"| torch.optim.AdamW(fused=True) | {torch_ms:.2f} | {bw(torch_ms):,.0f} | {bw(torch_ms) / copy_bw:.0%} |",
        f"| plait.optim.AdamW | {plait_ms:.2f} | {bw(plait_ms):,.0f} | {bw(plait_ms) / copy_bw:.0%} |",
        f"device-to-device copy: {copy_ms:.2f} ms, {copy_bw:,.0f} GB/s (read + write); "
        f"max |plait - torch| after {repeats + 1} steps: {diff:.3g}; plait/torch time: {plait_ms / torch_ms:.3f}x",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=float, default=168e6)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_smoke.py needs a CUDA GPU")
    print(f"## GPU smoke: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("- " + check_init())
    print("- " + check_training())
    for line in check_adamw(args.params, args.repeats):
        print(line)
    plait.shutdown()


if __name__ == "__main__":
    main()
