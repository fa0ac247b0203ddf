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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

import deep_ep_cpp

from .. import handles
from ..ep_strategy import NormalEPCommStrategy, register_normal_strategy
from ..normal import (
    DISPATCH_AGREED,
    HANDLE_AGREED,
    OP_DISPATCH,
    CachedDispatchCall,
    CombineCall,
    DispatchCall,
    DispatchState,
    InternodeState,
    ReceivedRows,
)
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


@dataclass
class SelectionReceiver:
    """The receiving side of a fresh shared-memory dispatch: lays out the outputs once the meta is
    shared (unless the transport did already), then places every published selection of this rank's
    experts and copies its fields, one native call per round."""

    runtime: "Runtime"
    call: DispatchCall
    received: Optional[ReceivedRows] = None
    forwarded: bool = False  # the rows carry their origin rank and token: two int64 fields after the call's

    @property
    def agreed_fields(self) -> np.ndarray:
        # Across nodes the headers were agreed over the network, before the shared-memory exchange.
        return DISPATCH_AGREED if self.received is None else shm.NO_WORDS

    def prepare(self, meta_all: np.ndarray, agree: bool) -> None:
        if self.received is None:
            self.received = self.runtime.normal.receive(self.call, meta_all, agree)

    def pull(self, widths: List[int], windows: List[shm.Window]) -> None:
        received, plan = self.received, self.received.plan
        fields = len(self.call.kinds)
        experts_per_rank = plan.experts_per_rank
        # Addresses into the contiguous int64 tables (no tensor views): block_start[rank] is the
        # [L, R] table of first rows of this rank's blocks; sources holds 3 rows of out_rows.
        starts = plan.block_start.data_ptr() + plan.rank * experts_per_rank * plan.num_ranks * 8
        out_rows = received.sources.shape[1]
        sources = received.sources.data_ptr()
        received.topk_local = True  # the pull localizes the top-k ids it copies
        deep_ep_cpp.pull_selections(
            [(w.base, w.rows, w.count, w.begin, self.runtime.local_ranks[w.source]) for w in windows],
            widths,
            self.call.num_topk,
            plan.rank * experts_per_rank,
            experts_per_rank,
            plan.num_ranks,
            starts,
            received.taken.data_ptr(),
            fields - 2,
            fields if self.forwarded else -1,
            fields + 1 if self.forwarded else -1,
            [(out.data_ptr(), out.shape[1] * out.element_size()) for out in received.outs],
            out_rows,
            sources,
            sources + out_rows * 8,
            sources + out_rows * 16,
            True,
            self.runtime.num_threads,
        )


@dataclass
class CachedReceiver:
    """The receiving side of a cached shared-memory dispatch: every row goes where the handle's did."""

    call: CachedDispatchCall
    local_ranks: List[int]
    threads: int
    by_source: Dict[int, torch.Tensor] = field(init=False)  # source rank -> its output rows, int64

    def __post_init__(self) -> None:
        src_rank = self.call.state.recv_src_rank
        real = (src_rank >= 0).nonzero().flatten()
        self.by_source = {r: real[src_rank[real] == r] for r in self.local_ranks}

    agreed_fields = HANDLE_AGREED

    def prepare(self, meta_all: np.ndarray, agree: bool) -> None:
        if not agree:
            self.call.check(meta_all)

    def pull(self, widths: List[int], windows: List[shm.Window]) -> None:
        src_idx = self.call.state.recv_src_idx
        ranks, rows, out_rows = [], [], []
        for position, window in enumerate(windows):
            mine = self.by_source[self.local_ranks[window.source]]
            token = src_idx[mine]
            keep = (token >= window.begin) & (token < window.begin + window.count)
            rows.append(token[keep] - window.begin)
            out_rows.append(mine[keep])
            ranks.append(torch.full_like(rows[-1], position, dtype=torch.int32))
        if not ranks:
            return
        ranks, rows, out_rows = torch.cat(ranks).numpy(), torch.cat(rows).numpy(), torch.cat(out_rows).numpy()
        addresses = [shm.window_addresses(w.base, widths, w.rows) for w in windows]
        for index, out in enumerate(self.call.outs):
            width = out.shape[1]
            deep_ep_cpp.copy_rows(
                out.data_ptr(),
                out.shape[0],
                width,
                [fields[index] for fields in addresses],
                [w.rows for w in windows],
                width,
                width,
                ranks,
                rows,
                out_rows,
                self.threads,
            )


