"""A Buffer and its process groups are freed when the last reference goes, without the garbage collector.

A Buffer kept alive by a reference cycle lives until the collector runs, at the latest during
interpreter exit. Its gloo groups (its own, and the caller's it holds) are then freed while the
interpreter finalizes: a gloo worker thread that still has to release a finished collective's
tensors cannot take the GIL any more, exits through a noexcept frame and the process aborts
("terminate called without an active exception"). So no Buffer may sit in a cycle: with the
collector off, dropping the last reference must free the Buffer, for every strategy and with a
strategy instance the caller built; after destroy() its own group is freed too, and without
destroy() only torch's registry holds that group (it goes with the default group).

    python -m pytest tests/python/deepep/test_lifetime.py
"""

from __future__ import annotations

import gc
import sys
import weakref

import pytest

import deep_ep
from deep_ep.strategies import AlltoAllNormalCommStrategy
from deep_ep.testing import spawn_ranks
from deep_ep.transport import groups

# (low_latency_mode, strategy name); normal mode also swaps in a strategy instance the caller built.
KINDS = [(False, "default"), (False, "alltoall"), (True, "default"), (True, "alltoall")]


def freed_by_refcount(rank: int, num_ranks: int, group, destroy: bool) -> None:
    gc.disable()  # only reference counting may free the Buffer
    try:
        for low_latency, strategy in KINDS:
            if low_latency:
                buffer = deep_ep.Buffer(group, low_latency_mode=True, num_rdma_bytes=0, low_latency_strategy=strategy)
            else:
                buffer = deep_ep.Buffer(group, normal_strategy=strategy)
                buffer.normal_strategy = AlltoAllNormalCommStrategy(runtime=buffer.runtime, group=group)
            alive, comm = weakref.ref(buffer), weakref.ref(buffer.runtime.comm)
            if destroy:
                buffer.destroy()
            del buffer
            kind = f"rank {rank}, {'low-latency' if low_latency else 'normal'} {strategy!r}"
            assert alive() is None, f"{kind}: the Buffer outlived its last reference (a reference cycle)"
            if destroy:
                assert comm() is None, f"{kind}: the Buffer's own process group outlived destroy()"
            else:
                # Still registered with torch (freed with the default group, as any group), and held
                # by nothing else: as many references as a group made the same way that nobody uses.
                unused = weakref.ref(groups.group_over(group, "gloo"))
                assert sys.getrefcount(comm()) == sys.getrefcount(unused()), (
                    f"{kind}: something besides torch's registry holds the dropped Buffer's group"
                )
    finally:
        gc.enable()


@pytest.mark.parametrize("destroy", [False, True], ids=["dropped", "destroyed"])
def test_buffer_freed_by_refcount(destroy: bool) -> None:
    spawn_ranks(freed_by_refcount, 2, destroy)
