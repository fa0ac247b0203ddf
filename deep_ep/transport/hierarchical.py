"""Hierarchical transport across nodes: DeepEP's internode scheme (A2 "hierarchy").

A token crosses the network once per destination node: it goes to that node's
*forwarder* for its source (the rank with the same local index, modulo the node's
size), which publishes it in its node's shared memory, where the ranks holding its
experts pull it exactly as they pull local tokens. Combine runs the other way: the
forwarder reduces the token's rows of its node (float64 partial sums, k ascending)
and sends one row back per (token, node); the owner adds its own node's rows and the
partials. The network is torch.distributed (gloo on CPU): all_to_all_single.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .. import ops
from .collective import exchange_rows
from .fields import as_byte_rows

# Bytes this process sent to ranks of other nodes, by phase (tests and the benchmark read it).
traffic: Dict[str, int] = {"dispatch_bytes": 0, "dispatch_rows": 0, "combine_bytes": 0, "combine_rows": 0}


@dataclass
class Topology:
    """Which ranks share a node. rank_to_node: int64 [R]."""

    rank: int
    rank_to_node: torch.Tensor

    def __post_init__(self) -> None:
        self.num_ranks = self.rank_to_node.numel()
        self.num_nodes = int(self.rank_to_node.max()) + 1
        self.node_ranks = [(self.rank_to_node == n).nonzero().flatten().tolist() for n in range(self.num_nodes)]
        self.node = int(self.rank_to_node[self.rank])
        self.local_ranks = self.node_ranks[self.node]
        self.local_index = self.local_ranks.index(self.rank)

    def forwarder(self, node: int) -> int:
        """The rank of `node` that receives this rank's tokens (same local index where it exists)."""
        ranks = self.node_ranks[node]
        return ranks[self.local_index % len(ranks)]


@dataclass
class Forwarding:
    """One dispatch's network routes, kept for combine and cached dispatch.

    send_token: int64 [S], this rank's tokens sent to other nodes, by forwarder rank then token.
    send_counts / recv_counts: rows sent to / forwarded from every rank.
    origin_rank / origin_token: int64 [F], source rank and token of every row forwarded to this rank.
    """

    send_token: torch.Tensor
    send_counts: List[int]
    recv_counts: List[int]
    origin_rank: torch.Tensor
    origin_token: torch.Tensor

    def expect(self, recv_counts: List[int]) -> None:
        """Sets the rows every rank forwards to this one (each rank's send_counts entry for it)."""
        self.recv_counts = list(recv_counts)
        self.origin_rank = torch.repeat_interleave(torch.arange(len(recv_counts)), torch.tensor(recv_counts))


