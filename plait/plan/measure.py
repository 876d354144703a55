"""Measuring a cluster profile on the job's own ranks (``plait plan --profile``; see ``plait.plan.profile``).

Every rank runs ``measure`` under torchrun: the links of each level with the algorithms plait would
pick, the model's forward+backward, the optimizer step, the overlap of compute and communication,
and the resident memory a training rank holds beside its model states. Rank 0 writes the JSON.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from pathlib import Path

from plait.errors import ConfigError
from plait.plan.profile import OPS, Link, ModelTiming, Profile, load


def fit_alpha_beta(samples: list[tuple[float, float]]) -> Link:
    """``t = alpha + bytes / bandwidth`` over (bus bytes, seconds) samples; alpha >= 0.

    The bandwidth is the slope between the two largest messages: what a gradient bucket sees (on a
    shaped link a token bucket lets small messages through at line rate, and a fit over all sizes
    then reads the line rate). alpha is then fitted in relative terms (weights 1/t^2), so the small
    messages set it: a plain least-squares fit let one noisy 8 MiB sample move alpha by milliseconds,
    and tensor parallelism sends a hundred small messages a step.
    """
    (x1, t1), (x2, t2) = sorted(samples)[-2:]
    bandwidth = (x2 - x1) / (t2 - t1) if t2 > t1 and x2 > x1 else x2 / t2
    weights = [1 / t**2 for _, t in samples]
    alpha = sum(w * (t - x / bandwidth) for w, (x, t) in zip(weights, samples)) / sum(weights)
    return Link(max(0.0, alpha), bandwidth)


SIZES = (2**12, 2**16, 2**19, 2**21, 2**23)
"""Full-tensor message sizes measured per op: 4 KiB and 64 KiB (latency) to 8 MiB (bandwidth)."""


def _best(fn, group, repeats: int = 5, pick=min) -> float:
    times = []
    for _ in range(repeats):
        group.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return pick(times)


def measure_links(group) -> dict[str, Link]:
    """Every op's alpha-beta cost on ``group`` (collective: each of its ranks calls this)."""
    import torch

    from plait.comm.stats import bus_bytes

    samples: dict[str, list[tuple[float, float]]] = {op: [] for op in OPS}
    for nbytes in SIZES:
        numel = nbytes // 4 // group.size * group.size
        full = torch.randn(numel)
        shard = torch.empty(numel // group.size)
        for op in ("reduce_scatter", "all_gather"):
            group.calibrate(op, torch.float32, numel * 4)
        runs = {
            "all_reduce": lambda full=full: group.all_reduce(full),
            "reduce_scatter": lambda full=full, shard=shard: group.reduce_scatter(shard, full),
            "all_gather": lambda full=full, shard=shard: group.all_gather(full, shard),
        }
        for op, fn in runs.items():
            samples[op].append((bus_bytes(op, numel * 4, group.size), _best(fn, group)))

        def ping(full=full) -> None:  # rank 0 <-> rank 1 and back: two one-way messages
            if group.rank == 0:
                group.send(full, 1)
                group.recv(full, 1)
            elif group.rank == 1:
                group.recv(full, 0)
                group.send(full, 0)

        samples["p2p"].append((numel * 4, _best(ping, group) / 2))
    group.release_scratch()
    return {op: fit_alpha_beta(points) for op, points in samples.items()}


def measure_training(model_name: str, micro_batch: int, ctx, run_dir: str) -> tuple[float, float]:
    """Peak resident bytes of a rank over eight real ddp training steps (one micro-batch per rank),
    and the median busy seconds of the last four (a step's time less its time in collectives).

    Run first, before anything else grows the process: the trainer, its data, the code pages a step
    touches, backward's temporaries and the allocator's slack are all in it, as in ``plait train``;
    and the busy time is the forward+backward (and optimizer step) as a training rank runs it.
    """
    from plait.metrics import peak_memory_bytes
    from plait.train.config import build
    from plait.train.trainer import Trainer

    values = {
        "model": {"model": model_name},
        "data": {"data": "synthetic"},
        "train": {"strategy": "ddp", "steps": 8, "batch_size": micro_batch * ctx.world_size,
                  "micro_batch": micro_batch, "eval_every": 0, "progress": False, "run_dir": run_dir},
    }  # fmt: skip
    trainer = Trainer(build(values), ctx)
    records = [trainer.train_step(step) for step in range(8)]  # the first steps still fault pages in
    busy = statistics.median(r["step_time"] - r["comm_seconds"] for r in records[4:])
    return float(peak_memory_bytes(ctx.device)), busy


def _base_bytes(profile: Profile, model_name: str, micro_batch: int, peak: float) -> float:
    """What a rank holds beside model states, activations and buffers: the measured ddp peak less
    what the cost model counts for that same run (so ddp at one micro-batch is predicted as measured)."""
    from plait.plan.cost import predict
    from plait.plan.workload import Candidate, workload_for

    world = profile.hosts * profile.ranks_per_host
    workload = workload_for(model_name, micro_batch * world, micro_batch)
    counted = predict(Candidate("ddp", dp=world), workload, profile, profile.hosts).mem_bytes
    return max(0.0, peak - counted)


def measure_model(model_name: str, micro_batch: int) -> tuple[ModelTiming, float]:
    """Forward+backward seconds and saved-activation bytes of one micro-batch; the training FLOP rate."""
    import torch
    import torch.nn.functional as F

    from plait.models import GPT, preset

    config = preset(model_name)
    torch.manual_seed(0)
    model = GPT(config)
    x = torch.randint(0, config.vocab_size, (micro_batch, config.block_size))

    def step(x: torch.Tensor = x) -> None:
        logits = model(x)
        F.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()

    def median_time(x: torch.Tensor) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            step(x)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()  # also the warm-up
    activation = sum(n for ptr, n in saved.items() if ptr not in params)
    fwd_bwd = median_time(x)
    fixed_share = unsplit_share(step)
    flops = training_flops(config) * micro_batch * config.block_size
    timing = ModelTiming(
        model_name, micro_batch, micro_batch * config.block_size, fwd_bwd, activation, fixed_share
    )
    return timing, flops / fwd_bwd


SPLIT_OPS = ("mm", "attention", "gelu")
"""Kernels whose work tensor parallelism divides by tp: the matmuls (column- and row-parallel, the
vocabulary-parallel head), attention (heads split), the MLP's activation (its hidden width split)."""


def unsplit_share(step) -> float:
    """Share of one forward+backward's op time in kernels tp does not split (layer norms, residual
    adds, the loss's softmax, copies, autograd's bookkeeping): self CPU times from ``torch.profiler``."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    split = sum(e.self_cpu_time_total for e in events if any(k in e.key for k in SPLIT_OPS))
    return 1 - split / total if total else 0.0


def training_flops(config) -> float:
    """Forward+backward FLOPs per token: 6 x parameters (matmuls, the tied head counted once) + 12 L T C."""
    import torch

    from plait.models import GPT

    with torch.device("meta"):
        params = GPT(config).num_params()
    return 6 * params + 12 * config.n_layer * config.block_size * config.n_embd


def timing_params(model_name: str) -> int:
    """Parameters of a plait model preset (counted on the meta device)."""
    import torch

    from plait.models import GPT, preset

    with torch.device("meta"):
        return GPT(preset(model_name)).num_params()


def measure_interleave(group) -> float:
    """Extra seconds per blocking 512 KiB all-reduce issued between ~2 ms compute chunks.

    tp and a pipeline block on a collective after each piece of compute: the ranks arrive apart (on
    shared cores, after a descheduled thread) and one waits. Medians of five: the wait is noise's.
    """
    import torch

    tensor = torch.randn(2**17)
    a = torch.randn(256, 256)
    n = 20

    def chunk() -> None:
        for _ in range(4):
            a @ a

    def compute() -> None:
        for _ in range(n):
            chunk()

    def comm() -> None:
        for _ in range(n):
            group.all_reduce(tensor)

    def both() -> None:
        for _ in range(n):
            chunk()
            group.all_reduce(tensor)

    median = statistics.median
    alone = _best(compute, group, pick=median) + _best(comm, group, pick=median)
    return max(0.0, (_best(both, group, pick=median) - alone) / n)


def measure_blocking(model_name: str, micro_batch: int, group, link: Link) -> float | None:
    """Extra seconds per blocking all-reduce of tensor parallelism, in the model's own blocks.

    Two of the model's blocks, split over ``group`` as plait's tp splits them, run forward and
    backward on one micro-batch (four all-reduces of one activation, b T C x 4 bytes, per block).
    The time this rank was blocked per call, less what the alpha-beta fit gives for the message, is
    what a blocking collective between pieces of compute costs beyond the wire: the ranks arrive
    apart and one waits (on shared cores after a descheduled thread). Median of seven steps after
    a warm-up. None where the model's heads do not split over the group. A probe of matmul chunks and
    all-reduces (``measure_interleave``) read 0 here where gpt-tiny's tp blocks waited 1 ms a call.
    """
    import torch

    from plait.comm import current
    from plait.comm.stats import bus_bytes, delta
    from plait.models import GPT, preset
    from plait.strategies.tensor_parallel import apply_plan, resolve_plan

    config = preset(model_name, n_layer=2)
    if config.n_head % group.size or config.n_embd % group.size:
        return None
    torch.manual_seed(0)
    model = GPT(config)
    apply_plan(model, resolve_plan(model, None), group)
    x = torch.randn(micro_batch, config.block_size, config.n_embd)
    nbytes = x.numel() * x.element_size()
    alone = link.alpha_s + bus_bytes("all_reduce", nbytes, group.size) / link.bandwidth
    stats, extra = current().stats, []
    group.barrier()
    for _ in range(8):
        before = stats.snapshot()
        out = x.clone().requires_grad_()  # as an embedding's output: f's backward all-reduces it too
        for block in model.transformer.h:
            out = block(out)
        out.square().mean().backward()
        ops = delta(stats.snapshot(), before).get("all_reduce")
        if ops is not None and ops.calls:
            extra.append(ops.seconds / ops.calls - alone)
    return max(0.0, statistics.median(extra[1:])) if len(extra) > 1 else None


def measure_optimizer(params: int = 2**22) -> float:
    """Seconds per parameter of one plait AdamW step on one flat fp32 tensor."""
    import torch

    import plait

    flat = torch.nn.Parameter(torch.randn(params))
    flat.grad = torch.randn(params)
    optimizer = plait.optim.AdamW([flat], lr=1e-3)
    times = []
    for _ in range(4):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return min(times[1:]) / params


def measure_overlap(group) -> float:
    """Share of an 8 MiB async all-reduce hidden behind a matmul loop of about the same length."""
    import torch

    tensor = torch.randn(2**21)
    a = torch.randn(256, 256)

    def compute(n: int) -> None:
        for _ in range(n):
            a @ a

    comm = _best(lambda: group.all_reduce(tensor), group)
    start = time.perf_counter()
    compute(10)
    per = (time.perf_counter() - start) / 10
    n = max(1, int(comm / per))
    alone = _best(lambda: compute(n), group)

    def together() -> None:
        handle = group.all_reduce(tensor, async_op=True)
        compute(n)
        handle.wait()

    both = _best(together, group)
    hidden = (comm + alone - both) / min(comm, alone)
    return max(0.0, min(1.0, hidden))


def _interleave(model_name: str, micro_batch: int, group, links: dict[str, Link]) -> float:
    """The profile's ``interleave_s`` on ``group``: from the model's tp blocks, else the probe."""
    blocking = measure_blocking(model_name, micro_batch, group, links["all_reduce"])
    return blocking if blocking is not None else measure_interleave(group)


def measure(model_name: str, micro_batch: int, out: str) -> None:
    """Run on every rank (under torchrun): measure links, compute and memory; rank 0 writes ``out``."""
    import torch

    import plait
    from plait.models import preset

    ctx = plait.init()
    peak, busy = measure_training(model_name, micro_batch, ctx, str(Path(out).parent / "profile-run"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
    hosts = max(1, ctx.world_size // local)
    links: dict[str, dict[str, Link]] = {}
    host_groups = [list(range(h * local, (h + 1) * local)) for h in range(hosts)]
    across = [list(range(r, ctx.world_size, local)) for r in range(local)]
    if local > 1:
        group = ctx.split(host_groups, "host") if hosts > 1 else ctx.world
        links["host"] = measure_links(group)
        overlap = measure_overlap(group)
        interleave = _interleave(model_name, micro_batch, group, links["host"])
    network_overlap = None
    if hosts > 1:
        group = ctx.split(across, "network")
        links["network"] = measure_links(group)
        network_overlap = measure_overlap(group)  # every local rank's cross-host stream at once
        overlap = network_overlap if local == 1 else overlap
        if local == 1:
            interleave = _interleave(model_name, micro_batch, group, links["network"])
    if ctx.world_size == 1:
        overlap = interleave = 0.0
    timing, _ = measure_model(model_name, micro_batch)
    optimizer = measure_optimizer()
    # the forward+backward as the training steps ran it (an isolated loop ran up to 1.5x slower here)
    fwd_bwd = busy - optimizer * timing_params(model_name)
    flops_per_s = training_flops(preset(model_name)) * timing.tokens / fwd_bwd
    timing = dataclasses.replace(timing, fwd_bwd_s=fwd_bwd)
    # every rank's figures: the slowest rank sets a synchronous step, so the profile keeps the worst
    figures = torch.tensor([timing.fwd_bwd_s, -flops_per_s, optimizer, peak], dtype=torch.float64)
    ctx.world.all_reduce(figures, op="max")
    timing = dataclasses.replace(timing, fwd_bwd_s=float(figures[0]))
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / local
    if torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(ctx.device).total_memory
    profile = Profile(
        name=f"measured on {os.uname().nodename}",
        hosts=hosts,
        ranks_per_host=local,
        flops_per_s=-float(figures[1]),
        optimizer_s_per_param=float(figures[2]),
        overlap=overlap,
        network_overlap=network_overlap,
        interleave_s=interleave,
        memory_per_rank_bytes=float(memory),
        base_bytes=0.0,
        links=links,
        timing=timing,
    )
    profile = dataclasses.replace(
        profile, base_bytes=_base_bytes(profile, model_name, micro_batch, float(figures[3]))
    )
    if ctx.rank == 0:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(profile.to_json())
    plait.shutdown(exit_code=0)


def measure_profile(model: str, micro_batch: int, launch_config, out: str) -> Profile:
    """Start the ranks ``launch_config`` says through torchrun, measure, and return the profile they wrote."""
    from plait.launch import launch

    code = launch(
        launch_config,
        "plait.plan",
        [model, str(micro_batch), out],
        module=True,
    )
    if code != 0:
        raise ConfigError(f"measuring the profile failed (exit status {code}); see the ranks' errors above")
    return load(out)
