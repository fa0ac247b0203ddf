"""The output pool never hands out memory that a live tensor still uses, survives any sequence of
sizes, stays within its budget, and falls back to plain allocations when reference counts cannot
be trusted."""

from __future__ import annotations

import os
import random
import sys
import threading
from typing import Callable, List, Tuple

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import gather_objects, make_inputs, reference_of  # noqa: E402

import deep_ep  # noqa: E402
import deep_ep.pool as pool_module  # noqa: E402
from deep_ep.pool import MAX_BLOCKS, MAX_IDLE_HANDOUTS, MIN_POOLED_BYTES, OutputPool  # noqa: E402
from deep_ep.reference import reference_combine  # noqa: E402
from deep_ep.testing import spawn_ranks  # noqa: E402

MiB = 1 << 20


def rows_for(nbytes: int, width: int = 1024) -> int:
    """Rows of a float32 [rows, width] output of about `nbytes`."""
    return max(1, nbytes // (4 * width))


def assert_disjoint(tensors: List[torch.Tensor]) -> None:
    """No two tensors share a byte of memory."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors if t.numel())
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start, "two live outputs share memory"


def churn(pool: OutputPool, steps: int, seed: int, max_mib: float = 4.0) -> None:
    """Random sizes and dtypes; a random subset of outputs (or only a view of one) stays alive.
    Every live output keeps the value it was filled with, no two share memory, and the pool
    stays within its bounds."""
    rng = random.Random(seed)
    held: List[Tuple[torch.Tensor, float]] = []
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.int8)
    for step in range(steps):
        dtype = rng.choice(dtypes)
        nbytes = int(rng.uniform(0.25, max_mib) * MiB)
        width = rng.choice((64, 96, 1024))
        rows = max(1, nbytes // (width * torch.empty(0, dtype=dtype).element_size()))
        out = pool.empty((rows, width), dtype)
        assert out.shape == (rows, width) and out.dtype == dtype and out.is_contiguous()
        value = float(step % 100)
        out.fill_(value)
        keep = rng.random()
        if keep < 0.3:
            held.append((out, value))
        elif keep < 0.4:
            held.append((out[rows // 2 :], value))  # only a view survives
        del out
        if len(held) > 6 or (held and rng.random() < 0.2):
            held.pop(rng.randrange(len(held)))
        for tensor, expected in held:  # an alias would have been filled whole: a sample shows it
            sample = torch.cat([tensor.reshape(-1)[::4099], tensor.reshape(-1)[-1:]]).float()
            assert bool((sample == expected).all()), f"step {step}: a live output changed"
        assert_disjoint([t for t, _ in held])
        assert len(pool.blocks) <= MAX_BLOCKS and pool.pooled_bytes <= pool.max_bytes


def test_many_distinct_sizes_do_not_crash() -> None:
    """The serving pattern of issue 9: growing batch sizes, each output dropped before the next.
    (The list-based pool raised 'The size of tensor a ... must match' on the ninth size.)"""
    pool = OutputPool()
    for i in range(3 * MAX_BLOCKS):
        out = pool.empty((rows_for(MiB + i * MiB // 4), 1024), torch.float32)
        out.fill_(i)
        del out
    assert len(pool.blocks) <= MAX_BLOCKS and pool.pooled_bytes <= pool.max_bytes


@pytest.mark.parametrize("max_bytes", [None, 10 * MiB])
def test_random_sizes_never_alias_live_outputs(max_bytes) -> None:
    pool = OutputPool(max_bytes)
    assert pool.enabled
    churn(pool, 200, seed=1)


def test_live_outputs_and_views_are_never_reused() -> None:
    pool = OutputPool()
    rows = rows_for(MIN_POOLED_BYTES) + 1
    held = [pool.empty((rows, 1024), torch.float32) for _ in range(3)]
    for i, t in enumerate(held):
        t.fill_(i)
    view_only = held[1][5:7]
    as_numpy = held[2].numpy()
    del held[1:]
    fresh = [pool.empty((rows, 1024), torch.float32) for _ in range(3)]
    for t in fresh:
        t.fill_(-1)
    assert bool((held[0] == 0).all()) and bool((view_only == 1).all()) and bool((as_numpy == 2).all())


def test_dropped_outputs_are_reused() -> None:
    pool = OutputPool()
    rows = 530  # 2.07 MiB, not a size class boundary
    first = pool.empty((rows, 1024), torch.float32)
    address = first.data_ptr()
    del first
    again = pool.empty((rows, 1000), torch.float32)
    assert again.data_ptr() == address and again.shape == (rows, 1000)
    # A slightly larger output (a batch a few tokens longer) fits the same block: sizes are rounded up.
    del again
    longer = pool.empty((rows + 3, 1024), torch.float32)
    assert longer.data_ptr() == address and len(pool.blocks) == 1


def test_small_outputs_bypass_the_pool() -> None:
    pool = OutputPool()
    small = pool.empty((4, 4), torch.bfloat16)
    empty = pool.empty((0, 7168), torch.bfloat16)
    assert small.shape == (4, 4) and empty.shape == (0, 7168) and not pool.blocks


def test_budget_bounds_the_pool() -> None:
    pool = OutputPool(max_bytes=8 * MiB)
    # Larger than the budget: a plain allocation.
    big = pool.empty((rows_for(9 * MiB), 1024), torch.float32)
    assert not pool.blocks
    # Busy blocks fill the budget: the next output is plain and nothing busy is dropped.
    busy = [pool.empty((rows_for(3 * MiB), 1024), torch.float32) for _ in range(2)]
    kept = list(pool.blocks)
    extra = pool.empty((rows_for(3 * MiB), 1024), torch.float32)
    assert pool.blocks == kept and pool.pooled_bytes <= 8 * MiB
    # Once they are dropped, a new size replaces the least recently used.
    del busy
    other = pool.empty((rows_for(7 * MiB), 1024), torch.float32)
    assert pool.pooled_bytes <= 8 * MiB and len(pool.blocks) == 1
    assert_disjoint([big, extra, other])


def test_idle_blocks_are_released() -> None:
    """A size that stops being used leaves the pool after MAX_IDLE_HANDOUTS hand-outs of other sizes."""
    pool = OutputPool()
    pool.empty((rows_for(5 * MiB), 1024), torch.float32)
    old = pool.blocks[0]
    for _ in range(MAX_IDLE_HANDOUTS):
        pool.empty((rows_for(2 * MiB), 1024), torch.float32)
    assert any(b is old for b in pool.blocks)
    pool.empty((rows_for(2 * MiB), 1024), torch.float32)
    assert not any(b is old for b in pool.blocks) and len(pool.blocks) == 1


def test_size_classes() -> None:
    for nbytes in [1, 4095, 4096, MiB - 1, MiB, MiB + 1, 3 * MiB + 17, 1 << 30]:
        rounded = pool_module.size_class(nbytes)
        assert rounded >= nbytes and rounded % 4096 == 0
        assert rounded <= max(4096, nbytes * 9 // 8 + 4096)


def test_budget_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("DEEP_EP_POOL_BYTES", "0")
    off = OutputPool()
    assert not off.enabled
    off.empty((rows_for(2 * MiB), 1024), torch.float32)
    assert not off.blocks
    monkeypatch.setenv("DEEP_EP_POOL_BYTES", str(64 * MiB))
    assert OutputPool().max_bytes == 64 * MiB
    monkeypatch.setenv("DEEP_EP_POOL_BYTES", "lots")
    with pytest.raises(ValueError, match="DEEP_EP_POOL_BYTES must be a non-negative integer.*'lots'"):
        OutputPool()


def test_threads_never_share_a_block() -> None:
    pool = OutputPool()
    failures: List[str] = []

    def worker(value: int) -> None:
        for _ in range(50):
            out = pool.empty((rows_for(2 * MiB), 1024), torch.float32)
            out.fill_(value)
            if not (float(out.min()) == value == float(out.max())):
                failures.append(f"thread {value} saw another thread's values")

    threads = [threading.Thread(target=worker, args=(v,)) for v in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


# ---- reference counts that are missing or lie ----------------------------------------------------------------
def constant(value: int) -> Callable[[object], int]:
    return lambda obj: value


@pytest.mark.parametrize("broken", ["missing", "constant"])
def test_untrustworthy_counts_at_construction_disable_the_pool(monkeypatch, broken) -> None:
    monkeypatch.setattr(pool_module, "reference_count", None if broken == "missing" else constant(2))
    pool = OutputPool()
    assert not pool.enabled
    churn(pool, 30, seed=2)
    assert not pool.blocks


@pytest.mark.parametrize("lie", ["always_free", "always_busy"])
def test_counts_that_start_lying_later_disable_the_pool(monkeypatch, lie) -> None:
    """A count that passed the probe and then stops tracking (always 'free' would alias live outputs,
    always 'busy' would only grow): the first hand-out notices, and outputs are plain from then on."""
    pool = OutputPool()
    assert pool.enabled
    held = pool.empty((rows_for(2 * MiB), 1024), torch.float32).fill_(7)
    monkeypatch.setattr(pool_module, "reference_count", constant(pool.idle_refs + (0 if lie == "always_free" else 5)))
    churn(pool, 30, seed=3)
    assert not pool.enabled and not pool.blocks
    assert float(held.min()) == 7 == float(held.max())


# ---- the pool under a Buffer, with every kind of count -------------------------------------------------------
COUNTS = ("working", "missing", "lying_at_construction", "lying_later")


def held_results_stay_correct(rank: int, num_ranks: int, group) -> None:
    """Several large dispatch/combine results alive at once (each >= 1 MiB, so pooled), checked
    against the reference only after all calls ran: an alias would have overwritten an earlier one."""
    hidden, experts, topk = 512, 4 * num_ranks, 3
    for counts in COUNTS:
        if counts == "missing":
            pool_module.reference_count = None
        elif counts == "lying_at_construction":
            pool_module.reference_count = constant(2)
        buffer = deep_ep.Buffer(group, num_nvl_bytes=1 << 20)
        if counts == "lying_later":
            pool_module.reference_count = constant(buffer.runtime.pool.idle_refs)
        results = []
        for call in range(4):
            inputs = make_inputs(rank, 1100 + 37 * call + 50 * rank, hidden, experts, topk, num_ranks, seed=call)
            per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(inputs.topk_idx, experts)
            recv_x, recv_idx, recv_w, rows, handle, _ = buffer.dispatch(
                inputs.x,
                num_tokens_per_rank=per_rank,
                is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert,
                topk_idx=inputs.topk_idx,
                topk_weights=inputs.topk_weights,
            )
            combined = buffer.combine((recv_x.float() * 2).to(torch.bfloat16), handle)[0]
            assert recv_x.numel() * 2 >= MIN_POOLED_BYTES and combined.numel() * 2 >= MIN_POOLED_BYTES
            results.append((inputs, gather_objects(inputs, group), recv_x, recv_idx, recv_w, rows, combined))
        assert_disjoint([t for r in results for t in (r[2], r[3], r[4], r[6])])
        for inputs, everyone, recv_x, recv_idx, recv_w, rows, combined in results:
            ref = reference_of(everyone, experts, rank)
            assert torch.equal(recv_x, ref["x"]) and torch.equal(recv_idx, ref["topk_idx"])
            assert torch.equal(recv_w, ref["weights"]) and rows == ref["rows_per_expert"]
            selection = (inputs.x.float() * 2).to(torch.bfloat16).unsqueeze(1).expand(-1, topk, -1)
            expected = reference_combine(selection, inputs.topk_idx, inputs.topk_weights)
            assert torch.allclose(combined.double(), expected, rtol=2e-2, atol=2e-2), counts
        assert buffer.runtime.pool.enabled == (counts == "working"), counts
        buffer.destroy()
        pool_module.reference_count = sys.getrefcount


def test_buffer_results_with_every_kind_of_count() -> None:
    spawn_ranks(held_results_stay_correct, 2)
