"""Properties of the one shared memory layout: FlatBuffer, make_buckets, FlatRun and flat_runs."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from plait.buffers import FlatBuffer, FlatRun, flat_runs, make_buckets, owner

SETTINGS = settings(max_examples=50, deadline=None)

shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)
shape_lists = st.lists(shapes, min_size=1, max_size=8)
pad_tos = st.integers(1, 24)


def make_params(shape_list: list[tuple[int, ...]], dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    """Parameters with distinct nonzero values, so a misplaced element shows."""
    params, start = [], 1
    for shape in shape_list:
        numel = torch.Size(shape).numel()
        params.append(nn.Parameter(torch.arange(start, start + numel, dtype=dtype).reshape(shape)))
        start += numel
    return params


def element_offset(view: torch.Tensor, base: torch.Tensor) -> int:
    """How many elements into ``base``'s memory ``view`` starts (asserts they share storage)."""
    assert view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    return (view.data_ptr() - base.data_ptr()) // base.element_size()


# -- FlatBuffer -------------------------------------------------------------------------------------


@SETTINGS
@given(shape_list=shape_lists, pad_to=pad_tos)
def test_params_alias_the_flat_storage_and_keep_their_values(shape_list: list, pad_to: int) -> None:
    params = make_params(shape_list)
    before = [p.detach().clone() for p in params]
    flat = FlatBuffer(params, pad_to=pad_to)
    for i, (p, value) in enumerate(zip(params, before)):
        offset, numel = flat.offsets[i], flat.numels[i]
        assert p.shape == value.shape
        assert torch.equal(p.detach(), value)
        assert element_offset(p.data, flat.data) == offset
        assert element_offset(p.grad, flat.grad) == offset
        assert owner(p) == (flat, i)

        p.data.fill_(-1.0)  # param -> flat
        assert torch.all(flat.data[offset : offset + numel] == -1.0)
        flat.data[offset : offset + numel] = -2.0  # flat -> param
        assert torch.all(p.detach() == -2.0)
        flat.grad[offset : offset + numel] = 3.0
        assert torch.all(p.grad == 3.0)
    assert flat.offsets == [sum(flat.numels[:i]) for i in range(len(params))]
    assert flat.numel == sum(p.numel() for p in params)


