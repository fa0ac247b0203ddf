"""Low-latency strategies.

- DefaultLowLatencyCommStrategy ("default"): the node's low-latency shared memory
  (transport/shm_low_latency.py) on one node with num_rdma_bytes > 0, else all_to_all_single; on
  NPU, CANN's MC2 operators (deep_ep/npu/).
- AllToAllLowLatencyCommStrategy ("alltoall"): all_to_all_single (transport/alltoall_low_latency.py);
  same bits as "default". CPU ranks only.
- OpsLowLatencyCommStrategy ("ops"): CANN's MC2 operators; NPU only.

The transport is chosen once, when the strategy is built. The runtime (deep_ep/low_latency.py)
checks the arguments, numbers the calls and owns the receive buffers; the handle is upstream's
7-tuple (deep_ep/handles.py). `hook` is always a callable; without return_recv_hook the data has
arrived already and it does nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

import deep_ep_cpp

from .. import handles, layout, npu, ops
from ..ep_strategy import LowLatencyEPCommStrategy, register_low_latency_strategy
from ..low_latency import (
    LL_COMPARED,
    LL_KINDS,
    LL_SUMS,
    LowLatencyCall,
    LowLatencyCombine,
    LowLatencyMode,
    LowLatencyState,
    ll_disagreement,
)
from ..transport import alltoall_low_latency, shm_low_latency
from ..transport.fields import as_byte_rows
from ..utils import NATIVE_DTYPE_CODES, EventOverlap, low_latency_quant_mode

if TYPE_CHECKING:
    from ..runtime import Runtime


_NO_ROWS = torch.empty(0, dtype=torch.int64)  # own_rows of a combine that copies every row


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two contiguous tensors share memory (an `out` inside combine's x)."""
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _block_starts(layout_range: torch.Tensor) -> torch.Tensor:
    """First row of every block, from the inclusive prefix sums int64 [L * R] of a packed layout."""
    return torch.cat((layout_range.new_zeros(1), layout_range[:-1]))


def _no_hook() -> None:
    """The hook of a call whose data has arrived."""


