"""Normal mode's one-barrier protocol on shared memory (docs/normal_data_path.md): a rank that is done
with a call returns at once, and the next call must not overwrite what a slower peer still reads.

    python -m pytest tests/python/deepep/test_normal_data_path.py

Rank 1 reads late (its dispatch pull, its combine reduction and its cached-dispatch pull wait first),
so rank 0 runs ahead into the next call; every result is checked against the pure-torch reference,
which a rank reading a peer's next call's rows would fail. Also: the native layout pass equals the
torch one, ids included that it must refuse; the native routing plan equals its definition written
out in Python; the native publish and gather of one rank, and their argument checks.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import gather_objects, make_inputs  # noqa: E402

import deep_ep  # noqa: E402
import deep_ep_cpp  # noqa: E402
from deep_ep import layout, ops  # noqa: E402
from deep_ep.reference import reference_combine, reference_dispatch  # noqa: E402
from deep_ep.strategies import normal_strategy  # noqa: E402
from deep_ep.testing import spawn_ranks  # noqa: E402

NO_FIELDS = np.zeros(0, np.int64)  # gather without agreed fields

HIDDEN, EXPERTS_PER_RANK, TOPK, TOKENS = 64, 3, 3, 12
LATE_S = 0.3  # how late rank 1 reads


def read_late(cls, name: str) -> None:
    """Makes `cls.name` sleep LATE_S before doing its work (rank 1 only)."""
    original = getattr(cls, name)

    def late(self, *args, **kwargs):
        time.sleep(LATE_S)
        return original(self, *args, **kwargs)

    setattr(cls, name, late)


def slow_reader(rank: int, num_ranks: int, group) -> None:
    if rank == 1:
        read_late(normal_strategy.SelectionReceiver, "pull")
        read_late(normal_strategy.CachedReceiver, "pull")
        read_late(ops.Reduction, "run_rows")
    num_experts = EXPERTS_PER_RANK * num_ranks
    buffer = deep_ep.Buffer(group, num_nvl_bytes=1 << 20)
    stats = torch.zeros(num_ranks, dtype=torch.int32)
    for call in range(3):  # every call's rows differ: a stale or early read shows
        inputs = make_inputs(rank, TOKENS + call, HIDDEN, num_experts, TOPK, num_ranks, seed=call + 1)
        everyone = gather_objects(inputs, group)
        xs, idxs, weights = [i.x for i in everyone], [i.topk_idx for i in everyone], [i.topk_weights for i in everyone]
        ref = reference_dispatch(xs, idxs, weights, num_experts, rank)
        _, _, per_expert, _, _ = buffer.get_dispatch_layout(inputs.topk_idx, num_experts)
        recv_x, _, recv_w, _, handle, _ = buffer.dispatch(
            inputs.x, num_tokens_per_expert=per_expert, topk_idx=inputs.topk_idx, topk_weights=inputs.topk_weights
        )
        assert torch.equal(recv_x, ref["x"]) and torch.equal(recv_w, ref["weights"])
        assert torch.equal(handle.state.recv_src_idx, ref["src_idx"])
        y = (recv_x.float() * (call + 2)).to(torch.bfloat16)
        combined = buffer.combine(y, handle, combine_send_cost_stats=stats)[0]
        selection = (inputs.x.float().unsqueeze(1) * (call + 2)).to(torch.bfloat16).expand(-1, TOPK, -1)
        expected = reference_combine(selection, inputs.topk_idx, inputs.topk_weights)
        assert torch.allclose(combined.double(), expected, rtol=2e-2, atol=2e-2)
        cached = buffer.dispatch((inputs.x.float() - 1).to(torch.bfloat16), handle=handle)[0]
        assert torch.equal(cached, (ref["x"].float() - 1).to(torch.bfloat16))
    if rank == 0:
        # Rank 0's rows were handed over only once rank 1 had read them, at least LATE_S later each time.
        assert int(stats[1]) >= 3 * LATE_S * 0.9e6, stats.tolist()
    buffer.destroy()


def test_slow_reader_never_sees_the_next_call():
    spawn_ranks(slow_reader, 2)


@pytest.mark.parametrize("num_ranks,nodes", [(2, 1), (4, 2), (6, 3)])
def test_native_layout_equals_torch(num_ranks: int, nodes: int):
    generator = torch.Generator().manual_seed(num_ranks)
    num_experts = 4 * num_ranks
    rank_to_node = torch.arange(num_ranks) // (num_ranks // nodes)
    for tokens in (0, 1, 37):
        topk_idx = torch.randint(-1, num_experts, (tokens, 5), generator=generator)
        native = layout.dispatch_layout(topk_idx, num_experts, num_ranks, rank_to_node)
        torch_ops = layout.dispatch_layout(topk_idx, num_experts, num_ranks, rank_to_node, device_path=True)
        for mine, theirs in zip(native, torch_ops):
            assert (mine is None and theirs is None) or (mine.dtype == theirs.dtype and torch.equal(mine, theirs))
        counts = layout.count_selections(topk_idx, num_experts, num_ranks)
        assert (counts.low, counts.high) == ((int(topk_idx.min()), int(topk_idx.max())) if tokens else (0, 0))
    bad = layout.count_selections(torch.tensor([[0, num_experts]]), num_experts, num_ranks)
    assert (bad.low, bad.high) == (0, num_experts) and not bool(bad.per_expert.any())


@pytest.mark.parametrize("num_ranks,alignment", [(1, 1), (3, 1), (4, 8)])
def test_native_plan_matches_its_definition(num_ranks: int, alignment: int):
    """layout.plan_routing (one native call) against the received layout's definition, written out
    in Python: received counts, every selection's holder and row, the rows of other sources, and
    the intranode handle's arrays."""
    generator = torch.Generator().manual_seed(num_ranks * 10 + alignment)
    local, num_experts = EXPERTS_PER_RANK, EXPERTS_PER_RANK * num_ranks
    for rank in range(num_ranks):
        topk_idx = torch.randint(-1, num_experts, (TOKENS, TOPK), generator=generator)
        counts = torch.randint(0, 5, (num_ranks, num_experts), generator=generator)
        counts[rank] = torch.bincount(topk_idx[topk_idx >= 0], minlength=num_experts)
        plan = layout.plan_routing(topk_idx, counts.numpy(), rank, alignment)
        received = counts[:, rank * local : (rank + 1) * local].t()  # [L, R]
        assert plan.recv_counts.tolist() == received.tolist() and plan.num_real_rows == int(received.sum())
        padded = (received.sum(1) + alignment - 1) // alignment * alignment
        assert plan.expert_rows == padded.tolist()
        start = torch.cat([torch.zeros(1, dtype=torch.int64), padded.cumsum(0)[:-1]])  # first row per expert
        for expert in range(local):
            first = start[expert] + torch.cat([torch.zeros(1, dtype=torch.int64), received[expert].cumsum(0)[:-1]])
            assert torch.equal(plan.block_start[rank, expert], first)
        # Every selection: its expert's rank holds it, at its block's next row, in token order.
        dest_rank, dest_row = torch.from_numpy(plan.dest_rank), torch.from_numpy(plan.dest_row)
        assert plan.holder.dtype == np.int32 and plan.holder.tolist() == plan.dest_rank.tolist()
        for expert in range(num_experts):
            picked = topk_idx == expert
            owner, within = divmod(expert, local)
            assert bool((dest_rank[picked] == owner).all())
            block = int(plan.block_start[owner, within, rank])
            assert dest_row[picked].tolist() == list(range(block, block + int(picked.sum())))
        assert bool((dest_rank[topk_idx < 0] == -1).all()) and bool((dest_row[topk_idx < 0] == -1).all())
        peers = [
            int(plan.block_start[rank, expert, source]) + j
            for expert in range(local)
            for source in range(num_ranks)
            if source != rank
            for j in range(int(received[expert, source]))
        ]
        assert plan.peer_rows.tolist() == peers
        rank_prefix, channel_prefix, expert_prefix, recv_counts = plan.handle_arrays
        per_destination = counts.view(num_ranks, num_ranks, local).sum(2)  # [source, destination]
        assert torch.equal(rank_prefix, per_destination.cumsum(0).to(torch.int32))
        assert torch.equal(channel_prefix, plan.block_start[rank].t().to(torch.int32))
        assert torch.equal(expert_prefix, padded.cumsum(0).to(torch.int32))
        assert torch.equal(recv_counts, received.to(torch.int32))


