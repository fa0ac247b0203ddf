"""Normal-mode strategies and the transports they move rows with.

- DefaultNormalCommStrategy ("default"): shared memory inside a node (SharedMemoryRows); across
  nodes the hierarchical transport (HierarchicalRows); on NPU, or with DEEP_EP_FORCE_TORCH_OPS=1,
  all_to_all_single (CollectiveRows). Handles: upstream's 8-tuple on one node, 9-tuple across nodes.
- AlltoAllNormalCommStrategy ("alltoall"): all_to_all_single for every rank (CollectiveRows).
  Handle: upstream's dict.

The transport is chosen once, when the strategy is built. The checks, the routing plan and the
output tensors are the runtime's (deep_ep/normal.py); a transport only moves rows. Cost statistics
(int32 [R], microseconds, accumulated): dispatch, per source rank, the time from this rank's rows
being ready until that rank's rows were there; combine, per destination rank, the time from this
rank's expert outputs being ready until that rank had taken them. Ranks reached through one
all_to_all_single share its duration (they arrive together).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, List, Optional, Union

import torch
import torch.distributed as dist

from .. import handles
from ..ep_strategy import NormalEPCommStrategy, register_normal_strategy
from ..normal import OP_DISPATCH, DispatchState, InternodeState
from ..transport import collective, hierarchical, shm
from ..transport.fields import as_byte_rows
from ..utils import EventOverlap

if TYPE_CHECKING:
    from ..runtime import Runtime


def _add_us(stats: Optional[torch.Tensor], ranks: Union[List[int], torch.Tensor], ns: torch.Tensor) -> None:
    """stats[ranks] += ns / 1000, rounded down (int32 microseconds; stats may live on the device)."""
    if stats is not None:
        index = torch.as_tensor(ranks, dtype=torch.int64)
        delta = torch.zeros(stats.numel(), dtype=torch.int32)
        delta.index_add_(0, index, torch.div(ns, 1000, rounding_mode="floor").to(torch.int32).expand(index.numel()))
        stats.add_(delta.to(stats.device))


class CollectiveRows:
    """torch.distributed all_to_all_single over the runtime's data group (gloo on CPU, HCCL on NPU)."""

    shm = None

    def dispatch(
        self,
        rt: "Runtime",
        meta: torch.Tensor,
        fields: List[torch.Tensor],
        topk_idx: torch.Tensor,
        decide: Callable,
        state_box: dict,
        stats: Optional[torch.Tensor],
    ):
        out_bytes, _ = decide(collective.all_gather_meta(rt.comm, meta, "dispatch"))
        plan = state_box["plan"]
        rows_by_source = plan.rows_by_source()
        start = time.monotonic_ns()
        arrived = collective.dispatch_rows(
            rt.data_comm,
            rt.group_size,
            topk_idx.shape[1],
            fields,
            out_bytes,
            plan.dest_rank,
            plan.dest_row,
            plan.recv_counts.sum(0).tolist(),
            rows_by_source,
        )
        _add_us(stats, list(range(rt.group_size)), torch.tensor(time.monotonic_ns() - start))
        sources = torch.repeat_interleave(torch.arange(rt.group_size), plan.recv_counts.sum(0))
        state_box["src_rank"][rows_by_source] = sources
        state_box["src_idx"][rows_by_source] = arrived
        return None, rows_by_source

    def cached_dispatch(
        self,
        rt: "Runtime",
        state: DispatchState,
        header: torch.Tensor,
        fields: List[torch.Tensor],
        out_bytes: List[torch.Tensor],
        check: Callable,
        stats: Optional[torch.Tensor],
    ) -> None:
        plan = state.plan
        check(collective.all_gather_meta(rt.comm, header, "dispatch (cached)"))
        start = time.monotonic_ns()
        collective.dispatch_rows(
            rt.data_comm,
            rt.group_size,
            state.topk_idx.shape[1],
            fields,
            out_bytes,
            plan.dest_rank,
            plan.dest_row,
            plan.recv_counts.sum(0).tolist(),
            state.rows_by_source,
        )
        _add_us(stats, list(range(rt.group_size)), torch.tensor(time.monotonic_ns() - start))

    def combine(
        self,
        rt: "Runtime",
        state: DispatchState,
        header: torch.Tensor,
        x_rows: torch.Tensor,
        check: Callable,
        reduce: Callable,
        out: torch.Tensor,
        weights: torch.Tensor,
        new_weights: Optional[torch.Tensor],
        biases: List[torch.Tensor],
        stats: Optional[torch.Tensor],
    ) -> None:
        plan = state.plan
        check(collective.all_gather_meta(rt.comm, header, "combine"))
        start = time.monotonic_ns()
        collective.combine_rows(
            rt.data_comm,
            rt.group_size,
            x_rows,
            state.rows_by_source,
            plan.recv_counts.sum(0).tolist(),
            plan.dest_rank,
            plan.dest_row,
            reduce,
        )
        _add_us(stats, list(range(rt.group_size)), torch.tensor(time.monotonic_ns() - start))