class SharedMemoryLowLatency:
    """The node's low-latency shared memory (transport/shm_low_latency.py): senders write rows into
    fixed slots of the receivers' memory and bump a counter; the hook waits for the counters and packs."""

    def __init__(self, ll: shm_low_latency.LowLatencyShm) -> None:
        self.ll = ll

    def reject(self, mode: LowLatencyMode, kind: int, seq: int, header: List[int], what: str) -> None:
        ll, parity = self.ll, seq & 1
        if kind == 0:
            ll.skip(seq)
        mode.ll_guard(lambda: ll.wait_acks(kind, parity, seq, what))
        ll.publish(kind, parity, seq, header)
        ll.ack(kind, parity, seq)

    def _disagree(self, mode: LowLatencyMode, kind: int, call: LowLatencyCall) -> None:
        """A source's header of `call` differs from this rank's (the native receive touched nothing):
        acknowledges and finishes the call (no peer waits for this rank) and raises ValueError."""
        what = LL_KINDS[kind]
        ll, parity = self.ll, call.seq & 1
        problem = ll_disagreement(ll.headers(kind, parity).tolist(), call.header, LL_COMPARED[kind], what)
        ll.ack(kind, parity, call.seq)
        mode.ll_finish(kind, call)
        raise ValueError(problem)

    def send_dispatch(
        self,
        mode: LowLatencyMode,
        state: LowLatencyState,
        x: torch.Tensor,
        slot: torch.Tensor,
        counts: torch.Tensor,
        what: str,
    ) -> None:
        ll, seq, parity = self.ll, state.seq, state.seq & 1
        areas = ll.areas(state.num_max_tokens, state.hidden, state.num_experts, parity)
        me = ll.local_index
        mode.ll_guard(
            deep_ep_cpp.ll_dispatch_send,
            ll.sync,
            ll.timeout_s,
            what,
            ll.send_ack[0][parity],
            ll.begin_send(0, parity, seq),
            x.data_ptr(),
            NATIVE_DTYPE_CODES[x.dtype],
            state.quantized,
            state.num_tokens,
            state.hidden,
            state.num_topk,
            state.topk_idx.numpy(),
            slot.numpy(),
            state.num_experts // mode.runtime.group_size,
            me,
            state.num_max_tokens,
            areas.tokens[me],
            areas.scales[me],
            areas.info,
            state.header,
            ll.send_header[0][parity],
            counts.numpy(),
            ll.send_signal[0][parity],
            seq,
            mode.runtime.num_threads,
        )

    def receive_dispatch(self, mode: LowLatencyMode, state: LowLatencyState) -> None:
        ll, parity = self.ll, state.seq & 1
        areas = ll.areas(state.num_max_tokens, state.hidden, state.num_experts, parity)
        recv = state.recv
        total = mode.ll_guard(
            deep_ep_cpp.ll_dispatch_receive,
            ll.sync,
            ll.timeout_s,
            "low_latency_dispatch (receive)",
            ll.recv_signal[0][parity],
            state.seq,
            state.header,
            LL_COMPARED[0],
            shm_low_latency.HEADER_WORD * 8,
            shm_low_latency.COUNTS_WORD * 8,
            areas.info[ll.local_index],
            areas.tokens,
            areas.scales if state.quantized else [],
            recv[0].shape[1] * recv[0].element_size(),
            state.num_topk,
            state.num_experts // mode.runtime.group_size,
            state.num_max_tokens,
            recv[0].data_ptr(),
            recv[1].data_ptr() if state.quantized else 0,
            state.src_info.numpy(),
            state.layout_range.numpy(),
            state.recv_count.numpy(),
            ll.recv_ack[0][parity],
            mode.runtime.num_threads,
        )
        if total < 0:
            self._disagree(mode, 0, state)
        state.total = total

    def combine_buffer(self, mode: LowLatencyMode, state: LowLatencyState, seq: int, what: str) -> torch.Tensor:
        """[M, H] in state.dtype over this rank's zero-copy area of the parity combine `seq` will use,
        once every owner has read the last combine sent through it."""
        ll, parity = self.ll, seq & 1
        mode.ll_guard(ll.wait_consumed, 1, parity, what)
        area = ll.in_place_area(state.num_max_tokens, state.hidden, state.num_experts, parity, what)
        return area[: state.num_rows].view(state.dtype)

    def send_combine(self, mode: LowLatencyMode, task: LowLatencyCombine, x: torch.Tensor, what: str) -> None:
        ll, state, seq, parity = self.ll, task.state, task.seq, task.seq & 1
        total, hidden = state.total, state.hidden
        areas = ll.areas(state.num_max_tokens, hidden, state.num_experts, parity)
        # x is this parity's zero-copy area (combine_buffer): the owners read the rows where they are.
        overlaps = _overlap(x, task.result)
        in_place = x.data_ptr() == areas.in_place[ll.local_index] and not overlaps
        experts_per_rank = state.num_experts // ll.num_local
        # Per owner d: 1 and the first packed row of every block (l, d), or 0 (rows copied).
        placement = torch.zeros(ll.num_local, 1 + experts_per_rank, dtype=torch.int64)
        if in_place:
            placement[:, 0] = 1
            placement[:, 1:] = _block_starts(state.layout_range).view(experts_per_rank, ll.num_local).t()
        elif task.immediate and not overlaps:  # the reduce reads this rank's own rows from x
            task.x = x
            task.own_rows = torch.empty(state.num_tokens * state.num_topk, dtype=torch.int64)
        own_rows = task.own_rows if task.own_rows is not None else _NO_ROWS
        mode.ll_guard(
            deep_ep_cpp.ll_combine_send,
            ll.sync,
            ll.timeout_s,
            what,
            ll.send_ack[1][parity],
            ll.begin_send(1, parity, seq),
            x.data_ptr(),
            hidden * x.element_size(),
            total,
            state.src_info[:total].numpy(),
            state.num_topk,
            areas.returns,
            areas.return_rows,
            task.header,
            ll.send_header[1][parity],
            ll.send_signal[1][parity],
            seq,
            ll.local_index,
            own_rows.numpy(),
            in_place,
            placement.numpy(),
            placement.shape[1],
            mode.runtime.num_threads,
        )

    def receive_combine(self, mode: LowLatencyMode, task: LowLatencyCombine, dropped: torch.Tensor) -> None:
        ll, state, parity = self.ll, task.state, task.seq & 1
        areas = ll.areas(state.num_max_tokens, state.hidden, state.num_experts, parity)
        result = task.result
        agreed = mode.ll_guard(
            deep_ep_cpp.ll_combine_receive,
            ll.sync,
            ll.timeout_s,
            "low_latency_combine (receive)",
            ll.recv_signal[1][parity],
            task.seq,
            task.header,
            LL_COMPARED[1],
            shm_low_latency.HEADER_WORD * 8,
            areas.returns[ll.local_index],
            areas.return_rows,
            NATIVE_DTYPE_CODES[result.dtype],
            state.num_tokens,
            state.num_topk,
            state.hidden,
            dropped.numpy(),
            task.weights.numpy(),
            result.data_ptr(),
            task.x.data_ptr() if task.x is not None else 0,
            (task.own_rows if task.own_rows is not None else _NO_ROWS).numpy(),
            state.num_rows,
            shm_low_latency.COUNTS_WORD * 8,
            areas.in_place,
            areas.in_place_rows,
            state.topk_idx.numpy(),
            state.slot.numpy(),
            state.num_experts // ll.num_local,
            ll.recv_ack[1][parity],
            NATIVE_DTYPE_CODES[LL_SUMS],
            mode.runtime.num_threads,
        )
        task.x = task.own_rows = None  # x is the caller's again
        if not agreed:
            self._disagree(mode, 1, task)


