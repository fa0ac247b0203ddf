"""Buffers on EP subgroups of a larger world: disjoint groups built at the same time, a strided
group, and ranks that never build a Buffer. Nothing a Buffer does may need a rank outside its group.

    python -m pytest tests/python/deepep/test_subgroups.py

Every Buffer runs normal dispatch + combine and low-latency dispatch + combine (shared memory, and
in the first two scenarios all_to_all too), checked against the pure-torch reference built from
its group's inputs.
"""

from __future__ import annotations

import os
import sys
import time
from typing import List, Optional

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Inputs, leaked_segments, make_inputs, reference_of  # noqa: E402

import deep_ep  # noqa: E402
from deep_ep.reference import reference_combine  # noqa: E402
from deep_ep.testing import spawn_ranks  # noqa: E402
from deep_ep.transport import groups  # noqa: E402

HIDDEN, EXPERTS_PER_RANK, TOPK, MAX_TOKENS = 64, 2, 2, 12
TOKENS = (9, 4, 12, 0)  # per group rank (cycled)


def group_inputs(group_size: int, seed: int) -> List[Inputs]:
    """Every group rank's inputs (deterministic: each rank builds all of them without communicating)."""
    experts = EXPERTS_PER_RANK * group_size
    return [
        make_inputs(r, TOKENS[r % len(TOKENS)], HIDDEN, experts, TOPK, group_size, seed=seed) for r in range(group_size)
    ]


def selection_outputs(inputs: Inputs) -> torch.Tensor:
    """[T, K, H]: what identity experts return for every selection of a token (its own row)."""
    return inputs.x.unsqueeze(1).expand(-1, TOPK, -1)


def check_normal(buffer: deep_ep.Buffer, seed: int) -> None:
    """Normal dispatch + combine with identity experts, against the reference."""
    rank, size = buffer.rank, buffer.group_size
    everyone = group_inputs(size, seed)
    mine = everyone[rank]
    experts = EXPERTS_PER_RANK * size
    _, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(mine.topk_idx, experts)
    recv_x, recv_idx, recv_weights, counts, handle, _ = buffer.dispatch(
        mine.x,
        is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert,
        topk_idx=mine.topk_idx,
        topk_weights=mine.topk_weights,
    )
    ref = reference_of(everyone, experts, rank)
    assert torch.equal(recv_x, ref["x"]) and torch.equal(recv_idx, ref["topk_idx"])
    assert torch.equal(recv_weights, ref["weights"]) and counts == ref["rows_per_expert"]
    combined, _, _ = buffer.combine(recv_x, handle)
    expected = reference_combine(selection_outputs(mine), mine.topk_idx, mine.topk_weights)
    assert torch.allclose(combined.double(), expected, rtol=1e-2, atol=1e-2)


def check_low_latency(buffer: deep_ep.Buffer, seed: int) -> None:
    """Low-latency dispatch (bf16) + combine with identity experts, against the reference."""
    rank, size = buffer.rank, buffer.group_size
    everyone = group_inputs(size, seed)
    mine = everyone[rank]
    experts = EXPERTS_PER_RANK * size
    recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(
        mine.x, mine.topk_idx, MAX_TOKENS, experts, use_fp8=False
    )
    ref = reference_of(everyone, experts, rank)
    real = ref["src_idx"].numel()
    assert recv_count.tolist() == ref["rows_per_expert"]
    assert torch.equal(recv_x[:real], ref["x"])
    combined, _, _ = buffer.low_latency_combine(recv_x, mine.topk_idx, mine.topk_weights, handle)
    expected = reference_combine(selection_outputs(mine), mine.topk_idx, mine.topk_weights)
    assert torch.allclose(combined.double(), expected, rtol=1e-2, atol=1e-2)


