"""Synthetic token streams that a model can learn quickly, for tests and benchmarks of any vocabulary size.

Uniform noise would leave the loss flat at ln(vocab_size), so a test could not tell training from no
training. Instead the stream is an order-2 Markov chain with a sparse transition table: after each
pair of tokens only a few next tokens are possible, with fixed skewed probabilities. A model that learns
the table reaches a loss near the chain's entropy (about 1.03 nats) far below ln(vocab_size).
"""

import numpy as np

from plait.errors import ConfigError

_NEXT_PROBS = np.array([0.6, 0.25, 0.1, 0.05])
"""Probabilities of a state's candidate next tokens; the chain's entropy is that of this distribution."""

_MAX_STATES = 65521
"""Transition-table rows when vocab_size**2 is larger: a prime, so hashing pairs into rows mixes well."""

_CHAINS = 256
"""Independent chains generated side by side, so the Python loop runs n_tokens / 256 times."""


def synthetic_tokens(n_tokens: int, vocab_size: int, seed: int) -> np.ndarray:
    """``n_tokens`` tokens of a seeded order-2 Markov chain over ``vocab_size`` ids.

    The table and the sampled stream both come from ``seed``, so the same arguments give the same
    array on every rank. The dtype is uint8 when ids fit in a byte, int32 otherwise.
    """
    if n_tokens < 1:
        raise ConfigError(f"n_tokens={n_tokens} must be a positive integer")
    if not 2 <= vocab_size <= np.iinfo(np.int32).max:
        raise ConfigError(f"vocab_size={vocab_size} must be in [2, 2**31 - 1]")
    rng = np.random.default_rng(seed)
    n_states = min(vocab_size**2, _MAX_STATES)
    candidates = rng.integers(0, vocab_size, size=(n_states, len(_NEXT_PROBS)), dtype=np.int64)
    cumulative = np.cumsum(_NEXT_PROBS)

    # Chains advance together, one step per iteration; each chain is a contiguous stretch of the output.
    length = -(-n_tokens // _CHAINS)
    chains = np.empty((_CHAINS, length), dtype=np.int64)
    previous, current = rng.integers(0, vocab_size, size=(2, _CHAINS), dtype=np.int64)
    for t in range(length):
        state = (previous * vocab_size + current) % n_states
        choice = np.minimum(np.searchsorted(cumulative, rng.random(_CHAINS)), len(_NEXT_PROBS) - 1)
        previous, current = current, candidates[state, choice]
        chains[:, t] = current
    dtype = np.uint8 if vocab_size <= 256 else np.int32
    return chains.reshape(-1)[:n_tokens].astype(dtype)
