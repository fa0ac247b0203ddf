"""deep_ep.Buffer: DeepEP-Ascend's expert-parallel API over CPU and NPU transports.

The Buffer validates and delegates. Its state lives in one Runtime (deep_ep/runtime.py: groups,
nodes, shared memory, lifetime) with the two modes' call bookkeeping (`runtime.normal`,
deep_ep/normal.py; `runtime.low_latency`, deep_ep/low_latency.py). Every normal-mode call
(get_dispatch_layout / dispatch / combine) goes to `self.normal_strategy`, every low-latency call
(low_latency_dispatch / low_latency_combine) to `self.low_latency_strategy`: backends chosen once in
__init__ (by name, instance or DEEP_USE_MODE) that may be replaced between calls
(deep_ep/ep_strategy.py, deep_ep/strategies/). fused_deep_moe's pipeline lives in `fused.py` (CPU)
and `npu/` (NPU); the routing is computed in `layout.py` and the bytes are moved by `transport/`.
"""

from __future__ import annotations

import itertools
from typing import Callable, Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import env, fused, npu
from .config import Config
from .ep_strategy import (
    LowLatencyEPCommStrategy,
    NormalEPCommStrategy,
    get_low_latency_strategy,
    get_normal_strategy,
    registered_low_latency_strategies,
    registered_normal_strategies,
)
from .fused import FuseMode
from .low_latency import LowLatencyMode
from .runtime import Runtime, is_npu_group
from .utils import EventOverlap, check_one_of, topk_idx_t

__all__ = ["Buffer", "FuseMode", "topk_idx_t"]

DEFAULT_NVL_BYTES = 64 << 20
_runtime_ids = itertools.count(1)