@SETTINGS
@given(shape_list=shape_lists, pad_to=pad_tos, data=st.data())
def test_padding_is_minimal_zero_and_shards_cover_the_buffer_once(
    shape_list: list, pad_to: int, data: st.DataObject
) -> None:
    flat = FlatBuffer(make_params(shape_list), pad_to=pad_to)
    total, padded = flat.numel, flat.data.numel()
    assert padded % pad_to == 0
    assert total <= padded < total + pad_to
    assert flat.grad.numel() == padded
    assert torch.all(flat.data[total:] == 0) and torch.all(flat.grad[total:] == 0)
    assert flat.nbytes == padded * 4

    world = data.draw(st.sampled_from([w for w in range(1, pad_to + 1) if pad_to % w == 0]), label="world")
    slices = [flat.shard(rank, world) for rank in range(world)]
    assert {s.stop - s.start for s in slices} == {padded // world}
    covered = torch.zeros(padded, dtype=torch.int64)
    for s in slices:
        covered[s] += 1
    assert torch.all(covered == 1)


def test_shard_rejects_a_world_that_does_not_divide_the_buffer() -> None:
    flat = FlatBuffer(make_params([(3,)]), pad_to=4)
    with pytest.raises(ValueError, match="does not split over 3 ranks"):
        flat.shard(0, 3)


def test_flat_buffer_rejects_empty_mixed_and_already_flattened_params() -> None:
    with pytest.raises(ValueError, match="at least one"):
        FlatBuffer([])
    with pytest.raises(ValueError, match="one dtype"):
        FlatBuffer(make_params([(2,)]) + make_params([(2,)], torch.float64))
    params = make_params([(2,), (3,)])
    FlatBuffer(params)
    with pytest.raises(ValueError, match="already lives in a FlatBuffer"):
        FlatBuffer(params[1:])


def test_gradient_present_before_flattening_is_kept() -> None:
    params = make_params([(2, 3), (4,)])
    sum(p.sum() * (i + 2) for i, p in enumerate(params)).backward()
    flat = FlatBuffer(params)
    assert torch.equal(flat.grad, torch.tensor([2.0] * 6 + [3.0] * 4))


# -- the gradient hook ------------------------------------------------------------------------------


@SETTINGS
@given(shape_list=shape_lists, pad_to=pad_tos)
def test_grad_hook_puts_gradients_in_the_flat_buffer(shape_list: list, pad_to: int) -> None:
    params = make_params(shape_list)
    flat = FlatBuffer(params, pad_to=pad_to)
    ready: list[int] = []
    flat.install_grad_hooks(ready.append)
    weights = [torch.randn(p.shape) for p in params]
    expected = torch.cat([w.reshape(-1) for w in weights])

    def backward() -> None:
        sum((p * w).sum() for p, w in zip(params, weights)).backward()

    for p in params:
        p.grad = None
    backward()
    assert sorted(ready) == list(range(len(params)))
    for i, p in enumerate(params):
        assert p.grad is flat.grad_views[i]
    assert torch.equal(flat.grad[: flat.numel], expected)

    pointers = [p.grad.data_ptr() for p in params]
    backward()  # accumulates into the same memory
    assert [p.grad.data_ptr() for p in params] == pointers
    torch.testing.assert_close(flat.grad[: flat.numel], 2 * expected, rtol=0, atol=0)
    assert torch.all(flat.grad[flat.numel :] == 0)


def test_remove_hooks_stops_the_callbacks() -> None:
    params = make_params([(2,), (3,)])
    flat = FlatBuffer(params)
    ready: list[int] = []
    flat.install_grad_hooks(ready.append)
    flat.remove_hooks()
    sum(p.sum() for p in params).backward()
    assert ready == []


# -- make_buckets -----------------------------------------------------------------------------------


@SETTINGS
@given(numels=st.lists(st.integers(0, 100), min_size=0, max_size=40), cap=st.integers(1, 300))
def test_buckets_cover_whole_params_in_order(numels: list[int], cap: int) -> None:
    buckets = make_buckets(numels, cap)
    offsets = [sum(numels[:i]) for i in range(len(numels))]
    assert [b.index for b in buckets] == list(range(len(buckets)))
    assert [i for b in buckets for i in b.params] == list(range(len(numels)))
    assert all(b.params for b in buckets)
    start = 0
    for b in buckets:
        assert b.start == start == offsets[b.params[0]]
        assert b.stop == offsets[b.params[-1]] + numels[b.params[-1]]
        assert b.numel == sum(numels[i] for i in b.params)
        start = b.stop
    assert start == sum(numels)
    assert all(b.numel >= cap for b in buckets[:-1])
    # a bucket closes as soon as it reaches the cap: without its last parameter it is under it
    assert all(b.numel - numels[b.params[-1]] < cap for b in buckets)


@pytest.mark.parametrize("cap", [0, -1])
def test_bucket_cap_must_be_positive(cap: int) -> None:
    with pytest.raises(ValueError, match=f"bucket_numel={cap}"):
        make_buckets([1, 2], cap)


# -- flat_runs --------------------------------------------------------------------------------------


@SETTINGS
@given(shape_list=shape_lists, data=st.data())
def test_flat_runs_use_placed_params_where_they_are(shape_list: list, data: st.DataObject) -> None:
    params = make_params(shape_list)
    flat = FlatBuffer(params)
    pointers = [p.data_ptr() for p in params]
    first = data.draw(st.integers(0, len(params) - 1), label="first")
    last = data.draw(st.integers(first, len(params) - 1), label="last")

    runs = flat_runs(params[first : last + 1])
    assert runs == [FlatRun(flat, first, last)]
    assert [p.data_ptr() for p in params] == pointers
    assert all(owner(p) == (flat, i) for i, p in enumerate(params))
    run = runs[0]
    assert run.start == flat.offsets[first]
    assert run.data.data_ptr() == params[first].data_ptr()
    assert run.data.numel() == run.grad.numel() == sum(p.numel() for p in params[first : last + 1])


@SETTINGS
@given(shape_list=shape_lists, keep=st.lists(st.booleans(), min_size=8, max_size=8))
def test_flat_runs_split_where_placed_params_are_not_consecutive(shape_list: list, keep: list[bool]) -> None:
    params = make_params(shape_list)
    flat = FlatBuffer(params)
    chosen = [i for i in range(len(params)) if keep[i]]
    runs = flat_runs([params[i] for i in chosen])
    assert [i for r in runs for i in range(r.first, r.last + 1)] == chosen
    assert all(r.buffer is flat for r in runs)
    assert all(a.last + 1 < b.first for a, b in itertools.pairwise(runs))


@SETTINGS
@given(shape_list=shape_lists)
def test_flat_runs_flatten_loose_params_into_one_run(shape_list: list) -> None:
    params = make_params(shape_list)
    before = [p.detach().clone() for p in params]
    runs = flat_runs(params)
    assert len(runs) == 1
    run = runs[0]
    assert (run.first, run.last) == (0, len(params) - 1)
    assert len(run.buffer.params) == len(params)
    assert all(a is b for a, b in zip(run.buffer.params, params))
    assert torch.equal(run.data, torch.cat([b.reshape(-1) for b in before]))
    for i, p in enumerate(params):
        assert owner(p) == (run.buffer, i)
        assert element_offset(p.data, run.data) == run.buffer.offsets[i]


DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@SETTINGS
@given(shape_list=shape_lists, dtype_choice=st.lists(st.sampled_from(DTYPES), min_size=8, max_size=8))
def test_flat_runs_make_one_run_per_dtype(shape_list: list, dtype_choice: list[torch.dtype]) -> None:
    params = [make_params([shape], dtype)[0] for shape, dtype in zip(shape_list, dtype_choice)]
    runs = flat_runs(params)
    assert sorted(str(r.data.dtype) for r in runs) == sorted({str(p.dtype) for p in params})
    for r in runs:
        members = r.buffer.params[r.first : r.last + 1]
        same_dtype = [p for p in params if p.dtype == r.data.dtype]
        assert len(same_dtype) == len(members)
        assert all(a is b for a, b in zip(same_dtype, members))
    # the optimizer's gradients arrive through the hooks flat_runs installs
    sum(p.float().sum() for p in params).backward()
    for r in runs:
        assert torch.all(r.grad == 1)


class _PendingHandle:
    """A collective that completes only when waited on."""

    done = False

    def poll(self) -> bool:
        return False

    def wait(self) -> None:
        self.done = True


@pytest.mark.parametrize("window", [1, 2, 3])
def test_a_window_bounds_the_bucket_collectives_in_flight(window):
    from plait.strategies.bucketing import GradientBuckets

    handles: list[_PendingHandle] = []

    def launch(k: int) -> _PendingHandle:
        assert sum(not h.done for h in handles) < window, "launched past the window"
        handles.append(_PendingHandle())
        return handles[-1]

    buffers = [FlatBuffer([nn.Parameter(torch.zeros(2))]) for _ in range(6)]
    schedule = GradientBuckets(buffers, None, None, launch, max_in_flight=window)
    for k in range(6):
        schedule._count(k)  # bucket k's last gradient arrived
    assert len(handles) == 6
    assert [h.done for h in handles] == [True] * (6 - window) + [False] * window  # the oldest waited first