class AllToAllLowLatency:
    """torch.distributed all_to_all_single (transport/alltoall_low_latency.py): headers, counts and rows
    move at the call; the hook places / reduces them. Same bits as the shared memory."""

    ll = None

    def combine_buffer(self, mode: LowLatencyMode, state: LowLatencyState, seq: int, what: str) -> torch.Tensor:
        """A fresh [M, H] tensor: the rows travel through all_to_all_single either way."""
        return mode.runtime.pool.empty((state.num_rows, state.hidden), state.dtype)

    def reject(self, mode: LowLatencyMode, kind: int, seq: int, header: List[int], what: str) -> None:
        counts = torch.zeros(mode.runtime.group_size, 1, dtype=torch.int64)
        alltoall_low_latency.exchange_headers(mode.runtime.comm, header, counts, what)

    def _headers(self, mode: LowLatencyMode, kind: int, call: LowLatencyCall, counts_to: torch.Tensor) -> torch.Tensor:
        """Sends `call`'s header and counts_to[d] (int64 [R, C]) to every rank d and checks the headers
        that arrive. On a disagreement it drops the call from the pending ones and raises ValueError.
        Returns int64 [R, HEADER_WORDS + MAX_LOCAL_EXPERTS]: what every source sent."""
        what = LL_KINDS[kind]
        meta = alltoall_low_latency.exchange_headers(mode.runtime.comm, call.header, counts_to, what)
        problem = ll_disagreement(
            meta[:, : shm_low_latency.HEADER_WORDS].tolist(), call.header, LL_COMPARED[kind], what
        )
        if problem:
            mode.ll_drop_pending(kind, call.seq)
            raise ValueError(problem)
        return meta

    def send_dispatch(
        self,
        mode: LowLatencyMode,
        state: LowLatencyState,
        x: torch.Tensor,
        slot: torch.Tensor,
        counts: torch.Tensor,
        what: str,
    ) -> None:
        """Exchanges headers, counts and rows now; the hook places them (receive_dispatch)."""
        experts_per_rank = state.num_experts // mode.runtime.group_size
        counts_to = counts.view(mode.runtime.group_size, experts_per_rank)
        meta = self._headers(mode, 0, state, counts_to)
        counts_from = meta[:, shm_low_latency.HEADER_WORDS : shm_low_latency.HEADER_WORDS + experts_per_rank]
        token, k, _, _ = layout.expert_major_entries(state.topk_idx, 0, state.num_experts)
        if state.quantized:
            q, scale = ops.quantize_int8(x, mode.runtime.num_threads, mode.runtime.device_path)
            fields = [q, scale.view(-1, 1)]
        else:
            fields = [x]
        info = torch.stack([token, k], 1).to(torch.int32)
        send = torch.cat([as_byte_rows(f.index_select(0, token)) for f in fields] + [as_byte_rows(info)], 1)
        state.arrived = alltoall_low_latency.exchange(
            mode.runtime.comm, send, counts_to.sum(1).tolist(), counts_from.sum(1).tolist(), "low_latency_dispatch"
        )
        state.counts_from = counts_from.clone()

    def receive_dispatch(self, mode: LowLatencyMode, state: LowLatencyState) -> None:
        layout.low_latency_recv_layout(state.counts_from.numpy(), state.layout_range.numpy(), state.recv_count.numpy())
        rows = layout.low_latency_arrival_rows(state.counts_from, state.layout_range)
        state.arrival_rows = rows
        arrived, recv = state.arrived, state.recv
        width = recv[0].shape[1] * recv[0].element_size()
        recv[0].view(torch.uint8).view(-1, width).index_copy_(0, rows, arrived[:, :width])
        if state.quantized:
            recv[1].view(torch.uint8).view(-1, 4).index_copy_(0, rows, arrived[:, width : width + 4])
        info = arrived[:, -8:].clone(memory_format=torch.contiguous_format).view(torch.int32)  # fresh storage: aligned
        sources = torch.repeat_interleave(torch.arange(mode.runtime.group_size), state.counts_from.sum(1))
        state.src_info.fill_(-1)
        state.src_info[rows] = torch.cat([sources.to(torch.int32).view(-1, 1), info], 1)
        state.total = rows.numel()
        state.arrived = None

    def send_combine(self, mode: LowLatencyMode, task: LowLatencyCombine, x: torch.Tensor, what: str) -> None:
        state = task.state
        self._headers(mode, 1, task, torch.zeros(mode.runtime.group_size, 1, dtype=torch.int64))
        experts_per_rank = state.num_experts // mode.runtime.group_size
        _, counts = layout.low_latency_slots(state.topk_idx, state.num_experts)
        back = counts.view(mode.runtime.group_size, experts_per_rank).sum(1).tolist()
        send = as_byte_rows(x).index_select(0, state.arrival_rows)
        task.arrived = alltoall_low_latency.exchange(
            mode.runtime.comm, send, state.counts_from.sum(1).tolist(), back, "low_latency_combine"
        )
        token, k, _, _ = layout.expert_major_entries(state.topk_idx, 0, state.num_experts)
        position = torch.full((state.num_tokens * state.num_topk,), -1, dtype=torch.int64)
        position[token * state.num_topk + k] = torch.arange(token.numel())
        task.arrived_row = position.clamp_min(0).view(state.num_tokens, state.num_topk)

    def receive_combine(self, mode: LowLatencyMode, task: LowLatencyCombine, dropped: torch.Tensor) -> None:
        ops.weighted_reduce(
            task.result,
            [task.arrived],
            task.result.dtype,
            dropped,
            task.arrived_row,
            task.weights,
            threads=mode.runtime.num_threads,
            device_path=mode.runtime.device_path,
            sums=LL_SUMS,
        )