class SharedMemoryRows:
    """The shared memory of one node: receivers pull rows straight from the owners' data areas."""

    def __init__(self, node_shm: shm.NodeShm) -> None:
        self.shm = node_shm

    def dispatch(
        self,
        rt: "Runtime",
        meta: torch.Tensor,
        fields: List[torch.Tensor],
        topk_idx: torch.Tensor,
        decide: Callable,
        state_box: dict,
        stats: Optional[torch.Tensor],
    ):
        waits = torch.zeros(self.shm.num_local, dtype=torch.int64) if stats is not None else None
        shm.dispatch_rows(self.shm, meta, fields, decide, "dispatch", waits)
        _add_us(stats, rt.local_ranks, waits if waits is not None else torch.zeros(0))
        return None, None

    def cached_dispatch(
        self,
        rt: "Runtime",
        state: DispatchState,
        header: torch.Tensor,
        fields: List[torch.Tensor],
        out_bytes: List[torch.Tensor],
        check: Callable,
        stats: Optional[torch.Tensor],
    ) -> None:
        real = (state.recv_src_rank >= 0).nonzero().flatten()
        by_source = {r: real[state.recv_src_rank[real] == r] for r in rt.local_ranks}

        def decide(meta_all: torch.Tensor):
            check(meta_all)

            def routes(source: int, regions, begin: int, end: int):
                rows = by_source[rt.local_ranks[source]]
                token = state.recv_src_idx[rows]
                keep = (token >= begin) & (token < end)
                return token[keep], rows[keep]

            return out_bytes, routes

        waits = torch.zeros(self.shm.num_local, dtype=torch.int64) if stats is not None else None
        shm.dispatch_rows(self.shm, header, fields, decide, "dispatch (cached)", waits)
        _add_us(stats, rt.local_ranks, waits if waits is not None else torch.zeros(0))

    def combine(
        self,
        rt: "Runtime",
        state: DispatchState,
        header: torch.Tensor,
        x_rows: torch.Tensor,
        check: Callable,
        reduce: Callable,
        out: torch.Tensor,
        weights: torch.Tensor,
        new_weights: Optional[torch.Tensor],
        biases: List[torch.Tensor],
        stats: Optional[torch.Tensor],
    ) -> None:
        plan = state.plan
        sends = torch.zeros(self.shm.num_local, dtype=torch.int64) if stats is not None else None
        shm.combine_rows(
            self.shm,
            header,
            check,
            x_rows,
            plan.rows_per_rank.tolist(),
            plan.dest_rank,
            plan.dest_row,
            reduce,
            sends=sends,
        )
        _add_us(stats, rt.local_ranks, sends if sends is not None else torch.zeros(0))


