"""What one training step costs under each strategy: time, memory per rank, bytes per link level.

Notation (docs/plan.md has each formula with its source): a GPT of P parameters, L blocks, width C,
context T, vocabulary V; a global batch of B sequences in micro-batches of b; N = H x R ranks on
H hosts of R ranks; a mesh dp x pp x tp; g = bytes per gradient element (4 in fp32, 2 in bf16);
rate = the profile's training FLOPs per second per rank; F = 6P + 12LTC training FLOPs per token.

    compute      t_mb = b T F_stage / rate x (phi + (1 - phi) / tp) per micro-batch (F_stage: the
                 pipeline stage's share of F; phi: the measured share of a forward+backward in ops tp
                 does not split); k = B / (dp b) micro-batches per step
    optimizer    t_opt = (parameters this rank updates) x optimizer_s_per_param
    ddp          one all-reduce of the gradient, P g bytes in ceil(P g / bucket) calls: 2(N-1)/N P g
    zero1/2      reduce-scatter of the gradient, then all-gather of the updated parameters:
                 (N-1)/N P g each (Rajbhandari et al. SC'20, section 7)
    zero3        per micro-batch a reduce-scatter and an all-gather of every unit in forward and
                 backward, but for the units kept gathered (the root and the last block from
                 forward to backward, the root and the first block between micro-batches): just
                 under 3 (N-1)/N P g per micro-batch (no no_sync under zero3; ``_zero3_traffic``)
    hierarchical reduce-scatter within a host, all-reduce of the 1/R shard across hosts, all-gather
                 within the host: across hosts 2(H-1)/H P g / R bytes per rank
    bf16 / powersgd / sign   g = 2; r(m + n) numbers (in the gradient's dtype) per m x n matrix
                 (Vogels et al. 2019), 1-D tensors plain; 1 bit per element plus a 4-byte scale
                 per chunk
    tp           per micro-batch and block: two all-reduces in forward, two in backward of b T C x 4
                 bytes (Shoeybi et al. 2019, section 3), plus the embedding's and the loss's
    pp           (k + p - 1)(t_stage + 2 t_p2p) - overlap x 2 (k - 1) t_p2p: the bubble is (p-1)/(k+p-1)
                 of the step when the stages are equal (Huang et al. 2019; Narayanan et al. SC'21),
                 t_stage the slowest; the steady state's asynchronous sends hide behind compute
    local-sgd    one all-reduce of the parameters every H steps: 2(N-1)/N P 4 / H bytes per step

Overlap, as plait overlaps: ddp and zero1/2 launch each bucket's collective in the last micro-batch's
backward, so the hidden time is ``overlap x min(the traffic but for the last bucket, the backward)``
(the profile's overlap is the share of the shorter of the two that runs hidden); zero1/2's
parameter all-gather after the step is never hidden; zero3 prefetches the next unit, so of its
traffic but the first units' gathers and the last reduce-scatters ``overlap x min(traffic, compute)``
is hidden, in forward and in backward apart. tp and pp traffic is on the critical path.

Memory per rank: the profile's base bytes + model states (ZeRO paper's accounting with plait's
dtypes: fp32 4 + 4 + 8 bytes per parameter for weights, gradients and AdamW's two moments, sharded
as each stage shards them) + saved activations (measured per micro-batch, scaled by tokens, by
4/17 + 13/17 / tp (what tp splits of a block's saved tensors) and the stage's layers, times the
micro-batches alive: 1 outside a pipeline, p - s under 1F1B, k under GPipe) + communication
buffers as each runtime allocates them (``_buffers``: none for ddp and zero1, which reduce in place
in the flat gradient; zero2's pooled buckets, at most three, and its full .grad while accumulating
over k > 1 micro-batches; zero3's two gathered units; compression's residual and copies).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

from plait.errors import ConfigError
from plait.plan.profile import Profile
from plait.plan.workload import FP32, Candidate, Workload


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The cost model's answer for one candidate: every term it added up."""

    candidate: Candidate
    step_s: float
    compute_s: float
    """Forward+backward of the step's micro-batches on the busiest rank (bubble included under pp)."""
    optimizer_s: float
    comm_s: float
    """All communication of a step, hidden or not."""
    exposed_comm_s: float
    """The part of ``comm_s`` nothing hides."""
    bubble: float
    """Idle share of a pipeline step ((p-1)/(k+p-1) with equal stages); 0 without one."""
    mem_bytes: float
    model_state_bytes: float
    activation_bytes: float
    buffer_bytes: float
    bytes_per_level: dict[str, float]
    """Bytes one rank sends per step on each link level (mean over ranks)."""
    fits: bool
    tokens_per_s: float


