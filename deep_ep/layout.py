"""Routing math: who sends which row where. Every transport consumes these
results; none re-derives them.

Received layout (DeepEP-Ascend's expanded layout): on rank `d`, one row per
(token, local expert of d) selection, grouped by local expert, then by source
rank, then by source token; each expert's block padded with zero rows to a
multiple of `alignment`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int,
                    rank_to_node: Optional[torch.Tensor] = None):
    """Counts for `get_dispatch_layout`.

    Args:
        topk_idx: int64 [T, K], values in [-1, E).
        rank_to_node: int64 [R], the node of every rank, or None for one node.
    Returns:
        num_tokens_per_rank int32 [R], num_tokens_per_node int32 [num_nodes] or None,
        num_tokens_per_expert int32 [E], is_token_in_rank int32 [T, R].
    """
    experts_per_rank = num_experts // num_ranks
    valid = topk_idx >= 0
    # Invalid entries land in an extra column that is dropped.
    dest = torch.where(valid, topk_idx // experts_per_rank, torch.full_like(topk_idx, num_ranks))
    in_rank = torch.zeros(topk_idx.shape[0], num_ranks + 1, dtype=torch.int32, device=topk_idx.device)
    in_rank.scatter_(1, dest, 1)
    is_token_in_rank = in_rank[:, :num_ranks].contiguous()
    num_tokens_per_rank = is_token_in_rank.sum(0, dtype=torch.int32)
    num_tokens_per_expert = torch.bincount(topk_idx[valid], minlength=num_experts).to(torch.int32)
    num_tokens_per_node = None
    if rank_to_node is not None and int(rank_to_node.max()) > 0:
        num_nodes = int(rank_to_node.max()) + 1
        in_node = torch.zeros(topk_idx.shape[0], num_nodes, dtype=torch.int32, device=topk_idx.device)
        in_node.index_add_(1, rank_to_node.to(topk_idx.device), is_token_in_rank)
        num_tokens_per_node = (in_node > 0).sum(0, dtype=torch.int32)
    return num_tokens_per_rank, num_tokens_per_node, num_tokens_per_expert, is_token_in_rank


def expert_major_entries(topk_idx: torch.Tensor, expert_begin: int, expert_end: int):
    """The top-k entries of `topk_idx` [T, K] whose expert lies in [expert_begin, expert_end),
    ordered by expert then token: exactly the order in which their rows are laid out
    on the receiving rank. Returns (token, k, expert), int64 [n] each."""
    selected = (topk_idx >= expert_begin) & (topk_idx < expert_end)
    token, k = selected.nonzero(as_tuple=True)
    expert = topk_idx[token, k]
    order = torch.argsort(expert * max(1, topk_idx.shape[0]) + token)
    return token[order], k[order], expert[order]


def positions_in_groups(group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """For `group` sorted ascending, the index of every element inside its group."""
    counts = torch.bincount(group, minlength=num_groups)
    first = torch.cumsum(counts, 0) - counts
    return torch.arange(group.numel(), device=group.device) - first[group]


@dataclass
class RoutingPlan:
    """Everything one dispatch decides, from all ranks' per-expert token counts.

    tokens_per_expert_all: int64 [R, E], rows each source rank sends to each expert.
    block_start: int64 [R, L, R], row where block (local expert l, source s) starts on rank d.
    rows_per_rank: int64 [R], received rows (with alignment padding) on every rank.
    recv_counts: int64 [L, R], real rows this rank receives per (local expert, source).
    expert_rows: list of L ints, this rank's rows per local expert (padded).
    dest_rank / dest_row: int64 [T, K], where each of this rank's selections lands (-1 if none).
    """

    num_ranks: int
    rank: int
    num_experts: int
    tokens_per_expert_all: torch.Tensor
    block_start: torch.Tensor
    rows_per_rank: torch.Tensor
    recv_counts: torch.Tensor
    expert_rows: list
    dest_rank: torch.Tensor
    dest_row: torch.Tensor

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def num_recv_rows(self) -> int:
        return int(self.rows_per_rank[self.rank])

    def rank_prefix_matrix(self) -> torch.Tensor:
        """int32 [R, R]: entry [i][j] = rows rank j received from ranks <= i."""
        rows_sent = self.tokens_per_expert_all.view(self.num_ranks, self.num_ranks, -1).sum(2)  # [src, dst]
        return torch.cumsum(rows_sent, 0).to(torch.int32)

    def rows_by_source(self) -> torch.Tensor:
        """Received-layout rows of this rank, ordered by (source, local expert, token):
        the order in which a source sends them (int64 [real rows])."""
        start = self.block_start[self.rank].t().reshape(-1)  # [R * L], source-major
        count = self.recv_counts.t().reshape(-1)
        block = torch.repeat_interleave(torch.arange(count.numel()), count)
        return start[block] + positions_in_groups(block, count.numel())

    def receive_positions(self, source: int, expert: torch.Tensor, already: torch.Tensor) -> torch.Tensor:
        """Rows for a source's selections `expert` (global ids, sorted by expert then token)
        of this rank, given `already` int64 [L] rows of that source placed before them."""
        local = expert - self.rank * self.experts_per_rank
        within = positions_in_groups(local, self.experts_per_rank)
        return self.block_start[self.rank, local, source] + already[local] + within


def plan_routing(topk_idx: torch.Tensor, tokens_per_expert_all: torch.Tensor, rank: int,
                 alignment: int = 1) -> RoutingPlan:
    """Builds the RoutingPlan of this rank.

    Args:
        topk_idx: int64 [T, K] of this rank.
        tokens_per_expert_all: int64 [R, E], `num_tokens_per_expert` of every rank.
        alignment: each expert block is padded to a multiple of it.
    """
    num_ranks, num_experts = tokens_per_expert_all.shape
    experts_per_rank = num_experts // num_ranks
    counts = tokens_per_expert_all.view(num_ranks, num_ranks, experts_per_rank).permute(1, 2, 0)  # [dst, l, src]
    real = counts.sum(2)
    padded = (real + alignment - 1) // alignment * alignment
    expert_start = torch.cumsum(padded, 1) - padded
    block_start = expert_start.unsqueeze(2) + torch.cumsum(counts, 2) - counts
    dest_rank = torch.full_like(topk_idx, -1)
    dest_row = torch.full_like(topk_idx, -1)
    token, k, expert = expert_major_entries(topk_idx, 0, num_experts)
    if token.numel():
        within = positions_in_groups(expert, num_experts)
        dst, local = expert // experts_per_rank, expert % experts_per_rank
        dest_rank[token, k] = dst
        dest_row[token, k] = block_start[dst, local, rank] + within
    return RoutingPlan(num_ranks=num_ranks, rank=rank, num_experts=num_experts,
                       tokens_per_expert_all=tokens_per_expert_all, block_start=block_start,
                       rows_per_rank=padded.sum(1), recv_counts=counts[rank].clone(),
                       expert_rows=padded[rank].tolist(), dest_rank=dest_rank, dest_row=dest_row)


def local_topk_idx(topk_idx: torch.Tensor, rank: int, experts_per_rank: int) -> torch.Tensor:
    """Maps global expert ids to this rank's local ids [0, L); other experts become -1."""
    local = topk_idx - rank * experts_per_rank
    return torch.where((topk_idx >= 0) & (local >= 0) & (local < experts_per_rank), local,
                       torch.full_like(local, -1))
