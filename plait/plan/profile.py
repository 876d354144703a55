"""A cluster profile: what one rank computes per second and what each link level costs, as JSON.

The cost model (``plait.plan.cost``) needs four kinds of figure; ``plait.plan.measure`` measures
them on the job's own ranks (``plait plan --profile``: every rank at once, as in training, so ranks
sharing cores or a memory bus slow each other as they will then), or this module reads them from a
hand-written file for a cluster we cannot run on:

    links     per level ("host": ranks on one host; "network": across hosts) and per op
              (all_reduce, reduce_scatter, all_gather, p2p) the alpha-beta cost of one call,
                  t = alpha + bus_bytes / bandwidth
              with bus_bytes as plait's comm layer counts them (``plait.comm.stats.bus_bytes``:
              2(N-1)/N x B for an all-reduce, (N-1)/N x B for a reduce-scatter or all-gather, B for
              a send). Measured with the algorithm plait would pick (``AlgorithmTable.calibrate``
              runs first, so a reduce-scatter is timed with the all-to-all or p2p variant it chooses).
    compute   the model's forward+backward per micro-batch, as seconds and as the rate it implies
              (training FLOPs per second, 6 x params + 12 x layers x T x C per token, Kaplan et al.
              2020 / nanoGPT's MFU count), which scales it to the shards of tp and pp; the optimizer
              step per parameter (plait's AdamW on one flat fp32 tensor)
    overlap   the share of a collective's time that compute beside it hides (1: all of it, as on a GPU
              with its own copy engines; measured here: an async all-reduce beside a matmul loop
              against the two one after the other)
    memory    bytes per host; what a training rank holds beside its model states (the peak of two
              real ddp steps less the states, activations and buffers the cost model counts); the
              activations autograd saves per micro-batch (counted from the saved tensors themselves
              with ``torch.autograd.graph.saved_tensors_hooks``)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from plait.errors import ConfigError

LEVELS = ("host", "network")
OPS = ("all_reduce", "reduce_scatter", "all_gather", "p2p")


@dataclasses.dataclass(frozen=True)
class Link:
    """The alpha-beta cost of one op on one link level: ``t = alpha_s + bus_bytes / bandwidth``."""

    alpha_s: float
    """Seconds one call costs whatever its size (latency, launch, synchronisation)."""
    bandwidth: float
    """Bus bytes per second once a message is large (what nccl-tests calls bus bandwidth)."""

    def seconds(self, bus_bytes: float, calls: int = 1) -> float:
        """Time of ``calls`` calls that together move ``bus_bytes`` bus bytes."""
        if bus_bytes <= 0:
            return 0.0
        return calls * self.alpha_s + bus_bytes / self.bandwidth


@dataclasses.dataclass(frozen=True)
class ModelTiming:
    """One model's measured compute on one rank (all ranks running at once)."""

    model: str
    """The plait model preset measured."""
    micro_batch: int
    """Sequences per forward+backward."""
    tokens: int
    """Tokens per micro-batch (micro_batch x block_size)."""
    fwd_bwd_s: float
    """Median seconds of one forward+backward (loss included)."""
    activation_bytes: float
    """Bytes of the tensors autograd saved for backward in one micro-batch's forward."""
    fixed_share: float = 0.0
    """Share of ``fwd_bwd_s`` in ops tensor parallelism does not split (layer norms, residual adds, the
    loss's softmax, autograd's bookkeeping: self CPU time from ``torch.profiler``), which every
    tensor-parallel shard pays whole."""