class HierarchicalRows(SharedMemoryRows):
    """Several nodes: each (token, node) pair crosses the network once, to the node's forwarder,
    which publishes it in the node's shared memory (deep_ep/transport/hierarchical.py)."""

    def _forwarders(self, rt: "Runtime") -> torch.Tensor:
        """int64 [R]: local index (in this node) of the rank that carries each rank's rows here."""
        topology = rt.topology
        mine = topology.local_ranks
        local = torch.empty(topology.num_ranks, dtype=torch.int64)
        for node_ranks in topology.node_ranks:
            for index, rank in enumerate(node_ranks):
                local[rank] = index % len(mine)
        return local

    def _add_across(
        self, rt: "Runtime", stats: Optional[torch.Tensor], local_ns: torch.Tensor, network_ns: int
    ) -> None:
        """Local ranks: their shared-memory time; other ranks: the network time plus that of the local
        rank that carries their rows."""
        if stats is None:
            return
        local_ns = local_ns + 0
        far = torch.tensor([r not in rt.local_ranks for r in range(rt.group_size)])
        per_rank = local_ns[self._forwarders(rt)] + torch.where(far, network_ns, 0)
        _add_us(stats, list(range(rt.group_size)), per_rank)

    def dispatch(
        self,
        rt: "Runtime",
        meta: torch.Tensor,
        fields: List[torch.Tensor],
        topk_idx: torch.Tensor,
        decide: Callable,
        state_box: dict,
        stats: Optional[torch.Tensor],
    ):
        placement = decide(collective.all_gather_meta(rt.comm, meta, "dispatch"))
        plan = state_box["plan"]
        num_tokens, num_topk = topk_idx.shape
        start = time.monotonic_ns()
        forwarding = hierarchical.plan_forwarding(rt.comm, rt.topology, topk_idx, plan.experts_per_rank)
        tokens = torch.arange(num_tokens)
        arrived = hierarchical.forward_rows(rt.comm, forwarding, fields + [as_byte_rows(tokens)])
        network_ns = time.monotonic_ns() - start
        forwarding.origin_token = arrived[-1].view(torch.int64).flatten()
        published = [torch.cat([own, far]) for own, far in zip(fields, arrived)]
        published.append(as_byte_rows(torch.cat([torch.full_like(tokens, rt.rank), forwarding.origin_rank])))
        published.append(as_byte_rows(torch.cat([tokens, forwarding.origin_token])))
        node_header = torch.tensor([OP_DISPATCH, published[0].shape[0]], dtype=torch.int64)
        waits = torch.zeros(self.shm.num_local, dtype=torch.int64)
        shm.dispatch_rows(self.shm, node_header, published, lambda _: placement, "dispatch", waits)
        self._add_across(rt, stats, waits, network_ns)
        forwarded_topk = arrived[len(fields) - 2].view(torch.int64).view(-1, num_topk)
        # Destinations outside this node come out wrong here (the forwarder holds only the tokens
        # that touch its node) and are dropped by to_local.
        far_rank, far_row = plan.destinations(forwarded_topk, forwarding.origin_rank)
        selection_rank, selection_row = hierarchical.to_local(
            torch.cat([plan.dest_rank, far_rank]), torch.cat([plan.dest_row, far_row]), rt.topology
        )
        forwarded_weights = arrived[len(fields) - 1].view(torch.float32).view(-1, num_topk)
        return InternodeState(forwarding, forwarded_weights, selection_rank, selection_row), None

    def combine(
        self,
        rt: "Runtime",
        state: DispatchState,
        header: torch.Tensor,
        x_rows: torch.Tensor,
        check: Callable,
        reduce: Callable,
        out: torch.Tensor,
        weights: torch.Tensor,
        new_weights: Optional[torch.Tensor],
        biases: List[torch.Tensor],
        stats: Optional[torch.Tensor],
    ) -> None:
        plan = state.plan
        num_topk = weights.shape[1]
        check(collective.all_gather_meta(rt.comm, header, "combine"))
        internode = state.internode
        forwarded_weights = internode.forwarded_weights
        if new_weights is not None:  # the forwarders sum with the owner's new weights
            forwarded_weights = hierarchical.forward_rows(
                rt.comm, internode.forwarding, [as_byte_rows(weights)], "combine"
            )[0].view(torch.float32)
            forwarded_weights = forwarded_weights.view(-1, num_topk)
        reduce = hierarchical.hierarchical_reduce(
            rt.comm, rt.topology, internode.forwarding, out, out.dtype, weights, forwarded_weights, biases
        )
        sends = torch.zeros(self.shm.num_local, dtype=torch.int64)
        shm.combine_rows(
            self.shm,
            header,
            lambda _: None,
            x_rows,
            [int(plan.rows_per_rank[r]) for r in rt.local_ranks],
            internode.selection_rank,
            internode.selection_row,
            reduce,
            sends=sends,
        )
        # A holder's rows are handed over once the local forwarder has read them; it carries them on.
        self._add_across(rt, stats, sends, 0)


