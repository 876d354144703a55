"""Data: the sampler's world-size independence and resume, the stdlib corpus, synthetic streams."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from plait.data import (
    VOCAB_SIZE,
    BatchSampler,
    eval_batches,
    is_val_file,
    load_corpus,
    split_micro_batches,
    stdlib_files,
    stdlib_root,
    synthetic_tokens,
)
from plait.errors import ConfigError

TOKENS = synthetic_tokens(5_000, vocab_size=256, seed=0)
BLOCK = 16


def _rank_batches(global_batch: int, world_size: int, step: int = 0, seed: int = 0) -> list[torch.Tensor]:
    """Each rank's x at ``step``, from samplers built as every rank would build its own."""
    samplers = [
        BatchSampler(TOKENS, BLOCK, global_batch, rank, world_size, seed=seed, start_step=step)
        for rank in range(world_size)
    ]
    return [sampler.next_batch()[0] for sampler in samplers]


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_union_of_rank_slices_is_the_single_process_batch(world_size):
    reference = _rank_batches(8, 1, step=3)[0]
    torch.testing.assert_close(torch.cat(_rank_batches(8, world_size, step=3)), reference)


@settings(max_examples=30, deadline=None)
@given(
    local_batch=st.integers(1, 6),
    world_size=st.integers(1, 6),
    step=st.integers(0, 10_000),
    seed=st.integers(0, 2**32 - 1),
)
def test_global_batch_does_not_depend_on_world_size(local_batch, world_size, step, seed):
    global_batch = local_batch * world_size
    reference = _rank_batches(global_batch, 1, step, seed)[0]
    shards = _rank_batches(global_batch, world_size, step, seed)
    assert all(shard.shape == (local_batch, BLOCK) for shard in shards)
    torch.testing.assert_close(torch.cat(shards), reference)


def test_ranks_draw_disjoint_samples():
    # The rows are windows at distinct random offsets; with 5,000 tokens and 8 draws a repeat is unlikely,
    # so equal rows across ranks would mean two ranks took the same slice.
    shards = _rank_batches(8, 4)
    rows = {tuple(row.tolist()) for shard in shards for row in shard}
    assert len(rows) == 8


def test_steps_draw_different_batches():
    sampler = BatchSampler(TOKENS, BLOCK, 4, 0, 1)
    assert not torch.equal(sampler.next_batch()[0], sampler.next_batch()[0])
    assert sampler.step == 2


def test_targets_are_inputs_shifted_by_one():
    x, y = BatchSampler(TOKENS, BLOCK, 4, 0, 1).next_batch()
    assert x.dtype == y.dtype == torch.int64
    assert x.shape == y.shape == (4, BLOCK)
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y, strict=True):
        # Each window is a real stretch of the stream, with y's last token the one after x's last.
        start = _find(TOKENS, row_x.numpy())
        assert row_y[-1].item() == TOKENS[start + BLOCK]


def _find(tokens: np.ndarray, window: np.ndarray) -> int:
    starts = np.lib.stride_tricks.sliding_window_view(tokens, len(window))
    return int(np.flatnonzero((starts == window).all(axis=1))[0])


def test_resume_from_state_dict_gives_the_same_next_batch():
    original = BatchSampler(TOKENS, BLOCK, 4, 1, 2, seed=7)
    for _ in range(3):
        original.next_batch()
    state = original.state_dict()
    assert state == {"step": 3, "seed": 7}
    resumed = BatchSampler(TOKENS, BLOCK, 4, 1, 2)
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.next_batch(), original.next_batch())


def test_sampler_errors_name_the_numbers():
    with pytest.raises(ConfigError, match=r"global_batch=6 is not divisible by world_size=4.*\{1, 2, 3, 6\}"):
        BatchSampler(TOKENS, BLOCK, 6, 0, 4)
    with pytest.raises(ConfigError, match="too few for block_size=16"):
        BatchSampler(TOKENS[:16], BLOCK, 4, 0, 1)
    with pytest.raises(ConfigError, match="rank=2"):
        BatchSampler(TOKENS, BLOCK, 4, 2, 2)


def test_shortest_stream_samples_its_only_window():
    x, y = BatchSampler(TOKENS[: BLOCK + 1], BLOCK, 2, 0, 1).next_batch()
    torch.testing.assert_close(x[0], torch.from_numpy(TOKENS[:BLOCK].astype(np.int64)))
    torch.testing.assert_close(y[1], torch.from_numpy(TOKENS[1 : BLOCK + 1].astype(np.int64)))


