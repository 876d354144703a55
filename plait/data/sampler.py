"""Sharded, resumable sampling of training windows that does not depend on the world size.

The global batch of step ``s`` is a pure function of ``(seed, s)``: its window offsets come from
``np.random.default_rng([seed, s])``, and rank ``r`` of ``world_size`` takes the r-th contiguous slice.
Hence the union over ranks is the same global batch for any world size, which is what lets a parity test
compare a 4-rank run with the single-process reference, and lets a run resume on a different number of
workers with only the step number as state.
"""

import numpy as np
import torch

from plait.errors import ConfigError, divisors


def _check_shard(batch: int, rank: int, world_size: int, name: str) -> int:
    """Validate a rank's share of a batch and return the per-rank batch size."""
    if batch < 1:
        raise ConfigError(f"{name}={batch} must be a positive integer")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank={rank} must be in [0, world_size) with world_size={world_size} >= 1")
    if batch % world_size != 0:
        raise ConfigError(
            f"{name}={batch} is not divisible by world_size={world_size}; "
            f"use world_size in {divisors(batch)} or a {name} that is a multiple of {world_size}"
        )
    return batch // world_size


def _check_length(tokens: np.ndarray, block_size: int) -> None:
    if block_size < 1:
        raise ConfigError(f"block_size={block_size} must be a positive integer")
    if len(tokens) < block_size + 1:
        raise ConfigError(
            f"{len(tokens)} tokens are too few for block_size={block_size}: a window needs "
            f"block_size + 1 = {block_size + 1} (inputs plus the shifted targets); use a smaller block_size"
        )


def _windows(tokens: np.ndarray, offsets: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``tokens[o : o + block_size]`` and targets shifted by one, for each offset ``o``, as int64.

    Both are contiguous tensors of their own, ready to be sent between ranks or modified in place.
    """
    # (n, 1) + (1, block_size + 1) broadcasts to the index matrix of every window in one gather.
    index = offsets[:, None] + np.arange(block_size + 1)[None, :]
    window = torch.from_numpy(tokens[index].astype(np.int64))
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


class BatchSampler:
    """Draws this rank's slice of each step's global batch of random training windows."""

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        global_batch: int,
        rank: int,
        world_size: int,
        seed: int = 0,
        start_step: int = 0,
        shares: tuple[int, ...] | None = None,
    ) -> None:
        _check_length(tokens, block_size)
        self.local_batch = _check_shard(global_batch, rank, world_size, "global_batch")
        self.start = rank * self.local_batch
        self.tokens = tokens
        self.block_size = block_size
        self.global_batch = global_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self._step = start_step
        if shares is not None:
            self.set_shares(shares)

    def set_shares(self, shares: tuple[int, ...]) -> None:
        """Unequal slices (``plait train --balance``): rank r takes ``shares[r]`` windows after those before it."""
        if len(shares) != self.world_size or sum(shares) != self.global_batch or min(shares) < 1:
            raise ConfigError(
                f"shares={shares} must be {self.world_size} positive counts summing to {self.global_batch}"
            )
        self.local_batch = shares[self.rank]
        self.start = sum(shares[: self.rank])

    @property
    def step(self) -> int:
        """The global step whose batch ``next_batch`` returns next."""
        return self._step

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y), each int64 of shape (local_batch, block_size), y = x shifted by one token."""
        # Every rank draws the whole global batch (global_batch integers, cheap) and keeps its slice,
        # so no rank's slice depends on how many others there are.
        rng = np.random.default_rng([self.seed, self._step])
        offsets = rng.integers(0, len(self.tokens) - self.block_size, size=self.global_batch)
        self._step += 1
        return _windows(self.tokens, offsets[self.start : self.start + self.local_batch], self.block_size)

    def state_dict(self) -> dict[str, int]:
        """All the state needed to resume: the next step and the seed."""
        return {"step": self._step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from ``state_dict()``, possibly saved with a different world size."""
        self._step = state["step"]
        self.seed = state["seed"]


def split_micro_batches(x: torch.Tensor, y: torch.Tensor, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cut a local batch into ``n`` equal micro-batches along the batch dimension (views, no copy)."""
    batch = x.shape[0]
    if n < 1 or batch % n != 0:
        raise ConfigError(
            f"a local batch of {batch} cannot be split into {n} equal micro-batches; "
            f"use a micro-batch count in {divisors(batch)}"
        )
    return list(zip(x.chunk(n), y.chunk(n), strict=True))


def eval_batches(
    tokens: np.ndarray, block_size: int, batch: int, n_batches: int, rank: int, world_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's slices of ``n_batches`` fixed evaluation batches of ``batch`` windows each.

    The ``batch * n_batches`` windows start at offsets spread evenly over ``tokens``, so the validation
    loss is measured on the same text at every evaluation and for every world size; rank ``r`` takes
    the r-th contiguous slice of each batch, disjoint from every other rank's.
    """
    _check_length(tokens, block_size)
    local = _check_shard(batch, rank, world_size, "batch")
    if n_batches < 1:
        raise ConfigError(f"n_batches={n_batches} must be a positive integer")
    offsets = np.linspace(0, len(tokens) - block_size - 1, batch * n_batches).astype(np.int64)
    start = rank * local
    return [
        _windows(tokens, batch_offsets[start : start + local], block_size)
        for batch_offsets in offsets.reshape(n_batches, batch)
    ]