class _LowLatencyStrategyBase(LowLatencyEPCommStrategy):
    """The runtime and the calls into it, shared by the low-latency strategies."""

    def __init__(self, runtime: "Runtime", group: dist.ProcessGroup) -> None:
        super().__init__(group)
        self.runtime = runtime
        self.transport = AllToAllLowLatency()  # the default strategy may pick the shared memory instead
        self.on_npu = False

    def get_supported_modes(self) -> List[str]:
        return ["low_latency"]

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        use_mxfp4: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        topk_weights: Optional[torch.Tensor] = None,
        quant_mode: Optional[str] = None,
    ) -> Tuple:
        quant = low_latency_quant_mode(quant_mode, use_fp8, use_ue8m0, use_mxfp4)
        rt = self.runtime
        if self.on_npu:
            recv_x, recv_count, npu_handle, event, _ = npu.low_latency_dispatch(
                rt,
                x,
                topk_idx,
                num_max_dispatch_tokens_per_rank,
                num_experts,
                cumulative_local_expert_recv_stats,
                quant == "int8",
                return_recv_hook,
                topk_weights,
                quant,
            )
            handle = handles.LowLatencyHandle(tuple(npu_handle[:6]) + (None,), npu_handle, rt.runtime_id)
            return recv_x, recv_count, handle, event, _no_hook
        recv_x, recv_count, state, event, hook = rt.low_latency.ll_dispatch(
            self.transport,
            x,
            topk_idx,
            num_max_dispatch_tokens_per_rank,
            num_experts,
            cumulative_local_expert_recv_stats,
            quant == "int8",
            return_recv_hook,
            topk_weights,
            quant,
        )
        # A shared-expert rank shows one local expert: the first R blocks of the virtual layout.
        layout_range = state.layout_range[: state.local_experts * rt.group_size]
        handle = handles.LowLatencyHandle(
            (
                state.src_info,
                layout_range,
                num_max_dispatch_tokens_per_rank,
                state.hidden,
                state.public_experts,
                recv_count,
                None,
            ),
            state,
            rt.runtime_id,
            anchor=1,  # the slice of layout_range is a view made for this handle
        )
        return recv_x, recv_count, handle, event, hook

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: tuple,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, EventOverlap, Callable]:
        rt = self.runtime
        state = handles.state_of(handle, (handles.LowLatencyHandle,), rt.runtime_id, "Buffer.low_latency_dispatch")
        if self.on_npu:
            combined, event, _ = npu.low_latency_combine(rt, x, topk_idx, topk_weights, state, return_recv_hook, out)
            return combined, event, _no_hook
        if type(state.transport) is not type(self.transport) or state.transport.ll is not self.transport.ll:
            raise ValueError(
                f"low_latency_combine: the handle was made by another low-latency strategy than this "
                f"Buffer's {self.get_name()!r}; use the strategy that dispatched it"
            )
        return rt.low_latency.ll_combine(x, topk_idx, topk_weights, state, return_recv_hook, out)

    def get_next_low_latency_combine_buffer(self, handle: tuple) -> torch.Tensor:
        rt = self.runtime
        state = handles.state_of(handle, (handles.LowLatencyHandle,), rt.runtime_id, "Buffer.low_latency_dispatch")
        if self.on_npu:
            raise RuntimeError(
                "deep_ep: get_next_low_latency_combine_buffer is not available with CANN's MC2 operators; "
                "pass low_latency_combine a tensor of your own"
            )
        return rt.low_latency.combine_buffer(state)


