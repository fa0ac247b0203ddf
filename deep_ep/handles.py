"""DeepEP-Ascend's handles, with our own bookkeeping beside them.

Callers unpack handles by position (`(..., topk_idx, topk_weights) = handle`, `handle[7]`,
`handle[4]`) or, for the "alltoall" normal strategy, by key (`handle["topk_weights"]`). So the
handles are exactly upstream's tuples / dict; what combine needs (the DispatchState or
LowLatencyState) rides along as the attribute `state`, and `owner` names the runtime that made
it. Upstream reads its handles only by position or key, so code may pass a tuple, list or dict
rebuilt from one (`tuple(handle)`, `list(handle)`, `dict(handle)`): one item of every handle, a
tensor made for that handle alone, keeps a HandleOrigin that finds the state again, and a rebuilt
handle whose items are the original ones (tensors the same objects, other items equal) stands for
it. One with an item replaced is a TypeError naming the item.

Normal mode, one node (DefaultNormalCommStrategy), 8 entries:
    rank_prefix_matrix int32 [R, R], channel_prefix_matrix int32 [R, L] (first row of block
    (source, local expert)), recv_channel_prefix_matrix int32 [L] (inclusive prefix of the rows per
    local expert), recv_src_idx int32 [N] (source token of every received row, -1 for padding),
    is_token_in_rank int32 [T, R], send_head int32 [L, R] (real rows per (local expert, source)),
    topk_idx int64 [T, K], topk_weights float32 [T, K].
Normal mode, several nodes (DefaultNormalCommStrategy), 9 entries:
    recv_src_idx int32 [N], is_token_in_rank int32 [T, R], send_head int32 [L, R], topk_idx,
    topk_weights, offset_inner int32 [R, L] (as channel_prefix_matrix), offset_outer int32
    [T, nodes] (index of the token among those this rank sends to each node, -1 if none),
    count_outer int32 [nodes] (tokens sent to each node), expand_scales float32 [N] (the routing
    weight of every received row's selection, 0 for padding).
Normal mode, AlltoAllNormalCommStrategy: a dict with upstream's keys, see `alltoall_handle`.
Low-latency mode, 7 entries: src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden,
    num_experts, packed_recv_count, expand_scales (None, as upstream's default strategy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Tuple, Type, Union

import numpy as np
import torch

from . import layout
from .transport import collective


class NormalHandle(tuple):
    """The tuple handle of dispatch; `state` is its DispatchState, `owner` the runtime's id. With
    `anchor` (the index of a tensor made for this handle alone), a tuple / list rebuilt from its
    items stands for it (see _remember)."""

    state: Any
    owner: int

    def __new__(
        cls, items: Iterable, state: Any = None, owner: int = -1, anchor: Optional[int] = None
    ) -> "NormalHandle":
        handle = super().__new__(cls, items)
        handle.state, handle.owner = state, owner
        if anchor is not None:
            _remember(handle, anchor)
        return handle

    def __getnewargs__(self) -> Tuple:
        return tuple(self), self.state, self.owner


class LowLatencyHandle(NormalHandle):
    """The tuple handle of low_latency_dispatch; `state` is its LowLatencyState."""


class AlltoAllHandle(dict):
    """The dict handle of the "alltoall" normal strategy; `state` is its DispatchState; `anchor` as in
    NormalHandle (a key)."""

    state: Any
    owner: int

    def __init__(self, items: dict, state: Any = None, owner: int = -1, anchor: Optional[str] = None) -> None:
        super().__init__(items)
        self.state, self.owner = state, owner
        if anchor is not None:
            _remember(self, anchor)


@dataclass
class HandleOrigin:
    """What a rebuilt handle is checked against: kept by the handle's anchor, one of its tensors that
    nothing else of ours references (so no reference cycle), for as long as that tensor lives."""

    state: Any
    owner: int
    kind: Type
    anchor: Union[int, str]  # the anchor's index (tuple handles) or key (dict handles)
    items: Union[tuple, dict]  # the handle's items, None in the anchor's place


def _remember(handle: Union[NormalHandle, AlltoAllHandle], anchor: Union[int, str]) -> None:
    """Lets a tuple / list / dict rebuilt from `handle` stand for it (see state_of); `anchor` indexes
    an item that is a tensor made for this handle alone."""
    tensor = handle[anchor]
    if isinstance(handle, dict):
        items = dict(handle)
        items[anchor] = None
    else:
        items = handle[:anchor] + (None,) + handle[anchor + 1 :]
    tensor._deep_ep_handle_origin = HandleOrigin(handle.state, handle.owner, type(handle), anchor, items)


def _same_item(given: Any, original: Any) -> bool:
    if isinstance(original, torch.Tensor) or isinstance(given, torch.Tensor):
        return given is original
    return given == original


def _origin_of_rebuilt(handle: Any, kinds: Tuple[Type, ...], what: str) -> Optional[HandleOrigin]:
    """The HandleOrigin of the handle `handle` was rebuilt from (None if it holds no anchor of `kinds`);
    TypeError naming the first item that is not the original's."""
    if isinstance(handle, dict):
        positions = list(handle)
    elif isinstance(handle, (tuple, list)):
        positions = list(range(len(handle)))
    else:
        return None
    for position in positions:
        origin = getattr(handle[position], "_deep_ep_handle_origin", None)
        if origin is None or origin.kind not in kinds or origin.anchor != position:
            continue
        expected = list(origin.items) if isinstance(origin.items, dict) else list(range(len(origin.items)))
        if positions != expected:
            raise TypeError(
                f"handle: a {type(handle).__name__} rebuilt from a handle of {what} must have the handle's "
                f"{'keys' if isinstance(handle, dict) else 'length'} ({len(expected)} items), got {positions}"
            )
        for other in positions:
            if other != position and not _same_item(handle[other], origin.items[other]):
                raise TypeError(
                    f"handle: item {other!r} of a {type(handle).__name__} rebuilt from a handle of {what} is not "
                    "the handle's own; pass the handle's items unchanged"
                )
        return origin
    return None