class CollectiveRows:
    """torch.distributed all_to_all_single over the runtime's data group (gloo on CPU, HCCL on NPU)."""

    shm = None

    def dispatch(self, rt: "Runtime", call: DispatchCall) -> ReceivedRows:
        received = rt.normal.receive(call, collective.all_gather_meta(rt.comm, call.meta, "dispatch"))
        plan = received.plan
        rows_by_source = plan.rows_by_source()
        start = time.monotonic_ns()
        arrived = collective.dispatch_rows(
            rt.data_comm,
            rt.group_size,
            call.num_topk,
            call.fields,
            received.out_bytes,
            torch.from_numpy(plan.dest_rank),
            torch.from_numpy(plan.dest_row),
            plan.recv_counts.sum(0).tolist(),
            rows_by_source,
        )
        _add_us(call.stats, list(range(rt.group_size)), torch.tensor(time.monotonic_ns() - start))
        received.sources[0][rows_by_source] = torch.repeat_interleave(
            torch.arange(rt.group_size), torch.from_numpy(plan.recv_counts.sum(0))
        )
        received.sources[1][rows_by_source] = arrived
        received.rows_by_source = rows_by_source
        return received

    def cached_dispatch(self, rt: "Runtime", call: CachedDispatchCall) -> None:
        state = call.state
        call.check(collective.all_gather_meta(rt.comm, call.header, "dispatch (cached)"))
        start = time.monotonic_ns()
        collective.dispatch_rows(
            rt.data_comm,
            rt.group_size,
            state.topk_idx.shape[1],
            call.fields,
            call.outs,
            torch.from_numpy(state.plan.dest_rank),
            torch.from_numpy(state.plan.dest_row),
            state.plan.recv_counts.sum(0).tolist(),
            state.rows_by_source,
        )
        _add_us(call.stats, list(range(rt.group_size)), torch.tensor(time.monotonic_ns() - start))

    def combine(self, rt: "Runtime", call: CombineCall) -> None:
        state = call.state
        call.check(collective.all_gather_meta(rt.comm, call.header, "combine"))
        start = time.monotonic_ns()
        collective.combine_rows(
            rt.data_comm,
            rt.group_size,
            call.x_rows,
            state.rows_by_source,
            state.plan.recv_counts.sum(0).tolist(),
            torch.from_numpy(state.plan.dest_rank),
            torch.from_numpy(state.plan.dest_row),
            call.reduction,
        )
        _add_us(call.stats, list(range(rt.group_size)), torch.tensor(time.monotonic_ns() - start))


