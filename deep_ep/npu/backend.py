"""Buffer side of the NPU (Atlas A2/A3) path: backend choice, strategy mapping, SoC checks, and the
low-latency / fused_deep_moe calls of a Buffer on an HCCL group.

`deep_ep.Buffer` takes this path when its group's backend is ``hccl``. Normal mode then runs the
collective transport (``transport/collective.py``: HCCL ``all_to_all_single`` for the rows, a gloo
group on the host for the small metadata) with the routing computed on a host copy of ``topk_idx``;
low-latency mode and ``fused_deep_moe`` call CANN's MC2 operators through
``npu/operators.py``. Nothing here imports ``torch_npu`` at module level: ``import deep_ep``
works on any machine.

No NPU is available where this was written: the code is thin, follows the documented torch_npu
signatures (docs/npu.md), and is checked on CPU by plumbing tests with a stand-in for torch_npu.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Optional

import torch
import torch.distributed as dist

from .. import layout
from ..env import shared_expert_rank_num
from ..fused import FuseMode, check_modes, ffn_combine_tokens_per_rank, fused_weights
from ..utils import (
    EventOverlap,
    check_combine_topk_idx,
    check_low_latency_x,
    check_num_topk,
    check_positive_int,
    check_tensor,
    resolve_quant_mode,
)
from . import operators as npu_ops

NPU_BACKEND = "hccl"
# Strategy names as the Buffer accepts them -> what runs on NPU.
NORMAL_ON_NPU = {"default": "alltoall", "alltoall": "alltoall"}
LOW_LATENCY_ON_NPU = {"default": "ops", "ops": "ops"}
_BUILD_TARGETS = {"A3": "build.sh -a deepep", "A2": "build.sh -a deepep2"}
_soc_warned = False


def require_torch_npu() -> None:
    """Imports torch_npu (registers the ``npu`` device) or raises a RuntimeError that says what is missing."""
    try:
        import torch_npu  # noqa: F401
    except Exception as error:  # a broken CANN install raises more than ImportError
        raise RuntimeError(
            f"deep_ep: the group's backend is 'hccl', which needs torch_npu and CANN, but "
            f"`import torch_npu` failed ({type(error).__name__}: {error}). Install torch_npu "
            "matching your torch and CANN, or use a 'gloo' group for CPU ranks."
        ) from None


def init_backend() -> None:
    """What a Buffer on an HCCL group needs first: torch_npu, and a warning if the package was built
    for another Atlas SoC than this machine's (build.sh -a deepep / deepep2)."""
    require_torch_npu()
    check_build_soc(npu_ops.detect_soc())


def create_low_latency(runtime) -> npu_ops.NpuLowLatency:
    """The MC2 operators' dedicated HCCL communicator (collective: every rank of the group)."""
    return npu_ops.NpuLowLatency(runtime.group, runtime.rank, runtime.group_size)


def destroy_low_latency(npu_ll: npu_ops.NpuLowLatency) -> None:
    """Frees the dedicated HCCL communicator (Buffer.destroy)."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group(npu_ll.group)
        except (ValueError, RuntimeError):
            pass  # already gone (destroyed with the default group)


def current_device() -> torch.device:
    """The NPU of this process (``torch.npu.set_device`` must have been called)."""
    return torch.device("npu", torch.npu.current_device())


def group_comm_name(group: dist.ProcessGroup, rank: int) -> str:
    """The HCCL communicator name of `group` as DeepEP-Ascend's Buffer keeps it
    (moe_all_to_all_group_name): "" when the group's backend cannot give one, as upstream has it."""
    try:
        return group._get_backend(torch.device("npu")).get_hccl_comm_name(rank)
    except Exception:  # upstream's fallback, whatever torch_npu raised
        return ""


def resolve_strategies(normal_strategy: str, low_latency_strategy: str, low_latency_mode: bool):
    """(normal, low-latency) strategies that run on NPU.

    Normal mode: "default" and "alltoall" both run the collective transport over HCCL (there is no
    shared-memory transport between NPUs). Low-latency mode: "default" and "ops" run CANN's MC2
    operators; "alltoall" is not available on NPU.
    """
    if low_latency_mode and low_latency_strategy not in LOW_LATENCY_ON_NPU:
        raise ValueError(
            f"low_latency_strategy={low_latency_strategy!r} (or DEEP_USE_MODE=alltoall) is not "
            "available on NPU: low-latency mode runs CANN's MC2 operators there; use 'default' "
            "or 'ops'"
        )
    return NORMAL_ON_NPU[normal_strategy], LOW_LATENCY_ON_NPU.get(low_latency_strategy, low_latency_strategy)


