"""Routing math: who sends which row where. Every transport consumes these
results; none re-derives them.

Received layout (DeepEP-Ascend's expanded layout): on rank `d`, one row per
(token, local expert of d) selection, grouped by local expert, then by source
rank, then by source token; each expert's block padded with zero rows to a
multiple of `alignment`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

import deep_ep_cpp

from .ops import native_ok


@dataclass
class SelectionCounts:
    """What one pass over a topk_idx [T, K] gives (`count_selections`).

    low / high: the smallest and largest id (0, 0 when empty); the counts are only meaningful when
    they lie in [-1, E). per_expert: int32 [E]; per_rank: int32 [R] and in_rank: int32 [T, R]
    (None unless asked for); per_node: int32 [nodes] or None.
    """

    low: int
    high: int
    per_expert: np.ndarray
    per_rank: Optional[np.ndarray] = None
    in_rank: Optional[np.ndarray] = None
    per_node: Optional[np.ndarray] = None
    host: Optional[torch.Tensor] = None  # the counted topk_idx: contiguous, on the host

    def layout(self) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
        """The counts as get_dispatch_layout returns them: (per_rank, per_node or None, per_expert,
        in_rank), int32 tensors sharing the counted arrays."""
        per_node = None if self.per_node is None else torch.from_numpy(self.per_node)
        per_rank, in_rank = torch.from_numpy(self.per_rank), torch.from_numpy(self.in_rank)
        return per_rank, per_node, torch.from_numpy(self.per_expert), in_rank


def count_selections(
    topk_idx: torch.Tensor,
    num_experts: int,
    num_ranks: int,
    with_ranks: bool = True,
    rank_to_node: Optional[torch.Tensor] = None,
) -> SelectionCounts:
    """The id range and the layout counts of a contiguous CPU int64 topk_idx [T, K], in one native
    call (`dispatch_layout` defines the counts), as numpy int32 arrays (callers wrap what they hand
    out: a conversion costs about a microsecond). rank_to_node: int64 [R] for per-node counts, or None."""

    tokens, topk = topk_idx.shape
    nodes = None if rank_to_node is None else rank_to_node.to(torch.int64).numpy()
    low, high, per_expert, per_rank, in_rank, per_node = deep_ep_cpp.count_layout(
        topk_idx.data_ptr(), tokens, topk, num_experts, num_ranks, with_ranks, nodes
    )
    return SelectionCounts(low, high, per_expert, per_rank, in_rank, per_node, topk_idx)


def dispatch_layout(
    topk_idx: torch.Tensor,
    num_experts: int,
    num_ranks: int,
    rank_to_node: Optional[torch.Tensor] = None,
    device_path: bool = False,
):
    """Counts for `get_dispatch_layout`.

    Args:
        topk_idx: int64 [T, K], values in [-1, E).
        rank_to_node: int64 [R], the node of every rank, or None for one node.
        device_path: torch ops even for a CPU topk_idx (see ops.native_ok).
    Returns:
        num_tokens_per_rank int32 [R], num_tokens_per_node int32 [num_nodes] or None,
        num_tokens_per_expert int32 [E], is_token_in_rank int32 [T, R].
    """
    multi_node = rank_to_node is not None and int(rank_to_node.max()) > 0
    if native_ok(topk_idx, device_path):
        counts = count_selections(
            topk_idx.contiguous(), num_experts, num_ranks, rank_to_node=rank_to_node if multi_node else None
        )
        return counts.layout()
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
    if multi_node:
        num_nodes = int(rank_to_node.max()) + 1
        in_node = torch.zeros(topk_idx.shape[0], num_nodes, dtype=torch.int32, device=topk_idx.device)
        in_node.index_add_(1, rank_to_node.to(topk_idx.device), is_token_in_rank)
        num_tokens_per_node = (in_node > 0).sum(0, dtype=torch.int32)
    return num_tokens_per_rank, num_tokens_per_node, num_tokens_per_expert, is_token_in_rank


def expert_major_entries(topk_idx: torch.Tensor, expert_begin: int, expert_end: int):
    """The top-k entries of `topk_idx` [T, K] whose expert lies in [expert_begin, expert_end),
    ordered by expert then token: exactly the order in which their rows are laid out
    on the receiving rank. Returns (token, k, expert, index within the expert's group),
    int64 [n] each."""

    topk_idx = topk_idx.contiguous()
    entries = deep_ep_cpp.expert_major_entries(
        topk_idx.cpu().numpy().reshape(-1), topk_idx.shape[0], topk_idx.shape[1], expert_begin, expert_end
    )
    return tuple(torch.from_numpy(e) for e in entries)


def summarize_topk(topk_idx: torch.Tensor) -> Tuple[int, int]:
    """(smallest id, largest id) of int64 [T, K], in one native pass on a host copy. A row may name
    an expert more than once (each selection is routed on its own, as DeepEP-Ascend does)."""

    host = topk_idx.cpu().contiguous()
    return deep_ep_cpp.summarize_topk(host.numpy().reshape(-1), host.shape[0], host.shape[1])


def positions_in_groups(group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """For `group` sorted ascending, the index of every element inside its group."""
    counts = torch.bincount(group, minlength=num_groups)
    first = torch.cumsum(counts, 0) - counts
    return torch.arange(group.numel(), device=group.device) - first[group]


@dataclass
class RoutingPlan:
    """Everything one dispatch decides, from all ranks' per-expert token counts. Host bookkeeping:
    the arrays the native kernels read are numpy arrays (torch-op consumers wrap them with
    torch.from_numpy, which shares the memory); block_start and handle_arrays, which go into handles
    and into the pull by address, are tensors.

    tokens_per_expert_all: int64 [R, E], rows each source rank sends to each expert.
    block_start: int64 [R, L, R], row where block (local expert l, source s) starts on rank d.
    rows_per_rank: int64 [R], received rows (with alignment padding) on every rank.
    recv_counts: int64 [L, R], real rows this rank receives per (local expert, source).
    expert_rows: list of L ints, this rank's rows per local expert (with alignment padding).
    dest_rank / dest_row: int64 [T, K], where each of this rank's selections lands (-1 if none).
    num_real_rows: the rows this rank receives without padding (the sum of recv_counts).
    holder: int32 [T, K], dest_rank for the native kernels (one node: the holder's local index).
    peer_rows: int64 [n], this rank's received rows from other ranks, ascending (one node: the
        rows local peers read in combine).
    handle_arrays: the int32 routing arrays of this rank's intranode handle: rank_prefix_matrix
        [R, R] (entry [i][j]: rows rank j receives from ranks <= i), block starts [R, L]
        (block_start[rank] transposed), the inclusive prefix sum of expert_rows [L], and recv_counts [L, R].
    """

    num_ranks: int
    rank: int
    num_experts: int
    tokens_per_expert_all: np.ndarray
    block_start: torch.Tensor
    rows_per_rank: np.ndarray
    recv_counts: np.ndarray
    expert_rows: list
    dest_rank: np.ndarray
    dest_row: np.ndarray
    num_real_rows: int
    holder: np.ndarray
    peer_rows: np.ndarray
    handle_arrays: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def num_recv_rows(self) -> int:
        return int(self.rows_per_rank[self.rank])

    def rows_by_source(self) -> torch.Tensor:
        """Received-layout rows of this rank, ordered by (source, local expert, token):
        the order in which a source sends them (int64 [real rows])."""
        start = self.block_start[self.rank].t().reshape(-1)  # [R * L], source-major
        count = torch.from_numpy(self.recv_counts).t().reshape(-1)
        block = torch.repeat_interleave(torch.arange(count.numel()), count)
        return start[block] + positions_in_groups(block, count.numel())

    def destinations(self, topk_rows: torch.Tensor, origin_rank: np.ndarray):
        """Holder rank and row (int64 [n, K], -1 for no expert) of every selection of rows from
        several sources: `topk_rows` int64 [n, K], each source's rows in token order; origin_rank
        int64 [n]. Exact for holders that receive all of a source's rows (a forwarder's node, or
        every holder for a source's own tokens)."""

        topk_rows = topk_rows.contiguous()
        dest_rank, dest_row = deep_ep_cpp.selection_destinations(
            topk_rows.numpy(),
            topk_rows.shape[0],
            topk_rows.shape[1],
            self.num_experts,
            self.experts_per_rank,
            self.block_start.numpy(),
            origin_rank,
            self.num_ranks,
        )
        return torch.from_numpy(dest_rank), torch.from_numpy(dest_row)


def plan_routing(
    topk_idx: torch.Tensor, tokens_per_expert_all: np.ndarray, rank: int, alignment: int = 1
) -> RoutingPlan:
    """Builds the RoutingPlan of this rank.

    Args:
        topk_idx: contiguous CPU int64 [T, K] of this rank.
        tokens_per_expert_all: numpy int64 [R, E], `num_tokens_per_expert` of every rank.
        alignment: each expert block is padded to a multiple of it.
    """

    num_ranks, num_experts = tokens_per_expert_all.shape
    counts = np.ascontiguousarray(tokens_per_expert_all)
    padded, block_start, rows_per_rank, recv_counts, dest_rank, dest_row, holder, peer_rows, handle, real_rows = (
        deep_ep_cpp.plan_routing(
            counts, num_ranks, num_experts, alignment, rank, topk_idx.data_ptr(), topk_idx.shape[0], topk_idx.shape[1]
        )
    )
    return RoutingPlan(
        num_ranks=num_ranks,
        rank=rank,
        num_experts=num_experts,
        tokens_per_expert_all=counts,
        block_start=torch.from_numpy(block_start),
        rows_per_rank=rows_per_rank,
        recv_counts=recv_counts,
        expert_rows=padded[rank].tolist(),
        dest_rank=dest_rank,
        dest_row=dest_row,
        num_real_rows=real_rows,
        holder=holder,
        peer_rows=peer_rows,
        handle_arrays=(
            torch.from_numpy(handle[0]),
            torch.from_numpy(handle[1]),
            torch.from_numpy(handle[2]),
            torch.from_numpy(handle[3]),
        ),
    )


def localize_topk_idx_(
    topk_idx: torch.Tensor, rank: int, experts_per_rank: int, device_path: bool = False
) -> torch.Tensor:
    """In place on a contiguous int64 tensor: global expert ids -> this rank's local ids
    [0, L); other experts and -1 become -1. (Native on CPU; torch ops on other devices, or with
    `device_path`.)"""
    if not native_ok(topk_idx, device_path):
        local = topk_idx - rank * experts_per_rank
        return topk_idx.copy_(torch.where((local >= 0) & (local < experts_per_rank), local, -1))

    deep_ep_cpp.localize_experts(topk_idx.numpy(), rank * experts_per_rank, experts_per_rank)
    return topk_idx


# ---- low-latency mode --------------------------------------------------------------------------------
# A receiver keeps fixed slots per (local expert l, source rank s): the rows source s sends to expert l
# sit in slots 0, 1, ... in the source's token order. The packed layout (recv_x) is expert-major:
# block (l, s) occupies rows [layout_range[l * R + s] - count, layout_range[l * R + s]), which equals
# normal mode's received layout without padding.


def low_latency_slots(topk_idx: torch.Tensor, num_experts: int, num_slots: Optional[int] = None):
    """Which slot every selection of this rank fills.

    Args:
        topk_idx: int64 [T, K] in [-1, E), contiguous CPU. A row may name an expert more than once:
            every (t, k) selection takes its own slot.
        num_slots: the slots per (expert, source rank) (Nmax), or None for no limit.
    Returns:
        slot int64 [T, K]: selections before (t, k), in (token, k) order, of expert topk_idx[t, k]
        (-1 where it is -1); counts int64 [E]: selections of each expert by this rank.
    Raises ValueError for ids outside [-1, E), or for an expert selected more than num_slots times
    (possible only with repeated experts: T <= Nmax otherwise).
    """

    slot, counts = deep_ep_cpp.expert_slots(topk_idx.numpy(), topk_idx.shape[0], topk_idx.shape[1], num_experts)
    counts = torch.from_numpy(counts)
    if num_slots is not None and counts.numel() and int(counts.max()) > num_slots:
        expert = int(counts.argmax())
        raise ValueError(
            f"topk_idx selects expert {expert} {int(counts[expert])} times (repeats in a row count "
            f"once each); low-latency mode holds at most num_max_dispatch_tokens_per_rank="
            f"{num_slots} selections of one expert per rank"
        )
    return torch.from_numpy(slot).view(topk_idx.shape), counts


def low_latency_recv_layout(counts: np.ndarray, layout_range: np.ndarray, recv_count: np.ndarray) -> np.ndarray:
    """The packed layout on a receiver, from the rows every source sends to each local expert.
    numpy arrays (views of torch tensors or of shared memory): a few microseconds less per call.

    Args:
        counts: int64 [R, L], rows source s sends to local expert l.
        layout_range: int64 [L * R] output: inclusive prefix of the rows of blocks (l, s), l-major.
        recv_count: int64 [L] output: rows per local expert.
    Returns: int64 [L * R], the rows of every block, l-major.
    """
    block_rows = np.ascontiguousarray(counts.T).reshape(-1)
    np.cumsum(block_rows, out=layout_range)
    np.sum(counts, axis=0, out=recv_count)
    return block_rows


def low_latency_arrival_rows(counts: torch.Tensor, layout_range: torch.Tensor) -> torch.Tensor:
    """Packed row of every row that arrives source by source, each source's rows by local expert
    then slot (the collective transport's order). counts int64 [R, L]; returns int64 [counts.sum()]."""
    num_ranks, experts_per_rank = counts.shape
    block_rows = counts.reshape(-1)  # source-major
    start = (layout_range - counts.t().reshape(-1)).view(experts_per_rank, num_ranks).t().reshape(-1)
    block = torch.repeat_interleave(torch.arange(block_rows.numel()), block_rows)
    return start[block] + positions_in_groups(block, block_rows.numel())


# ---- shared-expert ranks (low-latency mode and fused_deep_moe) ------------------------------------------
@dataclass(frozen=True)
class SharedExperts:
    """Expert placement of low-latency mode, with S = MOE_SHARED_EXPERT_RANK_NUM shared-expert ranks
    (as CANN's MC2 dispatch / combine operators place them, with one shared expert):

    - ranks [0, S) each hold a copy of the shared expert (one local expert); ranks [S, R) hold the
      E routed experts, L = E / (R - S) each: routed expert e lives on rank S + e // L;
    - every token of source rank s also goes to shared rank s % S, into the source's block, and
      that rank's output for it is added to the token's combine result with weight 1, after the
      routed terms;
    - S = 0: the plain placement (L = E / R, rank r holds [r * L, (r + 1) * L)).

    The transports see a uniform "virtual" placement instead: R * L experts, rank r owning
    [r * L, (r + 1) * L); routed expert e is virtual expert S * L + e; the shared copy on rank j
    is virtual expert j * L, named by one extra top-k column (index K), whose weight is 1.
    """

    num_experts: int  # E, routed experts (the num_experts argument)
    num_ranks: int
    num_shared_ranks: int

    @staticmethod
    def check(num_experts: object, num_ranks: int, num_shared_ranks: int) -> "SharedExperts":
        """ValueError naming num_experts / MOE_SHARED_EXPERT_RANK_NUM unless the placement exists."""
        if not 0 <= num_shared_ranks < num_ranks:
            raise ValueError(
                f"MOE_SHARED_EXPERT_RANK_NUM must be in [0, {num_ranks}) for {num_ranks} ranks "
                f"(at least one rank holds routed experts), got {num_shared_ranks}"
            )
        routed = num_ranks - num_shared_ranks
        if (
            isinstance(num_experts, bool)
            or not isinstance(num_experts, int)
            or num_experts <= 0
            or num_experts % routed
        ):
            holders = (
                f"{routed} routed-expert ranks (R - MOE_SHARED_EXPERT_RANK_NUM = {num_ranks} - {num_shared_ranks})"
                if num_shared_ranks
                else f"{num_ranks} ranks"
            )
            raise ValueError(f"num_experts must be a positive multiple of the {holders}, got {num_experts!r}")
        return SharedExperts(num_experts, num_ranks, num_shared_ranks)

    @property
    def experts_per_rank(self) -> int:
        """L, the routed experts of a routed rank (and the virtual experts of every rank)."""
        return self.num_experts // (self.num_ranks - self.num_shared_ranks)

    @property
    def virtual_experts(self) -> int:
        return self.num_ranks * self.experts_per_rank

    def is_shared(self, rank: int) -> bool:
        return rank < self.num_shared_ranks

    def local_experts(self, rank: int) -> int:
        """Experts rank holds: 1 on a shared rank, L on a routed one."""
        return 1 if self.is_shared(rank) else self.experts_per_rank

    def describe_local(self, rank: int) -> str:
        """Where local_experts(rank) comes from, for error messages."""
        if self.is_shared(rank):
            return f"L = 1: rank {rank} holds the shared expert (MOE_SHARED_EXPERT_RANK_NUM={self.num_shared_ranks})"
        ranks = self.num_ranks - self.num_shared_ranks
        return f"L = num_experts / routed ranks = {self.num_experts} / {ranks}"

    def packed_rows(self, rank: int, num_max_tokens: int, num_topk: int) -> int:
        """Rows of rank's packed low-latency output: Nmax * R * min(K, L) on a routed rank (CANN's
        A); a shared rank receives the tokens of ceil(R / S) sources at most."""
        if self.is_shared(rank):
            return num_max_tokens * -(-self.num_ranks // self.num_shared_ranks)
        return num_max_tokens * self.num_ranks * min(num_topk, self.experts_per_rank)

    def virtual_topk(self, topk_idx: torch.Tensor, rank: int) -> torch.Tensor:
        """int64 [T, K + 1]: topk_idx [T, K] (routed ids, -1 kept) in virtual ids, plus the column of
        this source's shared copy. ValueError for ids outside [-1, E)."""
        if topk_idx.numel():
            low, high = summarize_topk(topk_idx)
            if low < -1 or high >= self.num_experts:
                raise ValueError(f"topk_idx values must lie in [-1, {self.num_experts}), got values in [{low}, {high}]")
        shift = self.num_shared_ranks * self.experts_per_rank
        routed = torch.where(topk_idx >= 0, topk_idx + shift, topk_idx)
        shared = torch.full(
            (topk_idx.shape[0], 1), rank % self.num_shared_ranks * self.experts_per_rank, dtype=topk_idx.dtype
        )
        return torch.cat([routed, shared], 1).contiguous()

    @staticmethod
    def virtual_weights(topk_weights: torch.Tensor) -> torch.Tensor:
        """float32 [T, K + 1]: the shared expert's output is added with weight 1."""
        return torch.cat([topk_weights, topk_weights.new_ones(topk_weights.shape[0], 1)], 1)


def hint_experts(num_experts: int, num_ranks: int, num_shared_ranks: int) -> int:
    """The virtual expert count low-latency buffers are sized for, from the num_experts a caller
    passes to the size hint: with shared-expert ranks R * ceil(E / (R - S)), which also covers
    callers that count the shared expert in E (as DeepEP-Ascend's scripts do)."""
    if not num_shared_ranks:
        return num_experts
    return num_ranks * -(-num_experts // (num_ranks - num_shared_ranks))
