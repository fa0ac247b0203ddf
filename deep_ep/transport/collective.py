"""Collective transport: torch.distributed all_to_all_single over the Buffer's group
(gloo on CPU, hccl on NPU). Used for strategy "alltoall", between nodes, and on NPU.

Rows travel in the order the RoutingPlan gives: a sender's selections sorted by
(destination rank, destination row), which is the (source, expert, token) order
the receiver expects from it.
"""
from __future__ import annotations

from typing import Callable, List, Sequence

import torch
import torch.distributed as dist



def all_gather_meta(group: dist.ProcessGroup, meta: torch.Tensor) -> torch.Tensor:
    """int64 [R, m]: every rank's meta vector (all ranks pass the same m)."""
    parts = [torch.empty_like(meta) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, meta, group=group)
    return torch.stack(parts)


def send_order(dest_rank: torch.Tensor, dest_row: torch.Tensor) -> torch.Tensor:
    """Flat indices into [T*K] of the valid selections, sorted by (destination rank, row)."""
    flat_rank, flat_row = dest_rank.reshape(-1), dest_row.reshape(-1)
    valid = (flat_rank >= 0).nonzero().flatten()
    span = int(flat_row.max()) + 1 if flat_row.numel() else 1
    return valid[torch.argsort(flat_rank[valid] * span + flat_row[valid])]


def exchange_rows(group: dist.ProcessGroup, send: torch.Tensor, send_counts: Sequence[int],
                  recv_counts: Sequence[int]) -> torch.Tensor:
    """all_to_all_single of uint8 rows [P, b] with uneven splits; returns [sum(recv_counts), b]."""
    recv = torch.empty(int(sum(recv_counts)), send.shape[1], dtype=send.dtype, device=send.device)
    dist.all_to_all_single(recv, send, output_split_sizes=list(map(int, recv_counts)),
                           input_split_sizes=list(map(int, send_counts)), group=group)
    return recv


def dispatch_rows(group: dist.ProcessGroup, num_ranks: int, topk: int, fields_in: List[torch.Tensor],
                  fields_out: List[torch.Tensor], dest_rank: torch.Tensor, dest_row: torch.Tensor,
                  recv_counts: Sequence[int], recv_rows: torch.Tensor) -> torch.Tensor:
    """Sends every selected token row to its destination and places received rows.

    Args:
        fields_in / fields_out: uint8 [T, b_i] / [N, b_i] row fields.
        dest_rank / dest_row: int64 [T, K] from the RoutingPlan.
        recv_counts: rows arriving from every source rank.
        recv_rows: int64 [sum(recv_counts)], output row of each arriving row, in arrival order.
    Returns: int64 [sum(recv_counts)], the source token index of each arriving row.
    """
    order = send_order(dest_rank, dest_row)
    token = order // topk
    send_counts = torch.bincount(dest_rank.reshape(-1)[order], minlength=num_ranks).tolist()
    payload = fields_in + [token.view(-1, 1).view(torch.uint8) if token.numel() else
                           torch.empty(0, 8, dtype=torch.uint8)]
    send = torch.cat([f.index_select(0, token) if i < len(fields_in) else f for i, f in enumerate(payload)], dim=1)
    recv = exchange_rows(group, send, send_counts, recv_counts)
    offset = 0
    for out in fields_out:
        width = out.shape[1]
        out.index_copy_(0, recv_rows, recv[:, offset: offset + width])
        offset += width
    return recv[:, offset:].contiguous().view(torch.int64).flatten()


def combine_rows(group: dist.ProcessGroup, num_ranks: int, x_rows: torch.Tensor, rows_by_source: torch.Tensor,
                 recv_counts: Sequence[int], dest_rank: torch.Tensor, dest_row: torch.Tensor,
                 reduce: Callable[[List[torch.Tensor], torch.Tensor, torch.Tensor], None]) -> None:
    """Returns expert outputs to the token owners and reduces them there.

    Args:
        x_rows: uint8 [N, b] expert outputs of this rank in its received layout.
        rows_by_source / recv_counts: as at dispatch (what came from where).
        reduce: as in the shared-memory transport.
    """
    order = send_order(dest_rank, dest_row)
    back_counts = torch.bincount(dest_rank.reshape(-1)[order], minlength=num_ranks).tolist()
    recv = exchange_rows(group, x_rows.index_select(0, rows_by_source), recv_counts, back_counts)
    position = torch.full((dest_rank.numel(),), -1, dtype=torch.int64)
    position[order] = torch.arange(order.numel())
    position = position.view_as(dest_rank)
    reduce([recv], torch.where(position >= 0, 0, -1).to(torch.int32), position)