def build_target_soc() -> str:
    """The SoC this package was built for: "A2", "A3" (build.sh -a deepep2 / deepep) or "cpu"."""
    try:
        from .._build_info import TARGET_SOC
    except ImportError:  # running from a source tree that setup.py never built
        return "cpu"
    return TARGET_SOC


def soc_mismatch(recorded: str, detected: Optional[str]) -> Optional[str]:
    """The warning text when the package was built for another Atlas SoC than the machine's, else None.

    A "cpu" build carries no SoC choice (the NPU path is pure Python and runs anyway): no warning.
    """
    if recorded not in _BUILD_TARGETS or recorded == detected:
        return None
    found = f"Atlas {detected}" if detected else "not an Atlas A2 (Ascend910B) or A3 (Ascend910_93)"
    fix = _BUILD_TARGETS.get(detected, "build.sh")
    return (
        f"deep_ep was built for Atlas {recorded} ({_BUILD_TARGETS[recorded]}), but this machine's NPU is "
        f"{found}. Rebuild with `{fix}` for this machine."
    )


def check_build_soc(detected: Optional[str]) -> None:
    """Warns (once per process) when the package records another SoC than the one detected."""
    global _soc_warned
    message = soc_mismatch(build_target_soc(), detected)
    if message and not _soc_warned:
        _soc_warned = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def check_hccl_buffsize(
    npu_ll: npu_ops.NpuLowLatency,
    num_max_tokens: int,
    hidden: int,
    num_experts: int,
    num_topk: int,
    num_shared_ranks: int = 0,
) -> None:
    """ValueError when HCCL_BUFFSIZE is below what the MC2 operators need for these sizes in this
    rank's mode, with num_shared_ranks shared-expert ranks (npu_ops.hccl_buffsize_mb; nothing is
    checked on an unknown device)."""
    mode = npu_ll.mode
    if mode is None:
        return
    needed = npu_ops.hccl_buffsize_mb(
        num_max_tokens, hidden, npu_ll.num_ranks, num_experts, num_topk, mode, npu_ll.release, num_shared_ranks
    )
    value = os.environ.get("HCCL_BUFFSIZE", "200")
    try:
        have = int(value)
    except ValueError:
        raise ValueError(f"HCCL_BUFFSIZE must be an integer number of MB, got {value!r}") from None
    if have < needed:
        raise ValueError(
            f"HCCL_BUFFSIZE={have} MB is too small for the MC2 operators with "
            f"num_max_dispatch_tokens_per_rank={num_max_tokens}, hidden={hidden}, {npu_ll.num_ranks} "
            f"ranks, num_experts={num_experts}, top-k {num_topk}: {mode} needs {needed} MB. Set "
            f"HCCL_BUFFSIZE={needed} before the process group is created (python -m deep_ep.npu.env "
            "prints it)"
        )


@dataclasses.dataclass
class NpuLowLatencyState:
    """handle[7] of a low-latency dispatch on NPU."""

    op: npu_ops.NpuLowLatencyHandle
    dtype: torch.dtype  # dtype of combine's x (x's dtype at dispatch)
    num_rows: int  # M
    topk_idx: torch.Tensor
    topk_weights: Optional[torch.Tensor]


