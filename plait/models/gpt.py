"""A nanoGPT-style decoder-only transformer (Karpathy's nanoGPT, after GPT-2, Radford et al. 2019).

The module names (``transformer.wte``, ``h[i].attn.c_attn``, ``lm_head`` …) follow nanoGPT on purpose:
parallel strategies find the layers they shard by these names, and a reader who knows nanoGPT or the
GPT-2 checkpoints finds their way around without a map.

The model returns logits for every position and computes no loss: the trainer owns the loss so that a
pipeline stage or a tensor-parallel vocabulary shard can compute it its own way.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from plait.errors import ConfigError, divisors


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT; defaults are nanoGPT's GPT-2 small with the vocabulary padded to 50304."""

    block_size: int = 1024
    """Longest sequence the model accepts: the number of learned position embeddings."""
    vocab_size: int = 50304
    """Number of token ids; GPT-2's 50257 padded up to a multiple of 64 for faster matmuls."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block; each head sees ``n_embd // n_head`` channels."""
    n_embd: int = 768
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout probability on attention weights, residual branches and embeddings; 0 for pretraining."""
    bias: bool = True
    """Whether linear layers and LayerNorms have biases (GPT-2 does; without is slightly better and faster)."""

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.n_embd % self.n_head != 0:
            raise ConfigError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                f"use n_head in {divisors(self.n_embd)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1); use 0.0 to disable it")


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t attends to positions <= t."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        # One matmul produces queries, keys and values for all heads: (B, T, C) -> (B, T, 3C).
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, _ = x.shape
        # chunk, not split(C): under tensor parallelism c_attn yields this rank's heads only, 3C/t wide,
        # and n_head counts the local heads.
        q, k, v = self.c_attn(x).chunk(3, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim): heads become a batch dimension for the attention kernel.
        q, k, v = (t.view(batch, time, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(batch, time, -1)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The position-wise feed-forward network: C -> 4C -> GELU -> C."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def _checkpointed(forward: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    """``forward(*args)`` under the non-reentrant checkpoint when a backward will need it; else as is."""
    if not torch.is_grad_enabled():  # evaluation: nothing is saved, nothing to recompute
        return forward(*args)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False)


class GPT(nn.Module):
    """Token and position embeddings, ``n_layer`` blocks, a final LayerNorm and a tied output head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): the input embedding and the output projection are one
        # Parameter, so it is counted, stored and all-reduced once.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init: each block adds two residual branches, so shrinking their output
        # projections by 1/sqrt(2 * n_layer) keeps the residual stream's variance from growing with depth.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def activation_checkpointing(self) -> None:
        """Keep only each block's input in forward and recompute the block's activations in backward.

        Each block's ``forward`` (not ``__call__``) runs under torch's non-reentrant checkpoint, so module
        hooks stay outside it and fire once: a strategy that gathers a block's parameters in a forward
        pre-hook (zero3) or splits its layers (tp) sees the same calls with or without it, and the
        recomputation reads the parameters its backward has gathered. Saved per block: its (B, T, C)
        input instead of every intermediate; the price is one more forward of each block in backward.
        The state dict's names do not change.
        """
        for block in self.transformer.h:
            block.forward = functools.partial(_checkpointed, block.forward)

    def num_params(self, non_embedding: bool = False) -> int:
        """Count parameters, the tied embedding/head weight once.

        With ``non_embedding=True`` the position embeddings are left out, as in nanoGPT; the token
        embeddings stay in because, tied, they are also the output layer's weights.
        """
        # parameters() yields each Parameter once, so the tied weight is not double counted.
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.transformer.wpe.weight.numel()
        return total

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Map token ids of shape (B, T) to next-token logits of shape (B, T, vocab_size)."""
        x = self.embed(idx)
        for block in self.transformer.h:
            x = block(x)
        return self.head(x)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> the residual stream (B, T, C): token plus position embeddings."""
        _, time = idx.shape
        if time > self.config.block_size:
            raise ValueError(
                f"sequence length T={time} exceeds block_size={self.config.block_size}; "
                f"crop the input to at most {self.config.block_size} tokens"
            )
        positions = torch.arange(time, device=idx.device)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The residual stream (B, T, C) -> logits (B, T, vocab_size): final LayerNorm, tied projection."""
        return self.lm_head(self.transformer.ln_f(x))

    def pipeline_layers(self) -> list[tuple[tuple[str, ...], Callable[[torch.Tensor], torch.Tensor]]]:
        """The model as a chain for pipeline parallelism: (the module paths a layer owns, its function).

        embed -> each block -> head; each layer passes one tensor to the next, so a pipeline may cut
        between any two. The tied embedding/head weight belongs to the first and the last layer.
        """
        embed = (("transformer.wte", "transformer.wpe", "transformer.drop"), self.embed)
        blocks = [((f"transformer.h.{i}",), block) for i, block in enumerate(self.transformer.h)]
        return [embed, *blocks, (("transformer.ln_f", "lm_head"), self.head)]

    @staticmethod
    def tensor_parallel_plan() -> dict[str, str]:
        """Megatron-LM's split of a GPT (Shoeybi et al. 2019), for ``plait.TensorParallel``.

        Each block is column-parallel then row-parallel twice (attention: q|k|v split by heads, then
        the output projection; MLP: c_fc then c_proj), one all-reduce per pair in forward and one in
        backward. The tied embedding/head is split along the vocabulary.
        """
        return {
            "transformer.wte": "vocab",
            "transformer.h.*.attn.c_attn": "qkv",
            "transformer.h.*.attn.c_proj": "row",
            "transformer.h.*.mlp.c_fc": "col",
            "transformer.h.*.mlp.c_proj": "row",
            "lm_head": "vocab",
        }


PRESETS: dict[str, GPTConfig] = {
    "gpt-tiny": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=256, bias=False),
    "gpt-mini": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=256, bias=False),
    "gpt-small": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
    "gpt-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50304),
    # Benchmark sizes: ~7.5M parameters (a byte-level model that trains in minutes on a few CPU ranks)
    # and ~166M (GPT-2 small's width at 1.5x its depth, where communication cost starts to dominate).
    "gpt-bench-7m": GPTConfig(n_layer=6, n_head=8, n_embd=320, block_size=256, vocab_size=256, bias=False),
    "gpt-bench-168m": GPTConfig(n_layer=18, n_head=12, n_embd=768, block_size=512, vocab_size=50304),
}
"""Named model shapes; byte-level (vocab 256, no biases) unless sized for the GPT-2 tokenizer."""


def preset(name: str, **overrides: object) -> GPTConfig:
    """The config named ``name`` in PRESETS, with any fields replaced by ``overrides`` (validated again)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; use one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