class _NormalStrategyBase(NormalEPCommStrategy):
    """What both normal strategies share: the runtime, its checks and the calls into it."""

    transport: Union[CollectiveRows, SharedMemoryRows]

    def __init__(self, runtime: "Runtime", group: dist.ProcessGroup) -> None:
        super().__init__(group)
        self.runtime = runtime

    def get_supported_modes(self) -> List[str]:
        return ["normal"]

    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        return self.runtime.normal.dispatch_layout(topk_idx, num_experts)

    def _state(self, handle, what: str) -> DispatchState:
        state = handles.state_of(handle, self.handle_kinds, self.runtime.runtime_id, "Buffer.dispatch")
        made_by = state.transport
        if type(made_by) is not type(self.transport) or made_by.shm is not self.transport.shm:
            raise ValueError(
                f"{what}: the handle was made by another normal strategy than this Buffer's "
                f"{self.get_name()!r}; use the strategy that dispatched it"
            )
        return state

    def dispatch(
        self,
        x,
        handle=None,
        num_tokens_per_rank=None,
        num_tokens_per_rdma_rank=None,
        is_token_in_rank=None,
        num_tokens_per_expert=None,
        topk_idx=None,
        topk_weights=None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config=None,
        previous_event=None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
        dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None,
        quant_mode: Optional[str] = None,
    ):
        state = None if handle is None else self._state(handle, "dispatch")
        recv_x, recv_topk_idx, recv_topk_weights, counts, new_state, event = self.runtime.normal.dispatch(
            self.transport,
            x,
            state,
            num_tokens_per_rank,
            is_token_in_rank,
            num_tokens_per_expert,
            topk_idx,
            topk_weights,
            expert_alignment,
            num_worst_tokens,
            dispatch_wait_recv_cost_stats,
            quant_mode,
        )
        if new_state is None:  # cached dispatch
            return recv_x, None, None, None, None, event
        shape = (x[0] if isinstance(x, (tuple, list)) else x).shape
        return (
            recv_x,
            recv_topk_idx,
            recv_topk_weights,
            counts,
            self.make_handle(new_state, shape, recv_topk_idx, recv_topk_weights),
            event,
        )

    def combine(
        self,
        x: torch.Tensor,
        handle,
        topk_weights: Optional[torch.Tensor] = None,
        bias=None,
        config=None,
        previous_event=None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
        combine_send_cost_stats: Optional[torch.Tensor] = None,
    ):
        state = self._state(handle, "combine")
        return self.runtime.normal.combine(self.transport, x, state, topk_weights, bias, combine_send_cost_stats)


@register_normal_strategy("default")
class DefaultNormalCommStrategy(_NormalStrategyBase):
    """Shared memory inside a node, the hierarchical transport across nodes, all_to_all_single on
    NPU. Built on every rank (it maps the node's shared memory the first time)."""

    handle_kinds = (handles.NormalHandle,)

    def __init__(self, runtime: "Runtime", group: dist.ProcessGroup) -> None:
        super().__init__(runtime, group)
        if runtime.device_path:
            self.transport = CollectiveRows()
        elif runtime.num_nodes > 1:
            self.transport = HierarchicalRows(runtime.node_shm())
        else:
            self.transport = SharedMemoryRows(runtime.node_shm())

    def get_name(self) -> str:
        return "default"

    def make_handle(
        self, state: DispatchState, x_shape: torch.Size, recv_topk_idx: torch.Tensor, recv_topk_weights: torch.Tensor
    ) -> handles.NormalHandle:
        rt = self.runtime
        if rt.num_nodes > 1:
            return handles.internode_handle(state, rt.rank, rt.rank_to_node, recv_topk_weights, rt.runtime_id)
        return handles.intranode_handle(state, rt.rank, rt.runtime_id)


@register_normal_strategy("alltoall")
class AlltoAllNormalCommStrategy(_NormalStrategyBase):
    """torch.distributed all_to_all_single between every pair of ranks, inside and across nodes."""

    handle_kinds = (handles.AlltoAllHandle,)

    def __init__(self, runtime: "Runtime", group: dist.ProcessGroup) -> None:
        super().__init__(runtime, group)
        self.transport = CollectiveRows()

    def get_name(self) -> str:
        return "alltoall"

    def make_handle(
        self, state: DispatchState, x_shape: torch.Size, recv_topk_idx: torch.Tensor, recv_topk_weights: torch.Tensor
    ) -> handles.AlltoAllHandle:
        return handles.alltoall_handle(state, self.runtime.rank, x_shape, self.runtime.runtime_id)
