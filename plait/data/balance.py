"""Shares of the global batch for ranks of unequal speed, with the update of the equal split.

Synchronous data parallelism waits for its slowest rank every step. Give rank i a share n_i of the
global batch B proportional to its measured speed (sequences per second of busy time: its step time
less the time it spent in collectives, which is waiting for the others) and it finishes with them.
The mathematics stays the equal split's: the all-reduce averages over N ranks, (1/N) sum_i grad L_i,
where L_i is the mean loss over rank i's n_i sequences; weighting each rank's loss by

    w_i = n_i N / B        so that   (1/N) sum_i w_i grad L_i = (1/B) sum over all B sequences,

gives the gradient of the mean over the whole global batch, the same as equal shares, with the
all-reduce unchanged. Shares are whole micro-batches, at least one each.
"""

from __future__ import annotations

from plait.errors import ConfigError


def parse_shares(text: str, world: int, global_batch: int, micro_batch: int) -> tuple[int, ...] | None:
    """``"equal"`` -> None; ``"24,8"`` -> (24, 8), checked against the world and the batch."""
    if text in ("equal", "auto"):
        return None
    try:
        shares = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(
            f"balance={text!r} is not 'equal', 'auto' or sequences per rank like '24,8'"
        ) from None
    if len(shares) != world or sum(shares) != global_batch or any(s <= 0 or s % micro_batch for s in shares):
        raise ConfigError(
            f"balance={text!r} needs {world} positive multiples of micro_batch={micro_batch} "
            f"summing to batch_size={global_batch}"
        )
    return shares


def shares_from_speed(
    busy_s: list[float], samples: list[int], global_batch: int, micro_batch: int
) -> tuple[int, ...]:
    """Whole micro-batches per rank, proportional to samples / busy seconds, summing to the batch."""
    speeds = [n / max(t, 1e-9) for n, t in zip(samples, busy_s, strict=True)]
    units = global_batch // micro_batch
    if units < len(speeds):
        raise ConfigError(f"batch_size={global_batch} gives fewer micro-batches than the {len(speeds)} ranks")
    exact = [units * s / sum(speeds) for s in speeds]
    counts = [max(1, int(e)) for e in exact]
    while sum(counts) < units:  # largest remainders first
        i = max(range(len(counts)), key=lambda j: exact[j] - counts[j])
        counts[i] += 1
    while sum(counts) > units:
        i = max((j for j in range(len(counts)) if counts[j] > 1), key=lambda j: counts[j] - exact[j])
        counts[i] -= 1
    return tuple(c * micro_batch for c in counts)


def loss_weight(local_batch: int, global_batch: int, world: int) -> float:
    """w_i = n_i N / B: the weight on a rank's mean loss that keeps the update the equal split's."""
    return local_batch * world / global_batch