def state_of(handle: Any, kinds: Tuple[Type, ...], owner: int, what: str) -> Any:
    """The state of a handle this runtime made (or of one rebuilt from it, see _remember), or
    TypeError / ValueError saying what is wrong."""
    if not isinstance(handle, kinds):
        handle = _origin_of_rebuilt(handle, kinds, what) or handle
    if getattr(handle, "state", None) is None:
        expected = " or ".join(k.__name__ for k in kinds)
        raise TypeError(
            f"handle must be the handle returned by {what} of this Buffer ({expected}), or a tuple / list / "
            f"dict of its items, got {type(handle).__name__}"
        )
    if handle.owner != owner:
        raise ValueError(f"handle was returned by {what} of another Buffer; use it with that Buffer")
    return handle.state


def _is_token_in_rank(state: Any) -> torch.Tensor:
    """int32 [T, R] on the host: 1 where the token selects an expert of the rank (dispatch's checking
    pass counted it; a state made without it counts it here)."""
    if state.is_token_in_rank is not None:
        return state.is_token_in_rank
    plan = state.plan
    return layout.dispatch_layout(state.topk_idx.cpu(), plan.num_experts, plan.num_ranks)[3]


def _int32(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous int32 copy of a CPU integer tensor (numpy: microseconds less than torch's .to)."""
    return torch.from_numpy(np.ascontiguousarray(tensor.numpy(), dtype=np.int32))


def intranode_handle(state: Any, owner: int) -> NormalHandle:
    """Upstream's 8-entry intranode handle of a DispatchState."""
    rank_prefix, block_starts, expert_prefix, recv_counts = state.plan.handle_arrays
    return NormalHandle(
        (
            rank_prefix,
            block_starts,
            expert_prefix,
            _int32(state.recv_src_idx),
            _is_token_in_rank(state),
            recv_counts,
            state.topk_idx,
            state.topk_weights,
        ),
        state,
        owner,
        anchor=3,  # the int32 copy of recv_src_idx is the handle's own
    )


def internode_handle(
    state: Any,
    rank: int,
    rank_to_node: torch.Tensor,
    recv_topk_weights: torch.Tensor,
    owner: int,
) -> NormalHandle:
    """Upstream's 9-entry internode handle of a DispatchState (several nodes).

    recv_topk_weights: dispatch's float32 [N, K] output (every received row's source-token weights)."""
    plan = state.plan
    in_rank = _is_token_in_rank(state)
    num_nodes = int(rank_to_node.max()) + 1
    in_node = torch.zeros(in_rank.shape[0], num_nodes, dtype=torch.int32).index_add_(1, rank_to_node, in_rank) > 0
    offset_outer = torch.where(in_node, torch.cumsum(in_node.to(torch.int32), 0) - 1, -1).to(torch.int32)
    # Every received row is one (token, k) selection: its own column's weight (a token naming an
    # expert twice arrives twice, each row with its selection's weight).
    real = state.recv_src_k >= 0
    expand_scales = recv_topk_weights.cpu().gather(1, state.recv_src_k.clamp(min=0).view(-1, 1)).flatten() * real
    return NormalHandle(
        (
            state.recv_src_idx.to(torch.int32),
            in_rank,
            torch.from_numpy(plan.recv_counts.astype(np.int32)),
            state.topk_idx,
            state.topk_weights,
            plan.block_start[rank].t().contiguous().to(torch.int32),
            offset_outer,
            in_node.sum(0, dtype=torch.int32),
            expand_scales,
        ),
        state,
        owner,
        anchor=0,  # recv_src_idx is int64: its int32 copy is the handle's own
    )


def alltoall_handle(state: Any, rank: int, hidden_shape: torch.Size, owner: int) -> AlltoAllHandle:
    """Upstream's dict handle of the "alltoall" normal strategy:
    input_splits (rows sent to every rank), output_splits (rows received from every rank),
    topk_weights float32 [T, K], reversed_local_mapping int32 [T * K] (position of selection t * K + k
    among the rows sent, -1 for none), reversed_global_mapping int32 [real rows] (received-layout row
    of every arriving row, in arrival order; None with one local expert, as upstream),
    hidden_shape / hidden_shape_before_permute (x's shape), num_local_experts."""
    plan = state.plan
    experts_per_rank = plan.experts_per_rank
    order = collective.send_order(torch.from_numpy(plan.dest_rank), torch.from_numpy(plan.dest_row))
    position = torch.full((plan.dest_rank.size,), -1, dtype=torch.int32)
    position[order] = torch.arange(order.numel(), dtype=torch.int32)
    sent = plan.tokens_per_expert_all[rank].reshape(plan.num_ranks, experts_per_rank).sum(1)
    return AlltoAllHandle(
        {
            "input_splits": sent.tolist(),
            "output_splits": plan.recv_counts.sum(0).tolist(),
            "topk_weights": state.topk_weights,
            "reversed_local_mapping": position,
            "reversed_global_mapping": state.rows_by_source.to(torch.int32) if experts_per_rank > 1 else None,
            "hidden_shape": hidden_shape,
            "hidden_shape_before_permute": hidden_shape,
            "num_local_experts": experts_per_rank,
        },
        state,
        owner,
        anchor="reversed_local_mapping",
    )
