"""On paper: the cost model with hand-written profiles beside published training runs.

No torch compute: each run is a Workload written from the paper's model shape and a profile from
the cluster's data sheet (``plait.plan.from_hardware``), at an assumed MFU of 0.5 of peak for the
matmul rate (stated, not fitted to the run). Prints a markdown table.

    python benchmarks/plan_paper.py
"""

from __future__ import annotations

from plait.plan import Candidate, Workload, from_hardware, predict


def llama(
    layers: int, width: int, ffn: int, vocab: int, heads: int, kv_heads: int, seq: int, batch: int
) -> Workload:
    """A Llama-style decoder: SwiGLU MLP (3 matrices), grouped-query attention, untied embedding/head."""
    kv = width * kv_heads // heads
    block = 2 * width * width + 2 * width * kv + 3 * width * ffn + 2 * width
    embed = vocab * width
    return Workload(
        params=2 * embed + layers * block + width,
        n_layer=layers, n_embd=width, n_head=heads, block_size=seq, vocab_size=vocab,
        layer_params=(embed, *[block] * layers, embed + width),
        global_batch=batch, micro_batch=1, mixed_precision=True,
    )  # fmt: skip


def gpt(layers: int, width: int, vocab: int, heads: int, seq: int, batch: int) -> Workload:
    """A GPT (Megatron's): 12 C^2 per block, tied embedding/head."""
    block = 12 * width * width + 13 * width
    embed = vocab * width + seq * width
    return Workload(
        params=embed + layers * block + 2 * width,
        n_layer=layers, n_embd=width, n_head=heads, block_size=seq, vocab_size=vocab,
        layer_params=(embed, *[block] * layers, vocab * width + 2 * width),
        global_batch=batch, micro_batch=1, mixed_precision=True,
    )  # fmt: skip


A100 = {"tflops": 312, "mfu": 0.5, "hbm_gb": 80}
H100 = {"tflops": 989, "mfu": 0.5, "hbm_gb": 96}
RUNS = [
    # Narayanan et al. SC'21, Table 1: 1T GPT on 3,072 A100s (384 DGX A100 nodes, 8 x 200 Gb/s HDR IB each),
    # tp 8, pp 64, dp 6, global batch 3,072, seq 2,048: 163 TFLOP/s per GPU (their FLOP count with
    # recomputation, 96 B s l h^2 (1 + s/6h + V/16lh)), i.e. one step every 3,072 x 2,048 x F / (3,072 x 163e12) s
    (
        "Megatron-LM GPT 1T, 3,072 A100, tp8 pp64 dp6",
        gpt(128, 25600, 51200, 160, 2048, 3072),
        {
            "name": "DGX A100 x 384",
            "hosts": 384,
            "gpus_per_host": 8,
            "gpu": A100,
            "host_link": {"gbps": 2400, "latency_us": 10},
            "network_link": {"gbps": 200, "latency_us": 15},
        },
        Candidate("hybrid", dp=6, tp=8, pp=64),
        "tflops",
        163.0,
    ),
    # torchtitan docs/performance.md, Table 1: Llama 3.1 8B, 8 H100 (NVLink), FSDP, local batch 2, global 16,
    # seq 8,192: 5,762 tokens/s per GPU (selective activation checkpointing)
    (
        "torchtitan Llama 3.1 8B, 8 H100, FSDP",
        llama(32, 4096, 14336, 128256, 32, 8, 8192, 16),
        {
            "name": "H100 node",
            "hosts": 1,
            "gpus_per_host": 8,
            "gpu": H100,
            "host_link": {"gbps": 3600, "latency_us": 10},
        },
        Candidate("zero3", dp=8, zero=3),
        "tokens_per_gpu",
        5762.0,
    ),
    # torchtitan docs/performance.md: Llama 3 70B on 64 A100 80GB, FSDP, local batch 1, full activation
    # checkpointing, seq 8,192: 331 tokens/s per GPU (51.7% MFU)
    (
        "torchtitan Llama 3 70B, 64 A100, FSDP",
        llama(80, 8192, 28672, 128256, 64, 8, 8192, 64),
        {
            "name": "A100 x 64",
            "hosts": 8,
            "gpus_per_host": 8,
            "gpu": A100,
            "host_link": {"gbps": 2400, "latency_us": 10},
            "network_link": {"gbps": 200, "latency_us": 15},
        },
        Candidate("zero3", dp=64, zero=3),
        "tokens_per_gpu",
        331.0,
    ),
]


def megatron_flops(w: Workload) -> float:
    """Narayanan et al.'s FLOPs per iteration (with recomputation): 96 B s l h^2 (1 + s/6h + V/16lh)."""
    b, s, layers, h, v = w.global_batch, w.block_size, w.n_layer, w.n_embd, w.vocab_size
    return 96 * b * s * layers * h * h * (1 + s / (6 * h) + v / (16 * layers * h))


def main() -> None:
    print("| run | predicted step | predicted per GPU | published per GPU | error | bubble | exposed comm |")
    print("|---|---|---|---|---|---|---|")
    for name, workload, spec, candidate, unit, published in RUNS:
        profile = from_hardware(spec)
        gpus = candidate.dp * candidate.tp * candidate.pp
        p = predict(candidate, workload, profile, hosts=profile.hosts)
        if unit == "tflops":
            predicted = megatron_flops(workload) / p.step_s / gpus / 1e12
            shown = f"{predicted:,.0f} TFLOP/s", f"{published:,.0f} TFLOP/s"
        else:
            predicted = workload.tokens / p.step_s / gpus
            shown = f"{predicted:,.0f} tokens/s", f"{published:,.0f} tokens/s"
        print(
            f"| {name} | {p.step_s:,.2f} s | {shown[0]} | {shown[1]} | {predicted / published - 1:+.0%} | "
            f"{p.bubble:.1%} | {p.exposed_comm_s:,.2f} s |"
        )


if __name__ == "__main__":
    main()