def test_native_publish_and_gather_one_rank():
    """NodeSync.publish writes the status word and the meta and makes the copies; gather returns every
    local rank's meta after the barrier; bad arguments are refused before anything is written."""
    counter, meta = np.zeros(8, np.int64), np.zeros(6, np.int64)
    source, target = np.arange(16, dtype=np.uint8), np.zeros(16, np.uint8)
    sync = deep_ep_cpp.NodeSync([counter.ctypes.data], 0, [0], [os.getpid()])
    words = np.array([5, 6, 7], np.int64)
    copies = [(target.ctypes.data, source.ctypes.data, 16)]
    sync.publish([], [], 0, meta.ctypes.data, 9, words, copies, 1, 1.0, "a test")
    assert meta[:4].tolist() == [9, 5, 6, 7] and target.tolist() == source.tolist()
    gathered, outcome = sync.gather([meta.ctypes.data], 4, NO_FIELDS, 1.0, "a test")
    assert gathered.tolist() == [[9, 5, 6, 7]] and outcome == 1  # status 9: this rank could not reserve
    sync.publish([], [], 0, meta.ctypes.data, None, np.zeros(0, np.int64), [], 1, 1.0, "a test")  # rows only
    assert meta[:4].tolist() == [9, 5, 6, 7]
    with pytest.raises(ValueError, match="owner index out of range"):
        sync.publish([counter.ctypes.data], [1], 0, meta.ctypes.data, 1, words, [], 1, 1.0, "a test")
    with pytest.raises(ValueError, match="differ in length"):
        sync.publish([counter.ctypes.data], [], 0, meta.ctypes.data, 1, words, [], 1, 1.0, "a test")
    with pytest.raises(ValueError, match="one meta address per local rank"):
        sync.gather([meta.ctypes.data, meta.ctypes.data], 4, NO_FIELDS, 1.0, "a test")
    with pytest.raises(ValueError, match="agreed field index out of range"):
        sync.gather([meta.ctypes.data], 4, np.array([3], np.int64), 1.0, "a test")
    assert meta[:4].tolist() == [9, 5, 6, 7]