def _check_mc2_inputs(
    runtime,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: Optional[torch.Tensor],
    num_max_tokens: int,
    num_experts: int,
    dtypes,
):
    """The checks every MC2 call shares; returns (num_tokens, hidden, num_topk)."""
    check_tensor("x", x, dtypes=dtypes, shape=(None, None))
    num_tokens, hidden = x.shape
    check_tensor("topk_idx", topk_idx, dtypes=(torch.int64,), shape=(num_tokens, None))
    num_topk = topk_idx.shape[1]
    check_num_topk(num_topk)
    if topk_weights is not None:
        check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=(num_tokens, num_topk))
    check_positive_int("num_max_dispatch_tokens_per_rank", num_max_tokens)
    shared = shared_expert_rank_num()
    layout.SharedExperts.check(num_experts, runtime.group_size, shared)
    if num_tokens > num_max_tokens:
        raise ValueError(f"x has {num_tokens} tokens, more than num_max_dispatch_tokens_per_rank={num_max_tokens}")
    runtime.check_devices(x=x, topk_idx=topk_idx, topk_weights=topk_weights)
    # One host sync for all value checks; the message is worked out only when something is wrong.
    if topk_idx.numel() and bool(((topk_idx < -1) | (topk_idx >= num_experts)).any()):
        low, high = int(topk_idx.min()), int(topk_idx.max())
        raise ValueError(f"topk_idx values must lie in [-1, {num_experts}), got values in [{low}, {high}]")
    runtime.low_latency.npu_ll.check_limits(
        hidden, num_max_tokens, num_topk, num_experts, topk_weights is not None, shared
    )
    check_hccl_buffsize(runtime.low_latency.npu_ll, num_max_tokens, hidden, num_experts, num_topk, shared)
    return num_tokens, hidden, num_topk


def _no_hook() -> None:
    """The receive hook on NPU: the MC2 operators complete in stream order, nothing is left to do."""


def low_latency_dispatch(
    runtime,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    num_max_dispatch_tokens_per_rank: int,
    num_experts: int,
    cumulative_local_expert_recv_stats: Optional[torch.Tensor],
    use_fp8: bool,
    return_recv_hook: bool,
    topk_weights: Optional[torch.Tensor],
    quant_mode: Optional[str],
):
    """Buffer.low_latency_dispatch on NPU: npu_moe_distribute_dispatch_v2 (v1 if v2 is missing).

    Same results as on CPU: recv_x [M, H] (or (int8 [M, H], float32 [M])), recv_count int64 [L].
    handle = (assist_info_for_combine (operator data, the per-row source info), layout_range int64
    [L * R], Nmax, H, E, recv_count, topk_weights, NpuLowLatencyState).
    """
    quant = check_low_latency_x(x, resolve_quant_mode(quant_mode, use_fp8))
    num_tokens, hidden, num_topk = _check_mc2_inputs(
        runtime,
        x,
        topk_idx,
        topk_weights,
        num_max_dispatch_tokens_per_rank,
        num_experts,
        (torch.bfloat16, torch.float16),
    )
    shared = shared_expert_rank_num()
    if cumulative_local_expert_recv_stats is not None:
        local = layout.SharedExperts.check(num_experts, runtime.group_size, shared).local_experts(runtime.rank)
        check_tensor(
            "cumulative_local_expert_recv_stats",
            cumulative_local_expert_recv_stats,
            dtypes=(torch.int32,),
            shape=(local,),
        )
        runtime.check_devices(cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats)
    recv_x, recv_count, op = runtime.low_latency.npu_ll.dispatch(
        x,
        topk_idx,
        topk_weights,
        num_max_dispatch_tokens_per_rank,
        num_experts,
        quant == "int8",
        cumulative_local_expert_recv_stats,
        num_shared_ranks=shared,
    )
    num_rows = (recv_x[0] if isinstance(recv_x, tuple) else recv_x).shape[0]
    state = NpuLowLatencyState(op=op, dtype=x.dtype, num_rows=num_rows, topk_idx=topk_idx, topk_weights=topk_weights)
    handle = (
        op.assist_info_for_combine,
        op.recv_layout_prefix.to(torch.int64),
        num_max_dispatch_tokens_per_rank,
        hidden,
        num_experts,
        recv_count,
        topk_weights,
        state,
    )
    return recv_x, recv_count, handle, EventOverlap(), _no_hook if return_recv_hook else None