@register_low_latency_strategy("default")
class DefaultLowLatencyCommStrategy(_LowLatencyStrategyBase):
    """Shared memory on one node (all_to_all_single otherwise); MC2 operators on NPU. Built on every
    rank (it maps the node's low-latency memory the first time)."""

    def __init__(self, runtime: "Runtime", group: dist.ProcessGroup) -> None:
        super().__init__(runtime, group)
        self.on_npu = runtime.low_latency.npu_ll is not None
        ll = None if self.on_npu else runtime.low_latency.shm()
        if ll is not None:
            self.transport = SharedMemoryLowLatency(ll)

    def get_name(self) -> str:
        return "default"


@register_low_latency_strategy("alltoall")
class AllToAllLowLatencyCommStrategy(_LowLatencyStrategyBase):
    """all_to_all_single between every pair of ranks (CPU ranks)."""

    def __init__(self, runtime: "Runtime", group: dist.ProcessGroup) -> None:
        super().__init__(runtime, group)
        # Refused only where it would run: a normal-mode Buffer on NPU (DEEP_USE_MODE=alltoall, say)
        # builds it as DeepEP-Ascend does and never calls it.
        if runtime.on_npu and runtime.low_latency_mode:
            raise ValueError("low_latency_strategy='alltoall' is not available on NPU; use 'default' or 'ops'")

    def get_name(self) -> str:
        return "alltoall"


@register_low_latency_strategy("ops")
class OpsLowLatencyCommStrategy(_LowLatencyStrategyBase):
    """CANN's MC2 operators (npu_moe_distribute_dispatch_v2 / combine_v2); NPU only.

    comm_alg: accepted as upstream ("hierarchy", "fullmesh_v1", "fullmesh_v2", "ccu", "") and not
    passed to the operators: the algorithm follows the device and HCCL's environment (A2 hierarchical
    mode is HCCL_INTRA_PCIE_ENABLE=1 with HCCL_INTRA_ROCE_ENABLE=0; deep_ep/npu/versions.py)."""

    COMM_ALGS = ("hierarchy", "fullmesh_v1", "fullmesh_v2", "ccu", "")

    def __init__(self, runtime: "Runtime", group: dist.ProcessGroup, comm_alg: str = "hierarchy") -> None:
        super().__init__(runtime, group)
        if comm_alg not in self.COMM_ALGS:
            raise ValueError(f"comm_alg must be one of {list(self.COMM_ALGS)}, got {comm_alg!r}")
        if not runtime.on_npu:
            raise ValueError(
                "low_latency_strategy='ops' (DEEP_USE_MODE=ops) needs torch_npu and CANN's MC2 "
                "operators; on CPU use 'default' or 'alltoall'"
            )
        self.comm_alg = comm_alg
        self.on_npu = runtime.low_latency.npu_ll is not None

    def get_name(self) -> str:
        return "ops"