@dataclasses.dataclass(frozen=True)
class Profile:
    """What the cost model knows about a cluster (measured or written by hand)."""

    name: str
    """Where it comes from: "measured on <host>" or the hand-written cluster's name."""
    hosts: int
    """Hosts the profile describes."""
    ranks_per_host: int
    """Ranks (GPUs, or CPU processes) per host."""
    flops_per_s: float
    """Training FLOPs one rank achieves (6N + 12LTC per token, forward+backward)."""
    optimizer_s_per_param: float
    """Seconds of one AdamW step per fp32 parameter a rank updates."""
    overlap: float
    """Share of communication hidden behind compute that runs beside it (0 none, 1 all)."""
    memory_per_rank_bytes: float
    """Memory one rank may use: host RAM / ranks per host on CPU, HBM per GPU."""
    base_bytes: float
    """A training rank's resident bytes beside its model states, activations and buffers (interpreter,
    torch, the trainer and its data, backward's temporaries, allocator slack; CUDA context): measured
    as the peak of two real ddp steps less what the cost model counts for them."""
    links: dict[str, dict[str, Link]]
    """Per level ("host", "network") and op: the alpha-beta cost."""
    interleave_s: float = 0.0
    """Seconds a blocking collective costs beyond its alpha-beta time when it sits between compute, as
    tensor parallelism's and a pipeline's do: the ranks arrive apart and the earlier one waits. Measured
    as small all-reduces between matmul chunks against the two alone; 0 for hand-written profiles."""
    timing: ModelTiming | None = None
    """The measured forward+backward of the model the profile was taken for (None: use flops_per_s)."""
    activation_bytes_per_token_layer: float = 0.0
    """Hand-written profiles: saved-activation bytes per token per layer per unit of n_embd (Korthikanti et
    al. 2022: 34 bytes in 16-bit without recomputation); 0: use the measured timing's count."""
    network_overlap: float | None = None
    """``overlap`` of traffic across hosts, measured on one rank per host beside the others: a collective
    bound by the wire leaves the cores to compute, one within a host competes for them. None: ``overlap``."""

    def overlap_on(self, level: str) -> float:
        """The share of ``level``'s traffic that compute beside it hides."""
        if level == "network" and self.network_overlap is not None:
            return self.network_overlap
        return self.overlap

    def link(self, level: str, op: str) -> Link:
        if level not in self.links or op not in self.links[level]:
            raise ConfigError(
                f"the profile {self.name!r} has no {op} cost on the {level!r} level; "
                f"it has { ({k: sorted(v) for k, v in self.links.items()}) }"
            )
        return self.links[level][op]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> Profile:
        data = dict(data)
        if "gpu" in data:
            return from_hardware(data)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"profile has unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
        data["links"] = {
            level: {op: Link(**link) for op, link in ops.items()} for level, ops in data["links"].items()
        }
        if data.get("timing") is not None:
            data["timing"] = ModelTiming(**data["timing"])
        return cls(**data)


def load(path: str | Path) -> Profile:
    """A profile from JSON: one ``plait plan --profile`` wrote, or a hand-written one (see ``from_hardware``)."""
    try:
        return Profile.from_dict(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        raise ConfigError(
            f"profile {str(path)!r} does not exist; measure one with plait plan --profile"
        ) from None
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise ConfigError(f"profile {str(path)!r} is not a plait profile: {e}") from None


def from_hardware(spec: dict) -> Profile:
    """A profile from a cluster's data sheet: the hand-written form.

    ``{"name": ..., "hosts": 8, "gpu": {"tflops": 312, "mfu": 0.5, "hbm_gb": 80},
    "host_link": {"gbps": 2400, "latency_us": 8}, "network_link": {"gbps": 200, "latency_us": 15},
    "gpus_per_host": 8, "optimizer_us_per_mparam": 20}``: peak dense TFLOPs per GPU times the share a
    training step reaches (MFU), HBM per GPU; per link level the bus bandwidth one GPU gets in Gbit/s
    (NVLink: all-reduce bus bandwidth within a node; InfiniBand: per-GPU NIC rate across nodes) and a
    per-call latency. Every op on a level gets that level's alpha and bandwidth (rings and NVLink
    switches move every op at about the same bus bandwidth); compute and communication overlap fully.
    """
    try:
        gpu = spec["gpu"]
        links = {}
        for level in LEVELS:
            given = spec.get(f"{level}_link")
            if given is not None:
                link = Link(given["latency_us"] * 1e-6, given["gbps"] * 1e9 / 8)
                links[level] = dict.fromkeys(OPS, link)
        return Profile(
            name=spec["name"],
            hosts=int(spec.get("hosts", 1)),
            ranks_per_host=int(spec.get("gpus_per_host", 8)),
            flops_per_s=gpu["tflops"] * 1e12 * gpu.get("mfu", 0.5),
            optimizer_s_per_param=spec.get("optimizer_us_per_mparam", 20.0) * 1e-12,
            overlap=float(spec.get("overlap", 1.0)),
            memory_per_rank_bytes=gpu["hbm_gb"] * 1e9,
            base_bytes=spec.get("base_gb", 1.0) * 1e9,
            links=links,
            activation_bytes_per_token_layer=float(spec.get("activation_bytes_per_token_layer", 34.0)),
        )
    except KeyError as e:
        raise ConfigError(f"hand-written profile lacks {e}; see plait.plan.profile.from_hardware") from None