class Buffer:
    """The communication buffer of an expert-parallel group.

    Args:
        group: torch.distributed ProcessGroup (gloo on CPU, hccl on NPU). Collective:
            every rank of the group constructs the Buffer.
        num_nvl_bytes: bytes of this rank's intra-node (shared-memory) data area; 0 picks
            64 MiB. Larger data goes in rounds; it must hold one token row. /dev/shm backs only
            as much of it as the largest call so far has used (docs/memory.md).
        num_rdma_bytes: bytes of the low-latency / inter-node buffer; 0 in low-latency mode: as
            much as the calls' num_max_dispatch_tokens_per_rank, hidden and num_experts need.
        low_latency_mode: enables low_latency_dispatch / low_latency_combine.
        normal_strategy: a name or a NormalEPCommStrategy: "default" (shared memory inside a node,
            the hierarchical transport across nodes; HCCL all_to_all_single on NPU) or "alltoall"
            (all_to_all_single for everything). An instance of another Buffer gives its name.
        low_latency_strategy: a name or a LowLatencyEPCommStrategy: "default", "alltoall" or "ops"
            (NPU only). On NPU "default" and "ops" run CANN's MC2 operators; "alltoall" is not
            available there in low-latency mode. DEEP_USE_MODE overrides both names.
        explicitly_destroy: if True, `destroy()` must be called before exit.
        Other arguments are accepted for DeepEP compatibility and have no effect on CPU.
    """

    num_sms: int = 20

    def __init__(
        self,
        group: dist.ProcessGroup,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 12,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        normal_strategy: Union[str, NormalEPCommStrategy] = "default",
        low_latency_strategy: Union[str, LowLatencyEPCommStrategy] = "default",
        explicitly_destroy: bool = False,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "deep_ep.Buffer needs torch.distributed: call torch.distributed.init_process_group "
                "(backend 'gloo' on CPU, 'hccl' on NPU) first"
            )
        for name, value in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        # An instance passed in was built on another Buffer's runtime: only its name carries over.
        normal_name = (
            normal_strategy.get_name() if isinstance(normal_strategy, NormalEPCommStrategy) else normal_strategy
        )
        low_latency_name = (
            low_latency_strategy.get_name()
            if isinstance(low_latency_strategy, LowLatencyEPCommStrategy)
            else low_latency_strategy
        )
        # Any registered name: the built-in backends and those a caller registered (deep_ep.ep_strategy).
        check_one_of("normal_strategy", normal_name, registered_normal_strategies())
        check_one_of("low_latency_strategy", low_latency_name, registered_low_latency_strategies())
        use_mode = env.use_mode()
        if use_mode:
            normal_name, low_latency_name = env.USE_MODES[use_mode]
        if is_npu_group(group):
            # The normal strategy keeps its name (and its handle format); low-latency maps to MC2.
            low_latency_name = npu.resolve_strategies(normal_name, low_latency_name, low_latency_mode)[1]
        elif low_latency_name == "ops":
            raise ValueError(
                "low_latency_strategy='ops' (DEEP_USE_MODE=ops) needs torch_npu and CANN's MC2 "
                "operators; on CPU use 'default' or 'alltoall'"
            )
        self.group = group
        self.explicitly_destroy = explicitly_destroy
        # Attributes DeepEP-Ascend's Buffer has and its users read: the sizes as given, and the
        # group's HCCL communicator name ("" off NPU).
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.moe_all_to_all_group_name = npu.group_comm_name(group, group.rank()) if is_npu_group(group) else ""
        self._runtime = Runtime(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode)
        # The backends, chosen once: every mode's calls go to them (deep_ep/strategies/).
        self._normal_strategy: NormalEPCommStrategy = get_normal_strategy(normal_name)(
            runtime=self._runtime, group=group
        )
        self._low_latency_strategy: LowLatencyEPCommStrategy = self._make_low_latency_strategy(low_latency_name)
        self._runtime.started()

    # ---- what the runtime knows, read through ----------------------------------------------------
    @property
    def rank(self) -> int:
        """This rank's index in the group."""
        return self._runtime.rank

    @property
    def group_size(self) -> int:
        return self._runtime.group_size

    @property
    def num_threads(self) -> int:
        """Threads of the native kernels: this rank's share of the host's cores (DEEP_EP_NUM_THREADS overrides)."""
        return self._runtime.num_threads

    @property
    def low_latency_mode(self) -> bool:
        return self._runtime.low_latency_mode

    # ---- strategies ------------------------------------------------------------------------------
    @property
    def runtime(self) -> Runtime:
        """The state the strategies run on (groups, shared memory, call bookkeeping): build strategies
        with `Strategy(runtime=buffer.runtime, group=group)`."""
        return self._runtime

    def _make_low_latency_strategy(self, name: str) -> LowLatencyEPCommStrategy:
        cls = get_low_latency_strategy(name)
        runtime = self._runtime
        if name == "ops" or (name == "default" and runtime.low_latency.npu_ll is not None):
            # "ops", and "default" on NPU: CANN's MC2 operators (deep_ep/npu/)
            return get_low_latency_strategy("ops" if runtime.on_npu else name)(runtime=runtime, group=self.group)
        return cls(runtime=runtime, group=self.group)

    def _adopt(self, strategy, base: type, name: str, make: Callable):
        if isinstance(strategy, str):
            return make(strategy)
        if not isinstance(strategy, base):
            raise TypeError(f"{name} must be a strategy name or a {base.__name__}, got {type(strategy).__name__}")
        if strategy.runtime is not self._runtime:
            raise ValueError(f"{name} was built on another Buffer's runtime; build it with runtime=buffer.runtime")
        return strategy

    @property
    def normal_strategy(self) -> NormalEPCommStrategy:
        """The normal-mode backend (compares equal to its name); assign a name or an instance built with
        runtime=buffer.runtime between calls."""
        return self._normal_strategy

    @normal_strategy.setter
    def normal_strategy(self, strategy: Union[str, NormalEPCommStrategy]) -> None:
        self._normal_strategy = self._adopt(
            strategy,
            NormalEPCommStrategy,
            "normal_strategy",
            lambda n: get_normal_strategy(n)(runtime=self._runtime, group=self.group),
        )

    @property
    def low_latency_strategy(self) -> LowLatencyEPCommStrategy:
        """The low-latency backend (compares equal to its name); assignable like normal_strategy."""
        return self._low_latency_strategy

    @low_latency_strategy.setter
    def low_latency_strategy(self, strategy: Union[str, LowLatencyEPCommStrategy]) -> None:
        self._low_latency_strategy = self._adopt(
            strategy, LowLatencyEPCommStrategy, "low_latency_strategy", self._make_low_latency_strategy
        )

    # ---- topology --------------------------------------------------------------------------------
    def get_num_rdma_ranks(self) -> int:
        """Number of nodes in the group."""
        return self._runtime.num_nodes

    def get_rdma_rank(self) -> int:
        """This rank's node index."""
        return self._runtime.node

    def get_local_buffer_tensor(
        self, dtype: torch.dtype, size: Optional[torch.Size] = None, offset: int = 0, use_rdma_buffer: bool = False
    ) -> torch.Tensor:
        """A view of this rank's shared-memory data area (normal mode, default strategy)."""
        node_shm = self._runtime.shm
        if use_rdma_buffer or node_shm is None:
            raise ValueError(
                "get_local_buffer_tensor: only the shared-memory buffer of normal mode "
                "(normal_strategy='default', one node) can be viewed"
            )
        area = node_shm.data[node_shm.local_index][offset:]
        element = torch.empty(0, dtype=dtype).element_size()
        view = area[: area.numel() // element * element].view(dtype)
        view = view if size is None else view[: torch.Size(size).numel()].view(size)
        # /dev/shm backs only what calls have used so far: reserve what the caller may touch.
        node_shm.reserve(offset + view.numel() * element, "get_local_buffer_tensor")
        return view

    # ---- static helpers --------------------------------------------------------------------------
    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        if not isinstance(new_num_sms, int) or new_num_sms <= 0 or new_num_sms % 2:
            raise ValueError(f"num_sms must be a positive even int, got {new_num_sms!r}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        return EventOverlap()

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """A Config for any rank count (the CPU transport needs no per-count tuning)."""
        if not isinstance(num_ranks, int) or num_ranks < 1:
            raise ValueError(f"num_ranks must be a positive int, got {num_ranks!r}")
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        return Buffer.get_dispatch_config(num_ranks)

    # ---- lifetime --------------------------------------------------------------------------------
    def destroy(self) -> None:
        """Releases the shared memory and the Buffer's own groups. Collective in spirit: call it on every rank."""
        self._runtime.destroy()

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
    ) -> int:
        """Bytes of `num_rdma_bytes` that low-latency mode needs (see LowLatencyMode.get_low_latency_rdma_size_hint)."""
        return LowLatencyMode.get_low_latency_rdma_size_hint(
            num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts
        )

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Resets the low-latency signalling state (collective: call it on every rank). Nmax, H, E: of the
        calls to come. Hooks of earlier calls can no longer run; results already received stay valid."""
        self._runtime.low_latency.clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    # ---- normal mode: validate, delegate to the normal strategy ------------------------------------
    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Counts the rows this rank will send (deep_ep/normal.py NormalMode.dispatch_layout).

        Returns: num_tokens_per_rank int32 [R], num_tokens_per_rdma_rank int32 [nodes] (None on one
        node), num_tokens_per_expert int32 [E] ([rounds * E] with DEEPEP_NORMAL_LONG_SEQ_ROUND),
        is_token_in_rank int32 [T, R], EventOverlap."""
        return self._normal_strategy.get_dispatch_layout(
            topk_idx, num_experts, previous_event, async_finish, allocate_on_comm_stream
        )

    def dispatch(
        self,
        x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
        handle=None,
        num_tokens_per_rank: Optional[torch.Tensor] = None,
        num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
        is_token_in_rank: Optional[torch.Tensor] = None,
        num_tokens_per_expert: Optional[torch.Tensor] = None,
        topk_idx: Optional[torch.Tensor] = None,
        topk_weights: Optional[torch.Tensor] = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Optional[Config] = None,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
        dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None,
        quant_mode: Optional[str] = None,
    ):
        """Sends every token to the ranks holding its top-k experts (see NormalMode.dispatch for
        shapes). Returns (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list,
        handle, EventOverlap); with a handle (cached dispatch) only recv_x and the event are set.
        The handle is upstream's (deep_ep/handles.py): the 8-tuple on one node, the 9-tuple across
        nodes ("default"), a dict ("alltoall"). dispatch_wait_recv_cost_stats: None or int32 [R]; entry r
        grows by the microseconds this rank waited for rank r's rows."""
        config = self.get_dispatch_config(self._runtime.group_size) if config is None else config
        return self._normal_strategy.dispatch(
            x=x,
            handle=handle,
            num_tokens_per_rank=num_tokens_per_rank,
            num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
            is_token_in_rank=is_token_in_rank,
            num_tokens_per_expert=num_tokens_per_expert,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            expert_alignment=expert_alignment,
            num_worst_tokens=num_worst_tokens,
            config=config,
            previous_event=previous_event,
            async_finish=async_finish,
            allocate_on_comm_stream=allocate_on_comm_stream,
            dispatch_wait_recv_cost_stats=dispatch_wait_recv_cost_stats,
            quant_mode=quant_mode,
        )

    def combine(
        self,
        x: torch.Tensor,
        handle,
        topk_weights: Optional[torch.Tensor] = None,
        bias: Union[None, torch.Tensor, Tuple[torch.Tensor, torch.Tensor]] = None,
        config: Optional[Config] = None,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
        combine_send_cost_stats: Optional[torch.Tensor] = None,
    ):
        """Returns expert outputs to their tokens and sums them with the routing weights (see
        NormalMode.combine). Returns (combined_x [T, H], combined_topk_weights float32 [T, K],
        EventOverlap). combine_send_cost_stats: None or int32 [R]; entry r grows by the microseconds
        it took to hand this rank's rows over to rank r."""
        config = self.get_combine_config(self._runtime.group_size) if config is None else config
        return self._normal_strategy.combine(
            x=x,
            handle=handle,
            topk_weights=topk_weights,
            bias=bias,
            config=config,
            previous_event=previous_event,
            async_finish=async_finish,
            allocate_on_comm_stream=allocate_on_comm_stream,
            combine_send_cost_stats=combine_send_cost_stats,
        )

    def internode_dispatch(
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
        config: Optional[Config] = None,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Upstream's internode entry point: dispatch (which picks the transport by itself)."""
        return self.dispatch(
            x,
            handle,
            num_tokens_per_rank,
            num_tokens_per_rdma_rank,
            is_token_in_rank,
            num_tokens_per_expert,
            topk_idx,
            topk_weights,
            expert_alignment,
            0,
            config,
            previous_event,
            async_finish,
            allocate_on_comm_stream,
        )

    def internode_combine(
        self,
        x: torch.Tensor,
        handle,
        topk_weights: Optional[torch.Tensor] = None,
        bias=None,
        config: Optional[Config] = None,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ):
        """Upstream's internode entry point: combine."""
        return self.combine(
            x, handle, topk_weights, bias, config, previous_event, async_finish, allocate_on_comm_stream
        )

    # ---- low-latency mode: delegate to the low-latency strategy -------------------------------------
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
    ):
        """Sends every token to the ranks holding its top-k experts, into fixed-size buffers (see
        LowLatencyMode.ll_dispatch for shapes). Format: quant_mode "bf16" / "int8", or as upstream maps
        the flags when it is None (use_fp8 -> int8, else bf16; use_ue8m0 with use_fp8 -> MXFP8 and
        use_mxfp4 -> MXFP4, which are a ValueError here). round_scale and async_finish: no effect.
        Returns (recv_x, recv_count int64 [L], handle (upstream's 7-tuple), EventOverlap, hook): hook is
        always a callable; with return_recv_hook the data is there only after hook()."""
        return self._low_latency_strategy.low_latency_dispatch(
            x=x,
            topk_idx=topk_idx,
            num_max_dispatch_tokens_per_rank=num_max_dispatch_tokens_per_rank,
            num_experts=num_experts,
            cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats,
            use_fp8=use_fp8,
            round_scale=round_scale,
            use_ue8m0=use_ue8m0,
            use_mxfp4=use_mxfp4,
            async_finish=async_finish,
            return_recv_hook=return_recv_hook,
            topk_weights=topk_weights,
            quant_mode=quant_mode,
        )

    def get_next_low_latency_combine_buffer(self, handle: tuple) -> torch.Tensor:
        """[M, H] (the handle's dtype, bfloat16 unless x was float16) where the expert outputs of the
        next low_latency_combine may be written, in the packed layout of recv_x. Passed to that call as
        x, its rows are not copied: on one host the token owners read them where they are. Write it
        after this call and not after passing it to low_latency_combine; every call hands out the
        memory of the next combine (two alternate). Plain tensor with the "alltoall" strategy;
        RuntimeError with CANN's MC2 operators."""
        return self._low_latency_strategy.get_next_low_latency_combine_buffer(handle)

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
    ):
        """Returns expert outputs to their tokens and sums them with topk_weights (see
        LowLatencyMode.ll_combine). zero_copy, async_finish: no effect. Returns (combined_x [T, H],
        EventOverlap, hook)."""
        return self._low_latency_strategy.low_latency_combine(
            x=x,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            handle=handle,
            zero_copy=zero_copy,
            async_finish=async_finish,
            return_recv_hook=return_recv_hook,
            out=out,
        )

    # ---- profiling (upstream's NPU kernel profiler) ------------------------------------------------
    def begin_profile(
        self, num_profile_skip_launches: int, num_profile_active_launches: int, profile_trace_dir: Optional[str] = ""
    ) -> None:
        """Accepted for DeepEP-Ascend compatibility: there is no device kernel to profile (Runtime.begin_profile)."""
        self._runtime.begin_profile(num_profile_skip_launches, num_profile_active_launches, profile_trace_dir)

    def end_profile(self) -> None:
        """Accepted for DeepEP-Ascend compatibility (see begin_profile)."""
        self._runtime.end_profile()

    # ---- fused_deep_moe (pipeline in fused.py) -----------------------------------------------------
    def fused_deep_moe(
        self,
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
        fuse_mode: int = FuseMode.FUSED_DEEP_MOE,
        profile_enable: bool = False,
    ):
        """Dispatch + SwiGLU expert MLP + combine in one call (decode; needs low_latency_mode=True).

        The weights' dtype decides the math (quant_mode 0 and 1 both accepted, as DeepEP-Ascend's own
        callers pass 0 with int8 weights). Int8 weights (W8A8): per token int8 quantization (s_x =
        max|x| / 127), low-latency dispatch; per received row of local expert e: h = (xq @ W1[e]) * s_x *
        s_w1[e] (float32, exact int32 accumulation), a = silu(gate) * up, int8 requantization of a (s_a =
        max|a| / 127), y = (aq @ W2[e].T) * s_a * s_w2[e] rounded to bfloat16. bf16 weights: the rows
        travel in bf16, h = x @ W1[e] (times s_w1 if given), a in bf16, y = a @ W2[e].T (times s_w2 if
        given). Then combine: output[t] = sum over k of topk_weights[t, k] * y (plus the shared expert's
        output with MOE_SHARED_EXPERT_RANK_NUM > 0).

        Args:
            x: [T, H] bfloat16 (float16 / float32 also accepted), T <= num_max_dispatch_tokens_per_rank.
            topk_idx: int64 or int32 [T, K] in [-1, E), -1 = no expert; a row may name an expert more
                than once (each selection is its own received row and its own term of the sum).
            topk_weights: float32 [T, K], the weights of the combine.
            gmm1_permuted_weight: int8 or bfloat16 [L, H, 2I], this rank's L local experts (E / R; with
                shared-expert ranks 1 on those, E / (R - S) on the others); FUSED_DEEP_MOE: columns
                gate/up interleaved in tiles of 64 (deep_ep.permute_gmm1_weight makes it from [L, 2I, H]
                gate-then-up weights), 2I a multiple of 128; DISPATCH_FFN_COMBINE: [gate | up] columns.
            gmm1_permuted_weight_scale: [L, 2I] per-column scales, same column order: float32 (float16 /
                bfloat16 converted) or int64 holding float32 bit patterns (DISPATCH_FFN_COMBINE's form);
                optional (None) with bfloat16 weights.
            gmm2_weight: FUSED_DEEP_MOE: [L, H, I] in gmm1's dtype, each expert's down projection in
                [out, in] order as DeepEP-Ascend's callers pass it; DISPATCH_FFN_COMBINE: [L, I, H].
            gmm2_weight_scale: [L, H] per-column scales (dtypes as gmm1_permuted_weight_scale).
            num_max_dispatch_tokens_per_rank: FUSED_DEEP_MOE: Nmax, the same on every rank (num_rdma_bytes
                must hold Buffer.get_low_latency_rdma_size_hint(Nmax, H, R, E)); DISPATCH_FFN_COMBINE: the
                most rows a rank receives, max_bs * R * K as DeepEP-Ascend's callers pass it.
            num_experts: E (routed experts), the same on every rank, a multiple of R (of R - S with
                shared-expert ranks).
            quant_mode: 0 or 1 (the weights' dtype decides); anything else is a ValueError.
            fuse_mode: FuseMode.FUSED_DEEP_MOE (1) or FuseMode.DISPATCH_FFN_COMBINE (2; int8 weights, no
                shared-expert ranks).
            profile_enable: accepted for DeepEP-Ascend compatibility; no effect.
        Returns:
            FUSED_DEEP_MOE: (output [T, H] bfloat16 (float16 for float16 x), ep_recv_count int32 [L * R]):
            ep_recv_count[e * R + r] = rows local expert e received from rank r.
            DISPATCH_FFN_COMBINE: (output, expert_token_nums int32 [L], rows per local expert).
        Raises:
            TypeError / ValueError on the calling rank before any data moves (wrong dtype or shape of any
            argument, L that does not match, H or I that do not match, T > Nmax); the peers then raise
            ValueError naming that rank instead of waiting.
        """
        args = (
            x,
            topk_idx,
            topk_weights,
            gmm1_permuted_weight,
            gmm1_permuted_weight_scale,
            gmm2_weight,
            gmm2_weight_scale,
            num_max_dispatch_tokens_per_rank,
            num_experts,
            quant_mode,
            fuse_mode,
        )
        if self._runtime.low_latency.npu_ll is not None:  # NPU: MC2 dispatch + npu_grouped_matmul + ...
            return npu.fused_deep_moe(self._runtime, *args)
        return fused.fused_deep_moe(self, *args, profile_enable)