class SharedMemoryRows:
    """The shared memory of one node: receivers pull rows straight from the owners' data areas."""

    def __init__(self, node_shm: shm.NodeShm) -> None:
        self.shm = node_shm

    def _local_times(self, stats: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """int64 [local ranks] zeros to measure into when the caller wants cost statistics."""
        return torch.zeros(self.shm.num_local, dtype=torch.int64) if stats is not None else None

    def dispatch(self, rt: "Runtime", call: DispatchCall) -> ReceivedRows:
        waits = self._local_times(call.stats)
        receiver = SelectionReceiver(rt, call)
        shm.dispatch_rows(self.shm, call.meta, call.fields, receiver, "dispatch", waits)
        if waits is not None:
            _add_us(call.stats, rt.local_ranks, waits)
        return receiver.received

    def cached_dispatch(self, rt: "Runtime", call: CachedDispatchCall) -> None:
        waits = self._local_times(call.stats)
        receiver = CachedReceiver(call, rt.local_ranks, rt.num_threads)
        shm.dispatch_rows(self.shm, call.header, call.fields, receiver, "dispatch (cached)", waits)
        if waits is not None:
            _add_us(call.stats, rt.local_ranks, waits)

    def combine(self, rt: "Runtime", call: CombineCall) -> None:
        sends = self._local_times(call.stats)
        plan = call.state.plan
        shm.combine_rows(
            self.shm,
            call.header,
            call.check,
            HANDLE_AGREED,
            call.x_rows,
            plan.rows_per_rank.tolist(),
            plan.holder,
            plan.dest_row,
            call.reduction,
            sends=sends,
            peer_rows=plan.peer_rows,
        )
        if sends is not None:
            _add_us(call.stats, rt.local_ranks, sends)


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

    def dispatch(self, rt: "Runtime", call: DispatchCall) -> ReceivedRows:
        forwarding = hierarchical.plan_forwarding(rt.topology, call.topk_idx, call.num_experts // rt.group_size)
        # The rows this rank forwards to each rank travel after the call's meta, in the same exchange:
        # one network round trip per dispatch less than swapping them on their own.
        meta = np.concatenate([call.meta, np.asarray(forwarding.send_counts, dtype=np.int64)])
        meta_all = collective.all_gather_meta(rt.comm, meta, "dispatch")
        received = rt.normal.receive(call, meta_all[:, : call.meta.size])  # raises on every rank alike
        forwarding.expect(meta_all[:, call.meta.size + rt.rank].tolist())
        plan = received.plan
        num_tokens, num_topk = call.topk_idx.shape
        start = time.monotonic_ns()
        tokens = torch.arange(num_tokens)
        arrived = hierarchical.forward_rows(rt.comm, forwarding, call.fields + [as_byte_rows(tokens)])
        network_ns = time.monotonic_ns() - start
        forwarding.origin_token = arrived[-1].view(torch.int64).flatten()
        published = [torch.cat([own, far]) for own, far in zip(call.fields, arrived)]
        published.append(as_byte_rows(torch.cat([torch.full_like(tokens, rt.rank), forwarding.origin_rank])))
        published.append(as_byte_rows(torch.cat([tokens, forwarding.origin_token])))
        node_header = np.array([OP_DISPATCH, published[0].shape[0]], dtype=np.int64)
        waits = torch.zeros(self.shm.num_local, dtype=torch.int64)
        receiver = SelectionReceiver(rt, call, received, forwarded=True)
        shm.dispatch_rows(self.shm, node_header, published, receiver, "dispatch", waits)
        self._add_across(rt, call.stats, waits, network_ns)
        forwarded_topk = arrived[len(call.fields) - 2].view(torch.int64).view(-1, num_topk)
        # Destinations outside this node come out wrong here (the forwarder holds only the tokens
        # that touch its node) and are dropped by to_local.
        far_rank, far_row = plan.destinations(forwarded_topk, forwarding.origin_rank.numpy())
        selection_rank, selection_row = hierarchical.to_local(
            torch.cat([torch.from_numpy(plan.dest_rank), far_rank]),
            torch.cat([torch.from_numpy(plan.dest_row), far_row]),
            rt.topology,
        )
        forwarded_weights = arrived[len(call.fields) - 1].view(torch.float32).view(-1, num_topk)
        received.internode = InternodeState(forwarding, forwarded_weights, selection_rank, selection_row)
        return received

    def combine(self, rt: "Runtime", call: CombineCall) -> None:
        state, reduction = call.state, call.reduction
        num_topk = reduction.weights.shape[1]
        call.check(collective.all_gather_meta(rt.comm, call.header, "combine"))
        internode = state.internode
        forwarded_weights = internode.forwarded_weights
        if call.new_weights is not None:  # the forwarders sum with the owner's new weights
            forwarded_weights = hierarchical.forward_rows(
                rt.comm, internode.forwarding, [as_byte_rows(reduction.weights)], "combine"
            )[0].view(torch.float32)
            forwarded_weights = forwarded_weights.view(-1, num_topk)
        across = hierarchical.HierarchicalReduction(
            rt.comm,
            rt.topology,
            internode.forwarding,
            reduction.out,
            reduction.src_dtype,
            reduction.weights,
            forwarded_weights,
            reduction.biases,
            reduction.threads,
        )
        sends = torch.zeros(self.shm.num_local, dtype=torch.int64)
        shm.combine_rows(
            self.shm,
            call.header,
            None,  # the headers were agreed across nodes above
            shm.NO_WORDS,
            call.x_rows,
            [int(state.plan.rows_per_rank[r]) for r in rt.local_ranks],
            internode.selection_rank.numpy(),
            internode.selection_row.numpy(),
            across,
            sends=sends,
        )
        # A holder's rows are handed over once the local forwarder has read them; it carries them on.
        self._add_across(rt, call.stats, sends, 0)


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
        return handles.intranode_handle(state, rt.runtime_id)


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