def test_region_layout_and_pull_windows():
    """region_layout starts every region at a multiple of REGION_ALIGN; pull_selections finds a
    window's fields where region_layout puts them and refuses a window holding more rows than its
    capacity before anything is copied."""
    align = deep_ep_cpp.REGION_ALIGN
    assert deep_ep_cpp.region_layout([3, 8, 4], 5) == ([0, align, 2 * align], 3 * align)
    assert deep_ep_cpp.region_layout([align], 2) == ([0], 2 * align)
    # One source rank, 2 tokens, top-1 to experts 1 and 0 of 2 (both this rank's), rows of 4 bytes.
    rows = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.uint8)
    topk = np.array([[1], [0]], np.int64)
    widths = [4, 8]
    offsets, size = deep_ep_cpp.region_layout(widths, 3)  # a capacity of 3 rows
    area = np.zeros(size, np.uint8)
    area[offsets[0] : offsets[0] + 8] = rows.reshape(-1)
    area[offsets[1] : offsets[1] + 16] = topk.view(np.uint8).reshape(-1)
    start, taken = np.array([[0], [1]], np.int64), np.zeros((2, 1), np.int64)
    out_x, out_topk, sources = np.zeros((2, 4), np.uint8), np.zeros((2, 1), np.int64), np.full((3, 2), -1, np.int64)
    outs = [(out_x.ctypes.data, 4), (out_topk.ctypes.data, 8)]
    tables = (sources[0].ctypes.data, sources[1].ctypes.data, sources[2].ctypes.data)

    def pull(window_rows: int) -> int:
        windows = [(area.ctypes.data, 3, window_rows, 0, 0)]
        return deep_ep_cpp.pull_selections(
            windows, widths, 1, 0, 2, 1, start.ctypes.data, taken.ctypes.data, 1, -1, -1, outs, 2, *tables, True
        )

    with pytest.raises(ValueError, match="exceed its capacity"):
        pull(4)
    assert not out_x.any() and not taken.any()
    assert pull(2) == 2
    assert out_x.tolist() == [[5, 6, 7, 8], [1, 2, 3, 4]]  # expert 0's row first
    assert out_topk.reshape(-1).tolist() == [0, 1] and sources.tolist() == [[0, 0], [1, 0], [0, 0]]


def test_native_gather_outcomes_two_ranks():
    """NodeSync.gather's outcome, for two local ranks (two threads of this process, each with its own
    NodeSync over the same barrier counters): 0 when the statuses are 0 and the agreed fields equal,
    1 when a status is not 0, 2 when an agreed field differs; other fields may differ."""
    counters = np.zeros(16, np.int64)  # one barrier word per rank, a cache line apart
    addresses = [counters.ctypes.data, counters.ctypes.data + 64]
    syncs = [deep_ep_cpp.NodeSync(addresses, index, [0, 1], [os.getpid()] * 2) for index in range(2)]
    metas = [np.zeros(4, np.int64), np.zeros(4, np.int64)]
    meta_addresses = [m.ctypes.data for m in metas]
    agreed = np.array([0, 2], np.int64)  # words 1 and 3

    def outcomes(first: list, second: list) -> list:
        metas[0][:], metas[1][:] = first, second
        results = [None, None]

        def gather(index: int) -> None:
            results[index] = syncs[index].gather(meta_addresses, 4, agreed, 5.0, "a test")

        peer = threading.Thread(target=gather, args=(1,))
        peer.start()
        gather(0)
        peer.join()
        assert results[0][0].tolist() == results[1][0].tolist() == [first, second]
        return [results[0][1], results[1][1]]

    assert outcomes([0, 7, 1, 3], [0, 7, 2, 3]) == [0, 0]  # word 2 is not agreed on
    assert outcomes([0, 7, 1, 3], [5, 7, 1, 3]) == [1, 1]
    assert outcomes([0, 7, 1, 3], [0, 7, 1, 4]) == [2, 2]
    assert outcomes([4, 7, 1, 3], [0, 8, 1, 3]) == [1, 1]  # the status comes first