def _stages(workload: Workload, pp: int) -> list[list[int]]:
    """Layer indices of each pipeline stage, cut as plait cuts them (``pipeline.balance``)."""
    from plait.strategies.pipeline import balance

    n = len(workload.layer_params)
    if pp > n:
        raise ConfigError(f"pp={pp} exceeds the model's {n} pipeline layers")
    starts = [0, *balance(list(workload.layer_params), pp), n]
    return [list(range(a, b)) for a, b in itertools.pairwise(starts)]


class Collectives:
    """Time of each op on the data-parallel (or another) group of ``size`` ranks spread over hosts."""

    def __init__(self, profile: Profile, size: int, hosts: int) -> None:
        self.profile, self.size, self.hosts = profile, size, hosts
        self.per_host = max(1, size // hosts)

    def _level_time(
        self, op: str, level: str, nbytes: float, ranks: int, calls: int, streams: int = 1
    ) -> float:
        from plait.comm.stats import bus_bytes

        if ranks <= 1 or nbytes <= 0:
            return 0.0
        bus = bus_bytes(op, int(nbytes), ranks) if op != "p2p" else nbytes
        link = self.profile.link(level, op)
        return (
            calls * link.alpha_s * (ranks - 1) / max(1, self._measured_ranks(level) - 1)
            + streams * bus / link.bandwidth
        )

    def _measured_ranks(self, level: str) -> int:
        return self.profile.ranks_per_host if level == "host" else self.profile.hosts

    def flat(self, op: str, nbytes: float, calls: int = 1) -> tuple[float, dict[str, float]]:
        """A flat collective over the group: time and bytes per rank on each level.

        Within one host it runs at the host link's cost. Across hosts a ring crosses between hosts on
        H of its N links; every rank sends the same bus bytes, so the step runs at the slower link's pace.
        """
        from plait.comm.stats import bus_bytes

        bus = bus_bytes(op, int(nbytes), self.size)
        if self.hosts <= 1:
            return self._level_time(op, "host", nbytes, self.size, calls), {"host": bus}
        network = self.profile.link("network", op)
        seconds = (
            calls * network.alpha_s * (self.size - 1) / max(1, self.profile.hosts - 1)
            + bus / network.bandwidth
        )
        crossing = bus * self.hosts / self.size
        return seconds, {"host": bus - crossing, "network": crossing}

    def hierarchical_all_reduce(self, nbytes: float, calls: int = 1) -> tuple[float, dict[str, float]]:
        """Reduce-scatter within the host, all-reduce the 1/R shard across hosts, all-gather within."""
        within, across, levels = self.hierarchical_parts(nbytes, calls)
        return within + across, levels

    def hierarchical_parts(self, nbytes: float, calls: int = 1) -> tuple[float, float, dict[str, float]]:
        """``hierarchical_all_reduce``'s seconds within the host and across hosts, apart."""
        from plait.comm.stats import bus_bytes

        r, h = self.per_host, self.hosts
        within = self._level_time("reduce_scatter", "host", nbytes, r, calls) + self._level_time(
            "all_gather", "host", nbytes, r, calls
        )
        across = self._level_time("all_reduce", "network", nbytes / r, h, calls, streams=r)
        host_bytes = 2 * bus_bytes("reduce_scatter", int(nbytes), r)
        return within, across, {"host": host_bytes, "network": bus_bytes("all_reduce", int(nbytes / r), h)}

    def p2p(self, nbytes: float, level: str, calls: int = 1) -> float:
        link = self.profile.link(level, "p2p")
        return calls * link.alpha_s + nbytes / link.bandwidth


def _add(total: dict[str, float], more: dict[str, float], times: float = 1.0) -> None:
    for level, value in more.items():
        total[level] = total.get(level, 0.0) + value * times


def _compressed_bytes(workload: Workload, candidate: Candidate, grad_bytes: float) -> float:
    """Gradient bytes on the wire under the candidate's compression scheme."""
    if candidate.compression in (None, "bf16"):
        return grad_bytes
    _, *blocks, _ = workload.layer_params
    c, r = workload.n_embd, candidate.compress_rank
    if candidate.compression == "powersgd":
        # per block: c_attn (C x 3C), c_proj (C x C), c_fc (C x 4C), mlp c_proj (4C x C); the V x C table
        matrices = [(c, 3 * c), (c, c), (c, 4 * c), (4 * c, c)] * len(blocks) + [(workload.vocab_size, c)]
        # plait's PowerSGD sends a matrix plainly unless m n >= 2 r (m + n) (min_compression_rate)
        matrices = [(m, n) for m, n in matrices if m * n >= 2 * r * (m + n)]
        matrix_params = sum(m * n for m, n in matrices)
        numbers = sum(r * (m + n) for m, n in matrices) + workload.params - matrix_params
        return numbers * (2 if workload.mixed_precision else FP32)  # in the gradient's dtype
    if candidate.compression == "sign":
        return workload.params / 8 + FP32 * math.ceil(workload.params / 2**20)
    raise ConfigError(f"compression={candidate.compression!r} is not known; use bf16, powersgd or sign")


def predict(candidate: Candidate, workload: Workload, profile: Profile, hosts: int) -> Prediction:
    """The step time, memory per rank and bytes per link of ``candidate`` (see the module docstring)."""
    dp, tp, pp = candidate.dp, candidate.tp, candidate.pp
    b, t, c = workload.micro_batch, workload.block_size, workload.n_embd
    if workload.global_batch % (dp * b):
        raise ConfigError(
            f"global_batch={workload.global_batch} is not a multiple of dp x micro_batch = {dp} x {b}"
        )
    k = workload.global_batch // (dp * b)
    stages = _stages(workload, pp)
    flops = workload.layer_flops
    stage_flops = [sum(flops[i] for i in stage) for stage in stages]
    # the tied embedding/head table counts once on a stage holding both the first and the last layer
    tied_table = sum(workload.layer_params) - workload.params
    last = len(workload.layer_params) - 1
    stage_params = [
        sum(workload.layer_params[i] for i in stage) - (tied_table if {0, last} <= set(stage) else 0)
        for stage in stages
    ]
    rank_params = max(stage_params) / tp
    units = _zero3_units(workload, stages, rank_params, tp)
    # a tp shard does 1/tp of the matmuls, attention and MLP activation, all of the rest (fixed_share)
    fixed = profile.timing.fixed_share if profile.timing is not None else 0.0
    t_mb = b * t * max(stage_flops) / profile.flops_per_s * (fixed + (1 - fixed) / tp)
    g = 2 if (workload.mixed_precision or candidate.compression == "bf16") else FP32
    grad_bytes = rank_params * g
    bytes_per_level: dict[str, float] = {}
    dp_hosts = max(1, min(hosts, dp))  # the dp axis is the slowest-varying: it spans the hosts first
    dp_comm = Collectives(profile, dp, dp_hosts)
    inner_hosts = max(1, hosts // dp_hosts)
    inner_level = "host" if inner_hosts == 1 else "network"

    # -- data-parallel traffic ---------------------------------------------------------------------
    # overlap: the share of the shorter of (hideable comm, compute beside it) that is hidden; the
    # buckets launch in the last micro-batch's backward (2/3 of t_mb), the last one after it
    window = (2 / 3) * t_mb
    # a flat collective over ranks on several hosts runs at the wire's pace: the network's overlap
    overlap = profile.overlap_on("network" if dp_hosts > 1 else "host")
    calls = max(1, math.ceil(grad_bytes / workload.bucket_bytes))
    wire = _compressed_bytes(workload, candidate, grad_bytes)
    comm = exposed = 0.0
    if dp > 1 and candidate.strategy == "local-sgd":
        seconds, levels = dp_comm.flat("all_reduce", rank_params * FP32, calls)
        comm = exposed = seconds / candidate.period
        _add(bytes_per_level, levels, 1 / candidate.period)
    elif dp > 1 and candidate.zero in (0,) and candidate.strategy != "zero3":
        if candidate.hierarchical and dp_hosts > 1:
            # the in-host stages compete with compute for the cores, the cross-host one waits on the wire
            within, across, levels = dp_comm.hierarchical_parts(wire, calls)
            hideable = (calls - 1) / calls
            hidden = profile.overlap_on("host") * min(within * hideable, window)
            hidden += profile.overlap_on("network") * min(across * hideable, window)
            comm = within + across
            exposed = comm - min(hidden, window)
        else:
            comm, levels = dp_comm.flat("all_reduce", wire, calls)
            exposed = comm - overlap * min(comm * (calls - 1) / calls, window)
        _add(bytes_per_level, levels)
    elif dp > 1 and candidate.zero in (1, 2):
        rs, rs_levels = dp_comm.flat("reduce_scatter", wire, calls)
        ag, ag_levels = dp_comm.flat(
            "all_gather", rank_params * (2 if workload.mixed_precision else FP32), calls
        )
        comm = rs + ag
        exposed = ag + rs - overlap * min(rs * (calls - 1) / calls, window)
        _add(bytes_per_level, rs_levels)
        _add(bytes_per_level, ag_levels)
    elif dp > 1 and candidate.zero == 3:
        comm, exposed = _zero3_traffic(
            workload, rank_params, units, wire, dp_comm, k, t_mb, overlap, bytes_per_level
        )

    # -- tensor-parallel traffic (critical path) --------------------------------------------------
    tp_comm = Collectives(profile, tp, inner_hosts if pp == 1 else 1)
    tp_per_mb = 0.0
    if tp > 1:
        layers = max(sum(1 for i in stage if 0 < i <= workload.n_layer) for stage in stages)
        activation = b * t * c * FP32  # each call moves one activation: (calls x bytes) in all
        calls = 4 * layers + 2 + 3
        block, block_levels = tp_comm.flat("all_reduce", 4 * layers * activation, 4 * layers)  # 2 fwd, 2 bwd
        embed, embed_levels = tp_comm.flat("all_reduce", 2 * activation, 2)  # vocab-parallel embedding
        loss, loss_levels = tp_comm.flat("all_reduce", 3 * b * t * FP32, 3)  # max, sum of exp, target logit
        # each blocking call between compute also waits for the ranks to arrive (measured: interleave_s)
        tp_per_mb = block + embed + loss + calls * profile.interleave_s
        for levels in (block_levels, embed_levels, loss_levels):
            _add(bytes_per_level, levels, k)

    # -- pipeline: (k + p - 1) slots of the slowest stage, its tp and p2p traffic on the critical path
    bubble = 0.0
    if pp > 1:
        activation = b * t * c * FP32 / tp
        t_p2p = tp_comm.p2p(activation, inner_level) + profile.interleave_s
        slots = k + pp - 1
        bubble = (pp - 1) / slots
        tied, _ = Collectives(profile, 2, min(2, inner_hosts)).flat(
            "all_reduce", workload.vocab_size * c * g / tp
        )
        compute_s = slots * t_mb
        # sends are asynchronous: of the 2 (k + p - 1) hand-offs on the critical path, the 2 (k - 1)
        # of the steady state run beside the next micro-batch's compute (at the profile's overlap)
        hidden_p2p = profile.overlap_on(inner_level) * 2 * (k - 1) * min(t_p2p, t_mb)
        pipeline_comm = slots * (tp_per_mb + 2 * t_p2p) - hidden_p2p + tied
        _add(bytes_per_level, {inner_level: 2 * k * activation})
    else:
        compute_s = k * t_mb
        pipeline_comm = k * tp_per_mb
    comm += pipeline_comm
    exposed += pipeline_comm

    updated = rank_params / (dp if candidate.zero or candidate.strategy.startswith("zero") else 1)
    optimizer_s = updated * profile.optimizer_s_per_param
    step_s = compute_s + exposed + optimizer_s

    # -- memory per rank --------------------------------------------------------------------------
    states = _model_states(candidate, rank_params, dp, workload)
    activation_bytes = _activations(workload, profile, candidate, stages, k)
    buffers = _buffers(candidate, workload, rank_params, grad_bytes, dp, k, dp_comm.per_host, units)
    mem = profile.base_bytes + states + activation_bytes + buffers
    return Prediction(
        candidate=candidate,
        step_s=step_s,
        compute_s=compute_s,
        optimizer_s=optimizer_s,
        comm_s=comm,
        exposed_comm_s=exposed,
        bubble=bubble,
        mem_bytes=mem,
        model_state_bytes=states,
        activation_bytes=activation_bytes,
        buffer_bytes=buffers,
        bytes_per_level=bytes_per_level,
        fits=mem <= profile.memory_per_rank_bytes,
        tokens_per_s=workload.tokens / step_s,
    )


def _zero3_units(
    workload: Workload, stages: list[list[int]], rank_params: float, tp: int
) -> tuple[int, float, float]:
    """ZeRO-3's units on the busiest rank: how many blocks, a block's parameters, the root's (the
    rest: embeddings, final norm, the tied head)."""
    blocks = max(sum(1 for i in stage if 0 < i <= workload.n_layer) for stage in stages)
    block = max(workload.layer_params[1:-1] or [0]) / tp
    return blocks, block, max(0.0, rank_params - blocks * block)


def _zero3_traffic(
    workload: Workload,
    rank_params: float,
    units: tuple[int, float, float],
    wire: float,
    dp_comm: Collectives,
    k: int,
    t_mb: float,
    overlap: float,
    bytes_per_level: dict[str, float],
) -> tuple[float, float]:
    """ZeRO-3's seconds of traffic per step and the part nothing hides, as plait schedules it.

    ``units``: as ``_zero3_units`` counts them. Per micro-batch every unit is reduce-scattered once.
    The first forward gathers every unit; later micro-batches find the root and the first block
    still gathered. Backward gathers all but the root and the last block (kept from forward), a
    block's worth as large as what forward skips (blocks are alike). Exposed: the root's
    and the first block's gathers (nothing to hide them behind), each micro-batch's last two
    reduce-scatters (the first block's and the root's: only the embedding's backward is left), and
    of the rest what ``overlap`` does not hide behind forward (1/3 of t_mb) and backward (2/3).
    """
    wbytes = 2 if workload.mixed_precision else FP32
    blocks, block, root = units
    calls = blocks + (1 if root else 0)
    gather_all, gather_levels = dp_comm.flat("all_gather", rank_params * wbytes, calls)
    scatter_all, scatter_levels = dp_comm.flat("reduce_scatter", wire, calls)
    share_root, share_block = root / rank_params, block / rank_params
    first = (share_root + share_block) * gather_all  # also what later forwards and each backward skip
    gathers = k * gather_all - (k - 1) * first + k * (gather_all - first)
    forward = gather_all - first  # the blocks after the first, behind the forward before them
    backward = gather_all - first + (1 - share_root - share_block) * scatter_all
    hidden = overlap * (min(forward, t_mb / 3) + min(backward, 2 * t_mb / 3))
    comm = gathers + k * scatter_all
    exposed = first + k * ((share_root + share_block) * scatter_all + forward + backward - hidden)
    _add(bytes_per_level, gather_levels, gathers / gather_all if gather_all else 0.0)
    _add(bytes_per_level, scatter_levels, k)
    return comm, exposed


def _zero_stage(candidate: Candidate) -> int:
    """The ZeRO stage a candidate runs: its name's (zero1/2/3) or its data-parallel axis's."""
    if candidate.strategy in ("zero1", "zero2", "zero3"):
        return int(candidate.strategy[-1])
    return candidate.zero


def _buffers(
    candidate: Candidate,
    workload: Workload,
    params: float,
    grad_bytes: float,
    dp: int,
    k: int,
    per_host: int,
    units: tuple[int, float, float],
) -> float:
    """Communication memory beside the model states at the step's peak, as each runtime allocates it.

    ddp and zero1 reduce each bucket in place in the flat gradient (a model state): nothing more.
    zero2 collects and reduces buckets in pooled buffers (two reducing, one filling; together at
    most the gradient) and, accumulating over k > 1 micro-batches under no_sync, holds the full
    gradient in autograd's ``.grad`` until the last.
    zero3 holds the root, the current and the prefetched unit. Hierarchical: the host chunk of the
    bucket in flight (B/R). bf16 on the wire: one bf16 copy of the bucket being sent. PowerSGD: the
    error-feedback residual, as large as the local gradient, in its dtype (P and Q are r(m + n) numbers).
    Sign: the residual, and a padded fp32 copy and the decoded sum of the bucket being sent.
    """
    if dp == 1:
        return 0.0
    stage = _zero_stage(candidate)
    bucket = min(workload.bucket_bytes, params * FP32)
    buffers = 0.0
    if stage == 3:  # the root (gathered through forward and backward), the current and the prefetched unit
        _, block, root = units
        buffers += (2 * block + root) * (2 if workload.mixed_precision else FP32)
    elif stage == 2:
        # two buckets reducing and one filling (BucketPool's limit + 1), together at most the gradient
        buffers += min(3 * workload.bucket_bytes, grad_bytes)
        if k > 1:
            buffers += grad_bytes  # under no_sync zero2 accumulates in autograd's full .grad tensors
    if candidate.hierarchical and stage != 3:
        buffers += bucket / per_host
    if candidate.compression == "bf16":
        buffers += bucket / 2
    elif candidate.compression in ("powersgd", "sign"):
        # the error-feedback residual, as large as the local gradient and in its dtype
        buffers += params * (2 if workload.mixed_precision else FP32)
        if candidate.compression == "sign":
            buffers += 2 * bucket
    return buffers


def _model_states(candidate: Candidate, params: float, dp: int, workload: Workload) -> float:
    """Weights + gradients + AdamW moments per rank after a step, as plait holds them (live tensors).

    fp32, counted by ``plait.memory_report`` (tests/test_plan.py checks it at 2 ranks): ddp 4 + 4 + 8
    bytes per parameter; zero1 keeps the full gradient beside its reduce-scattered shard, 4 + (4 +
    4/N) + 8/N; zero2 only the shard, 4 + 4/N + 8/N; zero3 shards the weights and frees the gradient
    shard after the step, (4 + 8)/N. Mixed precision (not checked): 2-byte weights and gradients plus
    16 bytes of fp32 master, moments and the fp32 gradient the optimizer reads, sharded alike.
    """
    stage = _zero_stage(candidate)
    weights, grads, optimizer = (2, 2, 16) if workload.mixed_precision else (FP32, FP32, 2 * FP32)
    shard = 1 / dp
    per_param = {
        0: weights + grads + optimizer,
        1: weights + grads + grads * shard + optimizer * shard,
        2: weights + grads * shard + optimizer * shard,
        3: (weights + optimizer) * shard,
    }[stage]
    return params * per_param


TP_REPLICATED_ACTIVATIONS = 4 / 17
"""Share of a block's saved activations that tensor parallelism does not split, counted from plait's
GPT block per token: the inputs of ln_1, c_attn, ln_2 and c_fc (C each) are whole on every tp rank;
q, k, v and the attention output (4C), c_proj's input (C), GELU's input and output (8C) are split
(the accounting of Korthikanti et al. 2022, table 2, with fused attention saving no T x T scores and
no dropout masks): 4 of 17 C."""


def _activations(
    workload: Workload, profile: Profile, candidate: Candidate, stages: list[list[int]], k: int
) -> float:
    """Saved activations of the micro-batches alive at once on the busiest rank."""
    tokens = workload.micro_batch * workload.block_size
    if profile.timing is not None and profile.timing.tokens:
        per_token = profile.timing.activation_bytes / profile.timing.tokens
    else:
        per_token = profile.activation_bytes_per_token_layer * workload.n_embd * workload.n_layer
        per_token += workload.vocab_size * (2 if workload.mixed_precision else FP32)
    stage_share = max(len([i for i in s if 0 < i <= workload.n_layer]) for s in stages) / workload.n_layer
    alive = 1  # outside a pipeline; 1F1B keeps at most p micro-batches alive on its first stage, GPipe all k
    if candidate.pp > 1:
        alive = k if candidate.schedule == "gpipe" else min(k, candidate.pp)
    tp_share = TP_REPLICATED_ACTIVATIONS + (1 - TP_REPLICATED_ACTIVATIONS) / candidate.tp
    return per_token * tokens * stage_share * alive * tp_share