def plan_forwarding(topology: Topology, topk_idx: torch.Tensor, experts_per_rank: int) -> Forwarding:
    """Which of this rank's tokens cross to which node (one row per (token, node)). What the other
    ranks forward here is known only once their send_counts are: `Forwarding.expect` sets it (the
    transport swaps the counts along with the call's metadata, in the same network exchange)."""
    valid = topk_idx >= 0
    node_of = torch.where(
        valid, topology.rank_to_node[topk_idx.clamp_min(0) // experts_per_rank], torch.full_like(topk_idx, -1)
    )
    send_counts = [0] * topology.num_ranks
    parts = []
    for node in sorted(range(topology.num_nodes), key=topology.forwarder):
        if node == topology.node:
            continue
        tokens = (node_of == node).any(dim=1).nonzero().flatten()
        send_counts[topology.forwarder(node)] = tokens.numel()
        parts.append(tokens)
    send_token = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
    nothing = torch.empty(0, dtype=torch.int64)
    return Forwarding(send_token, send_counts, [0] * topology.num_ranks, nothing, nothing)


def forward_rows(
    group: dist.ProcessGroup, forwarding: Forwarding, fields: List[torch.Tensor], phase: str = "dispatch"
) -> List[torch.Tensor]:
    """Sends this rank's crossing token rows (uint8 fields [T, b_i]) to the forwarders; returns the
    rows forwarded to this rank, field by field ([F, b_i]), in (source rank, token) order. `phase`
    ("dispatch" or "combine") names the operation in the traffic counters and in errors."""
    send = torch.cat([f.index_select(0, forwarding.send_token) for f in fields], dim=1)
    traffic[f"{phase}_bytes"] += send.numel()
    traffic[f"{phase}_rows"] += send.shape[0]
    recv = exchange_rows(group, send, forwarding.send_counts, forwarding.recv_counts, phase)
    out, offset = [], 0
    for f in fields:
        out.append(recv[:, offset : offset + f.shape[1]].clone(memory_format=torch.contiguous_format))
        offset += f.shape[1]
    return out


def return_partials(group: dist.ProcessGroup, forwarding: Forwarding, partials: torch.Tensor) -> torch.Tensor:
    """Sends float64 partial sums [F, H] of the forwarded rows back to their owners; returns the
    partials of this rank's crossing tokens [S, H], in `send_token` order."""
    send = as_byte_rows(partials)
    traffic["combine_bytes"] += send.numel()
    traffic["combine_rows"] += send.shape[0]
    recv = exchange_rows(group, send, forwarding.recv_counts, forwarding.send_counts, "combine")
    return recv.view(torch.float64).view(-1, partials.shape[1])


def partial_columns(topology: Topology, forwarding: Forwarding, num_tokens: int):
    """Where each token's partial sums sit in the rows `return_partials` gave back:
    (present int32, row int64), [T, nodes - 1], one column per other node in node order;
    present is 0 where the token has a partial from that node and -1 elsewhere."""
    others = [n for n in range(topology.num_nodes) if n != topology.node]
    present = torch.full((num_tokens, len(others)), -1, dtype=torch.int32)
    row = torch.full((num_tokens, len(others)), -1, dtype=torch.int64)
    offset = 0
    for dest, count in enumerate(forwarding.send_counts):
        if count:
            column = others.index(int(topology.rank_to_node[dest]))
            tokens = forwarding.send_token[offset : offset + count]
            present[tokens, column] = 0
            row[tokens, column] = torch.arange(offset, offset + count)
            offset += count
    return present, row


def to_local(dest_rank: torch.Tensor, dest_row: torch.Tensor, topology: Topology):
    """Global holder ranks -> local indices in this node (int32, -1 for holders elsewhere), rows
    kept where the holder is local."""
    local_index = torch.full((topology.num_ranks + 1,), -1, dtype=torch.int64)
    local_index[torch.tensor(topology.local_ranks)] = torch.arange(len(topology.local_ranks))
    holder = local_index[torch.where(dest_rank >= 0, dest_rank, torch.full_like(dest_rank, topology.num_ranks))]
    return holder.to(torch.int32), torch.where(holder >= 0, dest_row, torch.full_like(dest_row, -1))


@dataclass
class HierarchicalReduction:
    """The reduction of the shared-memory combine, across nodes. Its selection table holds this
    rank's tokens first ([T, K], this node's holders only), then the forwarded rows ([F, K]):
    it sums the forwarded rows into float64 partials, returns them to their owners, and sums
    this rank's tokens from its node's rows, then the partials it got back (node order)."""

    group: dist.ProcessGroup
    topology: Topology
    forwarding: Forwarding
    out: torch.Tensor  # [T, H], written
    x_dtype: torch.dtype
    own_weights: torch.Tensor  # float32 [T, K]
    forwarded_weights: torch.Tensor  # float32 [F, K]
    biases: Sequence[torch.Tensor]
    threads: Optional[int]  # of the native kernels, the runtime's (None: utils.num_threads())

    def run_rows(self, sources: List[int], source_rows: List[int], src_rank: np.ndarray, src_row: np.ndarray) -> None:
        """As ops.Reduction.run_rows: `sources` are the addresses of the node's holders' rows."""
        num_tokens, hidden = self.out.shape
        dtypes = [self.x_dtype] * len(sources)
        partials = torch.empty(src_rank.shape[0] - num_tokens, hidden, dtype=torch.float64)
        forwarded = src_rank[num_tokens:], src_row[num_tokens:]
        ops.native_reduce(partials, sources, source_rows, dtypes, *forwarded, self.forwarded_weights, [], self.threads)
        back = return_partials(self.group, self.forwarding, partials).contiguous()
        present, row = partial_columns(self.topology, self.forwarding, num_tokens)
        present = torch.where(present >= 0, present + len(sources), present)
        ops.native_reduce(
            self.out,
            sources + [back.data_ptr()],
            source_rows + [back.shape[0]],
            dtypes + [torch.float64],
            np.concatenate([src_rank[:num_tokens], present.numpy()], axis=1),
            np.concatenate([src_row[:num_tokens], row.numpy()], axis=1),
            torch.cat([self.own_weights, torch.ones(num_tokens, present.shape[1])], dim=1),
            self.biases,
            self.threads,
        )