def run_on_group(group, seed: int, strategies=("default", "alltoall")) -> None:
    """Every mode of a Buffer on `group` (this rank must be a member): shared memory and all_to_all."""
    size = dist.get_world_size(group)
    rdma_bytes = deep_ep.Buffer.get_low_latency_rdma_size_hint(MAX_TOKENS, HIDDEN, size, EXPERTS_PER_RANK * size)
    for strategy in strategies:
        buffer = deep_ep.Buffer(
            group,
            num_nvl_bytes=1 << 20,
            num_rdma_bytes=rdma_bytes,
            low_latency_mode=True,
            normal_strategy=strategy,
            low_latency_strategy=strategy,
        )
        assert buffer.rank == dist.get_rank(group) and buffer.group_size == size
        check_normal(buffer, seed)
        check_low_latency(buffer, seed + 1)
        check_normal(buffer, seed + 2)
        buffer.destroy()


def make_group(ranks: List[int]) -> Optional[dist.ProcessGroup]:
    """The caller's EP group as applications make it: every rank of the world calls new_group."""
    group = dist.new_group(ranks)
    return group if dist.get_rank() in ranks else None


# ---- scenarios ------------------------------------------------------------------------------------------
def disjoint_groups(rank: int, num_ranks: int, world) -> None:
    """World 4 as two EP groups [0, 1] and [2, 3], each building its Buffers at the same time."""
    groups = [make_group([0, 1]), make_group([2, 3])]
    run_on_group(groups[rank // 2], seed=10 * (rank // 2))


def strided_group(rank: int, num_ranks: int, world) -> None:
    """World 4 with the EP group [1, 3]; ranks 0 and 2 do something else meanwhile: Buffers on their
    own group [0, 2], started later, so that the two groups' Buffers come and go at different times."""
    odd, even = make_group([1, 3]), make_group([0, 2])
    if rank % 2:
        run_on_group(odd, seed=20)
    else:
        time.sleep(0.5)
        run_on_group(even, seed=30)


def idle_rank(rank: int, num_ranks: int, world) -> None:
    """World 3: ranks 0 and 1 form the EP group (made by them alone); rank 2 builds nothing and enters
    no collective until the end. A Buffer asked for on a rank outside its group says so."""
    group = dist.new_group([0, 1], use_local_synchronization=True)  # None on rank 2
    if rank < 2:
        run_on_group(group, seed=40, strategies=("default",))
    else:
        with pytest.raises(ValueError, match="group must be a .*ProcessGroup this rank .*belongs to"):
            deep_ep.Buffer(group)


def overlapping_groups(rank: int, num_ranks: int, world) -> None:
    """World 3: rank 0 is in two EP groups, [0, 1] then [0, 2]; ranks 1 and 2 in one each. The members
    of a group hold different numbers of process groups when they build its Buffer."""
    first, second = make_group([0, 1]), make_group([0, 2])
    if rank in (0, 1):
        run_on_group(first, seed=50, strategies=("default",))
    if rank in (0, 2):
        run_on_group(second, seed=60, strategies=("default",))


def without_named_groups(rank: int, num_ranks: int, world) -> None:
    """The fallback for a torch without the internal group constructor: new_group with
    use_local_synchronization, on the disjoint groups [0, 1] and [2, 3]."""
    groups.torch_group_helper = lambda: None
    pair = [make_group([0, 1]), make_group([2, 3])][rank // 2]
    run_on_group(pair, seed=70, strategies=("default",))


@pytest.mark.parametrize(
    "scenario,num_ranks",
    [(disjoint_groups, 4), (strided_group, 4), (idle_rank, 3), (overlapping_groups, 3), (without_named_groups, 4)],
    ids=["disjoint", "strided", "idle", "overlapping", "fallback"],
)
def test_buffer_on_subgroup(scenario, num_ranks: int) -> None:
    # A Buffer that waited for a rank outside its group would time out after DEEP_EP_TIMEOUT_S.
    spawn_ranks(scenario, num_ranks, env={"DEEP_EP_TIMEOUT_S": "30"})
    assert not leaked_segments()
