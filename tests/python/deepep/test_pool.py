"""The output pool never hands out memory that a live tensor still uses."""
import torch

from deep_ep.pool import MIN_POOLED_BYTES, OutputPool


def test_live_outputs_are_never_reused() -> None:
    pool = OutputPool()
    assert pool.enabled
    rows = MIN_POOLED_BYTES // 4096 + 1
    held = [pool.empty((rows, 1024), torch.float32) for _ in range(3)]
    for i, t in enumerate(held):
        t.fill_(i)
    view_only = held[1][5:7]
    del held[1]
    fresh = [pool.empty((rows, 1024), torch.float32) for _ in range(3)]
    for t in fresh:
        t.fill_(-1)
    assert bool((held[0] == 0).all()) and bool((held[1] == 2).all()) and bool((view_only == 1).all())


def test_dropped_outputs_are_reused() -> None:
    pool = OutputPool()
    rows = 2 * MIN_POOLED_BYTES // 4096
    first = pool.empty((rows, 1024), torch.float32)
    address = first.data_ptr()
    del first
    again = pool.empty((rows, 1000), torch.float32)
    assert again.data_ptr() == address and again.shape == (rows, 1000)


def test_small_outputs_bypass_the_pool() -> None:
    pool = OutputPool()
    small = pool.empty((4, 4), torch.bfloat16)
    assert small.shape == (4, 4) and not pool.blocks
