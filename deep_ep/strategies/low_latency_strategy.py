"""Low-latency strategies.

- DefaultLowLatencyCommStrategy ("default"): the node's low-latency shared memory
  (transport/shm_low_latency.py) on one node with num_rdma_bytes > 0, else all_to_all_single; on
  NPU, CANN's MC2 operators (deep_ep/npu.py).
- AllToAllLowLatencyCommStrategy ("alltoall"): all_to_all_single (transport/alltoall_low_latency.py);
  same bits as "default". CPU ranks only.
- OpsLowLatencyCommStrategy ("ops"): CANN's MC2 operators; NPU only.

The transport is chosen once, when the strategy is built. The runtime (deep_ep/low_latency.py)
checks the arguments, numbers the calls and owns the receive buffers; the handle is upstream's
7-tuple (deep_ep/handles.py). `hook` is always a callable; without return_recv_hook the data has
arrived already and it does nothing.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import handles, npu
from ..ep_strategy import LowLatencyEPCommStrategy, register_low_latency_strategy
from ..low_latency import LowLatencyMode
from ..utils import EventOverlap, low_latency_quant_mode


def _no_hook() -> None:
    """The hook of a call whose data has arrived."""


class _LowLatencyStrategyBase(LowLatencyEPCommStrategy):
    """The runtime and the calls into it, shared by the low-latency strategies."""

    def __init__(self, runtime: LowLatencyMode, group: dist.ProcessGroup) -> None:
        super().__init__(group)
        self.runtime = runtime
        self.ll = None  # the shared memory of the calls; None: all_to_all_single
        self.on_npu = False

    def get_supported_modes(self) -> List[str]:
        return ["low_latency"]

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False,
                             use_mxfp4: bool = False, async_finish: bool = False, return_recv_hook: bool = False,
                             topk_weights: Optional[torch.Tensor] = None, quant_mode: Optional[str] = None) -> Tuple:
        quant = low_latency_quant_mode(quant_mode, use_fp8, use_ue8m0, use_mxfp4)
        rt = self.runtime
        if self.on_npu:
            recv_x, recv_count, npu_handle, event, _ = npu.low_latency_dispatch(
                rt, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, cumulative_local_expert_recv_stats,
                quant == "int8", return_recv_hook, topk_weights, quant)
            handle = handles.LowLatencyHandle(tuple(npu_handle[:6]) + (None,), npu_handle, rt.runtime_id)
            return recv_x, recv_count, handle, event, _no_hook
        recv_x, recv_count, state, event, hook = rt.ll_dispatch(
            self.ll, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, cumulative_local_expert_recv_stats,
            quant == "int8", return_recv_hook, topk_weights, quant)
        handle = handles.LowLatencyHandle((state.src_info, state.layout_range, num_max_dispatch_tokens_per_rank,
                                           state.hidden, num_experts, recv_count, None), state, rt.runtime_id)
        return recv_x, recv_count, handle, event, hook

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: tuple,
                            zero_copy: bool = False, async_finish: bool = False, return_recv_hook: bool = False,
                            out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, EventOverlap, Callable]:
        rt = self.runtime
        state = handles.state_of(handle, (handles.LowLatencyHandle,), rt.runtime_id, "Buffer.low_latency_dispatch")
        if self.on_npu:
            combined, event, _ = npu.low_latency_combine(rt, x, topk_idx, topk_weights, state, return_recv_hook, out)
            return combined, event, _no_hook
        if state.ll is not self.ll:
            raise ValueError(f"low_latency_combine: the handle was made by another low-latency strategy than this "
                             f"Buffer's {self.get_name()!r}; use the strategy that dispatched it")
        return rt.ll_combine(x, topk_idx, topk_weights, state, return_recv_hook, out)


@register_low_latency_strategy("default")
class DefaultLowLatencyCommStrategy(_LowLatencyStrategyBase):
    """Shared memory on one node (all_to_all_single otherwise); MC2 operators on NPU. Built on every
    rank (it maps the node's low-latency memory the first time)."""

    def __init__(self, runtime: LowLatencyMode, group: dist.ProcessGroup) -> None:
        super().__init__(runtime, group)
        self.on_npu = runtime.npu_ll is not None
        self.ll = None if self.on_npu else runtime.low_latency_shm()

    def get_name(self) -> str:
        return "default"


@register_low_latency_strategy("alltoall")
class AllToAllLowLatencyCommStrategy(_LowLatencyStrategyBase):
    """all_to_all_single between every pair of ranks (CPU ranks)."""

    def __init__(self, runtime: LowLatencyMode, group: dist.ProcessGroup) -> None:
        super().__init__(runtime, group)
        if runtime.on_npu:
            raise ValueError("low_latency_strategy='alltoall' is not available on NPU; use 'default' or 'ops'")

    def get_name(self) -> str:
        return "alltoall"


@register_low_latency_strategy("ops")
class OpsLowLatencyCommStrategy(_LowLatencyStrategyBase):
    """CANN's MC2 operators (npu_moe_distribute_dispatch_v2 / combine_v2); NPU only.

    comm_alg: accepted as upstream ("hierarchy", "fullmesh_v1", "fullmesh_v2", "ccu", ""); the
    algorithm follows HCCL's environment (deep_ep/npu.py)."""

    COMM_ALGS = ("hierarchy", "fullmesh_v1", "fullmesh_v2", "ccu", "")

    def __init__(self, runtime: LowLatencyMode, group: dist.ProcessGroup, comm_alg: str = "hierarchy") -> None:
        super().__init__(runtime, group)
        if comm_alg not in self.COMM_ALGS:
            raise ValueError(f"comm_alg must be one of {list(self.COMM_ALGS)}, got {comm_alg!r}")
        if not runtime.on_npu:
            raise ValueError("low_latency_strategy='ops' (DEEP_USE_MODE=ops) needs torch_npu and CANN's MC2 "
                             "operators; on CPU use 'default' or 'alltoall'")
        self.comm_alg = comm_alg
        self.on_npu = runtime.npu_ll is not None

    def get_name(self) -> str:
        return "ops"
