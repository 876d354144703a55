"""What a plan is for and what it may choose: the workload (model shape, batch) and a candidate (strategy, mesh)."""

from __future__ import annotations

import dataclasses

FP32 = 4


@dataclasses.dataclass(frozen=True)
class Workload:
    """The model and the batch a plan is for."""

    params: int
    """Parameters of the whole model."""
    n_layer: int
    n_embd: int
    n_head: int
    block_size: int
    vocab_size: int
    layer_params: tuple[int, ...]
    """Parameters of each pipeline layer: the embedding, each block, the head (tied ones in both)."""
    global_batch: int
    """Sequences per optimizer step."""
    micro_batch: int
    """Sequences per forward+backward on one rank."""
    bucket_bytes: float = 25 * 2**20
    """Gradient bucket size (``--bucket-mb``)."""
    mixed_precision: bool = False
    """bf16 compute and communication with an fp32 master (else fp32 throughout)."""

    @property
    def tokens(self) -> int:
        return self.global_batch * self.block_size

    @property
    def layer_flops(self) -> tuple[float, ...]:
        """Training FLOPs per token of each pipeline layer: 6 x its matmul weights (+ attention's 12TC)."""
        embed, *blocks, head = self.layer_params
        attention = 12 * self.block_size * self.n_embd
        # the embedding is a lookup (no matmul); the head multiplies by the tied V x C table
        return (
            0.0,
            *(6 * p + attention for p in blocks),
            6 * self.vocab_size * self.n_embd + 6 * (head - embed),
        )

    @property
    def flops_per_token(self) -> float:
        return 6 * self.params + 12 * self.n_layer * self.block_size * self.n_embd


def workload_for(
    model: str, global_batch: int, micro_batch: int, overrides: dict | None = None, **options
) -> Workload:
    """A workload from a plait model preset (with ``overrides``), counted on the meta device."""
    import torch

    from plait.models import GPT, preset
    from plait.strategies.pipeline import layer_sizes

    config = preset(model, **(overrides or {}))
    with torch.device("meta"):
        gpt = GPT(config)
    return Workload(
        params=gpt.num_params(),
        n_layer=config.n_layer,
        n_embd=config.n_embd,
        n_head=config.n_head,
        block_size=config.block_size,
        vocab_size=config.vocab_size,
        layer_params=tuple(layer_sizes(gpt, gpt.pipeline_layers())),
        global_batch=global_batch,
        micro_batch=micro_batch,
        **options,
    )


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way to run the workload: a strategy and its mesh."""

    strategy: str
    """ddp, zero1, zero2, zero3, tp, pp, hybrid or local-sgd."""
    dp: int
    tp: int = 1
    pp: int = 1
    zero: int = 0
    """ZeRO stage on the data-parallel axis (0: plain all-reduce)."""
    compression: str | None = None
    """None, "bf16", "powersgd" or "sign" on the data-parallel gradient."""
    compress_rank: int = 4
    hierarchical: bool = False
    period: int = 1
    """local-sgd: steps between synchronisations (H)."""
    schedule: str = "1f1b"

    @property
    def label(self) -> str:
        if self.strategy == "hybrid":
            axes = [
                f"{axis}{size}"
                for axis, size in (("dp", self.dp), ("tp", self.tp), ("pp", self.pp))
                if size > 1
            ]
            name = " ".join(["hybrid", *axes]) + (f" zero{self.zero}" if self.zero else "")
        elif self.strategy == "local-sgd":
            name = f"local-sgd H={self.period}"
        else:
            name = self.strategy
        if self.compression:
            name += f" +{self.compression}" + (
                f"{self.compress_rank}" if self.compression == "powersgd" else ""
            )
        if self.hierarchical:
            name += " hier"
        return name

    @property
    def exact(self) -> bool:
        """The same updates as one process, to fp32 round-off: no compression (bf16 too), no local steps."""
        return self.strategy != "local-sgd" and self.compression is None

    def train_options(self) -> dict[str, object]:
        """The ``plait train`` fields that run this candidate."""
        options: dict[str, object] = {"strategy": self.strategy}
        if self.strategy in ("tp", "pp", "hybrid"):
            options.update(tp=self.tp, pp=self.pp, schedule=self.schedule)
            if self.zero:
                options["zero"] = self.zero
        if self.strategy == "local-sgd":
            options["period"] = self.period
        if self.compression == "bf16":
            options["grad_dtype"] = "bf16"
        elif self.compression == "powersgd":
            options["compression"] = {"rank": self.compress_rank}  # plait.PowerSGD's fields
        elif self.compression:
            options["compression"] = self.compression
        if self.hierarchical:
            options["hierarchical"] = True
        return options