def test_micro_batches_partition_the_local_batch():
    x, y = BatchSampler(TOKENS, BLOCK, 6, 0, 1).next_batch()
    micro = split_micro_batches(x, y, 3)
    assert [mx.shape[0] for mx, _ in micro] == [2, 2, 2]
    torch.testing.assert_close(torch.cat([my for _, my in micro]), y)
    with pytest.raises(ConfigError, match=r"batch of 6 cannot be split into 4.*\{1, 2, 3, 6\}"):
        split_micro_batches(x, y, 4)


def test_eval_batches_are_fixed_and_sharded_like_training():
    reference = eval_batches(TOKENS, BLOCK, batch=4, n_batches=3, rank=0, world_size=1)
    assert len(reference) == 3
    torch.testing.assert_close(eval_batches(TOKENS, BLOCK, 4, 3, 0, 1), reference)
    shards = [eval_batches(TOKENS, BLOCK, 4, 3, rank, 2) for rank in range(2)]
    for i, (x, y) in enumerate(reference):
        torch.testing.assert_close(torch.cat([shard[i][0] for shard in shards]), x)
        torch.testing.assert_close(torch.cat([shard[i][1] for shard in shards]), y)
    # Spread evenly: the first window starts the stream and the last one ends it.
    torch.testing.assert_close(reference[0][0][0], torch.from_numpy(TOKENS[:BLOCK].astype(np.int64)))
    torch.testing.assert_close(reference[-1][1][-1], torch.from_numpy(TOKENS[-BLOCK:].astype(np.int64)))


def test_corpus_is_deterministic():
    cached = load_corpus()
    fresh = load_corpus.__wrapped__()
    np.testing.assert_array_equal(cached.train, fresh.train)
    np.testing.assert_array_equal(cached.val, fresh.val)
    assert cached.files == fresh.files == len(stdlib_files())


def test_corpus_splits_by_file():
    corpus = load_corpus()
    root = stdlib_root()
    in_val = [is_val_file(path.relative_to(root).as_posix(), 0.05) for path in stdlib_files()]
    sizes = [path.stat().st_size for path in stdlib_files()]
    val_sizes = [size for size, val in zip(sizes, in_val, strict=True) if val]
    train_sizes = [size for size, val in zip(sizes, in_val, strict=True) if not val]
    assert val_sizes and train_sizes
    # Each file lies whole in exactly one split: each array is its files plus one separator between each.
    assert corpus.val.size == sum(val_sizes) + len(val_sizes) - 1
    assert corpus.train.size == sum(train_sizes) + len(train_sizes) - 1
    assert 0.01 < corpus.val.size / (corpus.train.size + corpus.val.size) < 0.2
    assert corpus.train.dtype == corpus.val.dtype == np.uint8
    assert corpus.train.max() < VOCAB_SIZE


def test_stdlib_files_skip_tests_and_packages():
    root = stdlib_root()
    relative = [path.relative_to(root).as_posix() for path in stdlib_files()]
    assert relative == sorted(relative)
    assert "os.py" in relative
    assert not [p for p in relative if "/test" in f"/{p}" or "site-packages" in p or "idlelib" in p]


def test_synthetic_is_seeded_and_typed():
    np.testing.assert_array_equal(synthetic_tokens(1000, 256, 3), synthetic_tokens(1000, 256, 3))
    assert not np.array_equal(synthetic_tokens(1000, 256, 3), synthetic_tokens(1000, 256, 4))
    assert synthetic_tokens(10, 256, 0).dtype == np.uint8
    wide = synthetic_tokens(1000, 50304, 0)
    assert wide.dtype == np.int32 and wide.max() < 50304 and len(wide) == 1000


def test_synthetic_is_predictable_from_the_previous_two_tokens():
    # The empirical entropy of the next token given the previous pair stays near the chain's 1.03 nats,
    # far below the ln(16) = 2.77 nats of uniform noise.
    tokens = synthetic_tokens(200_000, 16, seed=0).astype(np.int64)
    state = tokens[:-2] * 16 + tokens[1:-1]
    counts = np.zeros((256, 16))
    np.add.at(counts, (state, tokens[2:]), 1)
    probs = counts / counts.sum(axis=1, keepdims=True).clip(min=1)
    entropy = -(counts * np.log(np.where(probs > 0, probs, 1))).sum() / counts.sum()
    assert entropy < 1.3