def low_latency_combine(
    runtime,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    handle: tuple,
    return_recv_hook: bool,
    out: Optional[torch.Tensor],
):
    """Buffer.low_latency_combine on NPU: npu_moe_distribute_combine_v2 (v1 if v2 is missing).

    Entries of topk_idx set to -1 since the dispatch are left out (their weight becomes 0); any other
    change is the same ValueError as on CPU.
    """
    if not isinstance(handle, tuple) or len(handle) < 8 or not isinstance(handle[7], NpuLowLatencyState):
        raise TypeError("handle must be the handle returned by Buffer.low_latency_dispatch")
    state = handle[7]
    num_tokens, num_topk = state.topk_idx.shape
    check_tensor("x", x, dtypes=(state.dtype,), shape=(state.num_rows, state.op.hidden))
    check_tensor("topk_idx", topk_idx, dtypes=(torch.int64,), shape=(num_tokens, num_topk))
    check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=(num_tokens, num_topk))
    if out is not None:
        check_tensor("out", out, dtypes=(state.dtype,), shape=(num_tokens, state.op.hidden))
    runtime.check_devices(x=x, topk_idx=topk_idx, topk_weights=topk_weights, out=out)
    check_combine_topk_idx(topk_idx, state.topk_idx)  # the operator takes the dispatch's expert ids
    result = runtime.low_latency.npu_ll.combine(x.contiguous(), topk_idx, topk_weights, state.op, out)
    return result, EventOverlap(), _no_hook if return_recv_hook else None


def clean_low_latency_buffer(runtime, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
    """Checks the sizes; the MC2 operators keep no signalling state for deep_ep to reset."""
    check_positive_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank)
    check_positive_int("hidden", hidden)
    layout.SharedExperts.check(num_experts, runtime.group_size, shared_expert_rank_num())


def fused_deep_moe(
    runtime,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    gmm1_permuted_weight: torch.Tensor,
    gmm1_permuted_weight_scale: torch.Tensor,
    gmm2_weight: torch.Tensor,
    gmm2_weight_scale: torch.Tensor,
    num_max_dispatch_tokens_per_rank: int,
    num_experts: int,
    quant_mode: int = 1,
    fuse_mode: int = 1,
):
    """Buffer.fused_deep_moe on NPU: MC2 dispatch (int8) + npu_grouped_matmul + npu_dequant_swiglu_quant +
    npu_grouped_matmul + MC2 combine, for int8 weights with quant_mode 0 or 1 (the weights decide, as on
    CPU). FUSED_DEEP_MOE: gmm1 tile-interleaved, gmm2_weight [L, H, I]; returns (output bf16 [T, H],
    ep_recv_count int32 [L * R]). DISPATCH_FFN_COMBINE: the conventions of the CPU path (gmm1
    [gate | up], gmm2 [L, I, H], scales as float32 bits in int64, num_max_dispatch_tokens_per_rank the
    most rows a rank receives); returns (output, expert_token_nums int32 [L])."""
    ffn_combine = check_modes(quant_mode, fuse_mode) is FuseMode.DISPATCH_FFN_COMBINE
    if isinstance(topk_idx, torch.Tensor) and topk_idx.dtype == torch.int32:
        topk_idx = topk_idx.long()
    num_max = num_max_dispatch_tokens_per_rank
    if ffn_combine:
        check_tensor("topk_idx", topk_idx, dtypes=(torch.int64,), shape=(None, None))
        num_max = ffn_combine_tokens_per_rank(num_max, topk_idx.shape[1], runtime.group_size, shared_expert_rank_num())
    _check_mc2_inputs(runtime, x, topk_idx, topk_weights, num_max, num_experts, (torch.bfloat16,))
    if topk_weights is None:
        raise ValueError("fused_deep_moe needs topk_weights (float32 [T, K])")
    runtime.check_devices(
        gmm1_permuted_weight=gmm1_permuted_weight,
        gmm1_permuted_weight_scale=gmm1_permuted_weight_scale,
        gmm2_weight=gmm2_weight,
        gmm2_weight_scale=gmm2_weight_scale,
    )
    if ffn_combine:
        weights = fused_weights(
            gmm1_permuted_weight,
            gmm1_permuted_weight_scale,
            gmm2_weight,
            gmm2_weight_scale,
            x,
            num_experts // runtime.group_size,
            f"L = {num_experts} experts / {runtime.group_size} ranks",
            FuseMode.DISPATCH_FFN_COMBINE,
        )
        return runtime.low_latency.npu_ll.dispatch_ffn_combine(x, topk_idx, topk_weights, weights, num_max, num_experts)
    return runtime.low_latency.npu_ll.fused_deep_moe(
        x,
        topk_idx,
        topk_weights,
        gmm1_permuted_weight,
        gmm1_permuted_weight_scale,
        gmm2_weight,
        gmm2_weight_scale,
        num_max_dispatch_tokens_per_rank,
        num_experts,
        num_shared_ranks=shared_expert_rank_num(),
    )
