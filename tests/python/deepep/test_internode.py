"""Internode (hierarchical) operation, with nodes simulated on one host by DEEP_EP_RANKS_PER_NODE:
each simulated node maps only its own ranks' shared memory, and traffic between nodes goes
through torch.distributed. Results must equal the single-node run bit for bit, and match the
reference; each (token, node) pair must cross the network once.

    python tests/python/deepep/test_internode.py --num-processes 4 --ranks-per-node 2
    python -m pytest tests/python/deepep/test_internode.py
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import gather_objects, leaked_segments, make_inputs  # noqa: E402
from normal_cases import NODE_ENV, Case, check_dispatch_and_combine, run_all_calls  # noqa: E402

import deep_ep  # noqa: E402
from deep_ep.testing import spawn_ranks  # noqa: E402
from deep_ep.transport import hierarchical  # noqa: E402


def same_as_one_node(rank: int, num_ranks: int, group, ranks_per_node: int) -> None:
    """The hierarchical path gives the single-node bits, and each (token, node) crosses once."""
    experts = 4 * num_ranks
    inputs = make_inputs(rank, [45, 0, 70, 9][rank % 4], 128, experts, 6, num_ranks, seed=11)
    results = {}
    for label, env in (("one node", None), ("nodes", str(ranks_per_node))):
        if env is None:
            os.environ.pop(NODE_ENV, None)
        else:
            os.environ[NODE_ENV] = env
        buffer = deep_ep.Buffer(group, num_nvl_bytes=1 << 20)
        assert buffer.get_num_rdma_ranks() == (1 if env is None else -(-num_ranks // ranks_per_node))
        before = dict(hierarchical.traffic)
        results[label] = {q: run_all_calls(buffer, inputs, experts, q) for q in ("bf16", "int8")}
        sent = {k: hierarchical.traffic[k] - before[k] for k in before}
        if env is not None:
            check_network_traffic(rank, num_ranks, ranks_per_node, gather_objects(inputs, group), experts, sent)
        buffer.destroy()
    os.environ.pop(NODE_ENV, None)
    for quant in ("bf16", "int8"):
        for index, (a, b) in enumerate(zip(results["one node"][quant], results["nodes"][quant])):
            assert torch.equal(a, b), f"rank {rank}, {quant}: result {index} differs from the one-node run"


def check_network_traffic(rank: int, num_ranks: int, ranks_per_node: int, everyone, experts: int, sent: dict) -> None:
    """Bytes this rank sent to other nodes: exactly one row per (token, other node) in each
    dispatch (fewer than one per (token, other rank) for these inputs), and in combine one
    float64 partial row per (token, node) it forwarded."""
    local_experts = experts // num_ranks
    nodes = -(-num_ranks // ranks_per_node)
    node_ranks = [list(range(n * ranks_per_node, min(num_ranks, (n + 1) * ranks_per_node))) for n in range(nodes)]

    def owners(inputs):
        return torch.where(inputs.topk_idx >= 0, inputs.topk_idx // local_experts, -1)

    def tokens_touching(inputs, node: int) -> int:
        return int(torch.isin(owners(inputs), torch.tensor(node_ranks[node])).any(1).sum())

    my_node = rank // ranks_per_node
    mine = everyone[rank]
    token_node_pairs = sum(tokens_touching(mine, n) for n in range(nodes) if n != my_node)
    token_rank_pairs = sum(
        int((owners(mine) == r).any(1).sum()) for r in range(num_ranks) if r // ranks_per_node != my_node
    )
    # Rows other nodes' ranks forwarded to this rank: it is their forwarder into this node.
    forwarded = sum(
        tokens_touching(everyone[s], my_node)
        for s in range(num_ranks)
        if s // ranks_per_node != my_node
        and node_ranks[my_node][(s % ranks_per_node) % len(node_ranks[my_node])] == rank
    )
    hidden, topk = mine.x.shape[1], mine.topk_idx.shape[1]
    meta_bytes = 8 * topk + 4 * topk + 8  # top-k ids, weights and the token index travel with each row
    bf16_row, int8_row = 2 * hidden + meta_bytes, hidden + 4 + meta_bytes
    # Per quant mode a fresh dispatch and a cached one (bf16, re-sending the routing).
    assert sent["dispatch_rows"] == 4 * token_node_pairs, (sent, token_node_pairs)
    assert sent["dispatch_bytes"] == token_node_pairs * (3 * bf16_row + int8_row), (sent, token_node_pairs)
    if token_node_pairs and any(len(node_ranks[n]) > 1 for n in range(nodes) if n != my_node):
        assert token_node_pairs < token_rank_pairs
    # Per quant mode two combines return partials; the second also forwards its new weights.
    assert sent["combine_rows"] == 4 * forwarded + 2 * token_node_pairs, (sent, forwarded)
    assert sent["combine_bytes"] == 4 * forwarded * 8 * hidden + 2 * token_node_pairs * 4 * topk, sent


def run_reference_cases(rank: int, num_ranks: int, group, ranks_per_node: int) -> None:
    """The intranode test cases, checked against the reference, across simulated nodes."""
    os.environ[NODE_ENV] = str(ranks_per_node)
    base = Case(tokens=[37, 0, 64, 5], experts=4 * num_ranks, topk=4)
    for case in (
        base,
        replace(base, quant="int8", hidden=200),
        replace(base, alignment=4, worst=500 * num_ranks),
        replace(base, nvl_bytes=4096, hidden=128, seed=4),
        replace(base, pattern="repeat", seed=6),
    ):
        buffer = deep_ep.Buffer(group, num_nvl_bytes=case.nvl_bytes)
        try:
            check_dispatch_and_combine(rank, num_ranks, buffer, case, group)
        finally:
            buffer.destroy()


def low_latency_same_as_one_node(rank: int, num_ranks: int, group, ranks_per_node: int) -> None:
    experts = 2 * num_ranks
    inputs = make_inputs(rank, [30, 0, 17][rank % 3], 128, experts, 3, num_ranks, seed=5)
    results = []
    for env in (None, str(ranks_per_node)):
        os.environ.pop(NODE_ENV, None) if env is None else os.environ.__setitem__(NODE_ENV, env)
        hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(32, 128, num_ranks, experts)
        buffer = deep_ep.Buffer(group, num_rdma_bytes=hint, low_latency_mode=True)
        recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(
            inputs.x, inputs.topk_idx, 32, experts, use_fp8=False
        )
        y = (recv_x.float() * 0.5).to(torch.bfloat16)
        combined = buffer.low_latency_combine(y, inputs.topk_idx, inputs.topk_weights, handle)[0]
        valid = int(recv_count.sum())
        results.append([recv_x[:valid].clone(), recv_count.clone(), combined])
        buffer.destroy()
    os.environ.pop(NODE_ENV, None)
    for a, b in zip(*results):
        assert torch.equal(a, b)


CONFIGS = [(2, 1), (4, 2), (4, 1), (3, 2), (8, 4), (8, 2)]


@pytest.mark.parametrize("num_ranks,ranks_per_node", CONFIGS)
def test_same_as_one_node(num_ranks: int, ranks_per_node: int) -> None:
    spawn_ranks(same_as_one_node, num_ranks, ranks_per_node)
    assert not leaked_segments()


@pytest.mark.parametrize("num_ranks,ranks_per_node", [(4, 2), (3, 2)])
def test_against_reference(num_ranks: int, ranks_per_node: int) -> None:
    spawn_ranks(run_reference_cases, num_ranks, ranks_per_node)
    assert not leaked_segments()


def test_low_latency_across_nodes() -> None:
    spawn_ranks(low_latency_same_as_one_node, 4, 2)
    assert not leaked_segments()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-processes", type=int, default=4)
    parser.add_argument("--ranks-per-node", type=int, default=2)
    args = parser.parse_args()
    spawn_ranks(same_as_one_node, args.num_processes, args.ranks_per_node)
    spawn_ranks(run_reference_cases, args.num_processes, args.ranks_per_node)
    print(
        f"internode checks passed: {args.num_processes} ranks, {args.ranks_per_node} per node. "
        f"For timings and inter-node bytes: python -m deep_ep.bench --num-processes {args.num_processes} "
        f"--ranks-per-node {args.ranks_per_node}"
    )


if __name__ == "__main__":
    main()
