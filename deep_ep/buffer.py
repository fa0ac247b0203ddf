"""deep_ep.Buffer: DeepEP-Ascend's expert-parallel API over CPU and NPU transports.

The Buffer validates and delegates: every normal-mode call (get_dispatch_layout / dispatch /
combine) goes to `self.normal_strategy`, every low-latency call (low_latency_dispatch /
low_latency_combine) to `self.low_latency_strategy`; both are chosen once in __init__ (by name,
instance or DEEP_USE_MODE) and may be replaced between calls (deep_ep/ep_strategy.py,
deep_ep/strategies/). The strategies run on the Buffer's runtime state, which the Buffer holds
itself: the group, its nodes, the shared memory, and the calls' checks and bookkeeping from two
mixins, `normal.py` and `low_latency.py`. fused_deep_moe's pipeline lives in `fused.py` (CPU) and
`npu/` (NPU); the routing is computed in `layout.py` and the bytes are moved by `transport/`.
"""

from __future__ import annotations

import itertools
import os
import socket
from datetime import timedelta
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import env, fused, npu, ops
from .config import Config
from .ep_strategy import (
    LowLatencyEPCommStrategy,
    LowLatencyStrategy,
    NormalEPCommStrategy,
    NormalStrategy,
    get_low_latency_strategy,
    get_normal_strategy,
)
from .fused import FuseMode
from .low_latency import LowLatencyMode
from .normal import NormalMode
from .pool import OutputPool
from .transport import collective, groups, hierarchical, shm
from .utils import EventOverlap, check_one_of, num_threads, timeout_seconds, topk_idx_t

__all__ = ["Buffer", "FuseMode", "topk_idx_t"]

NORMAL_STRATEGIES = tuple(NormalStrategy.get_all_strategies())
LOW_LATENCY_STRATEGIES = tuple(LowLatencyStrategy.get_all_strategies())
DEFAULT_NVL_BYTES = 64 << 20
_runtime_ids = itertools.count(1)


def _host_identity() -> str:
    """Ranks with the same identity are one node: they share /dev/shm and see each other's pids.

    hostname / boot id / (device, inode) of /dev/shm. The boot id tells hosts of one name apart;
    /dev/shm's device and inode tell apart containers (or mount namespaces) of one host and one
    name that each mount their own /dev/shm and so cannot map each other's segments
    (docs/host_discovery.md)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    try:
        shm_stat = os.stat("/dev/shm")
        shm_id = f"{shm_stat.st_dev}:{shm_stat.st_ino}"
    except OSError:
        shm_id = ""
    return f"{socket.gethostname()}/{boot}/{shm_id}"


class Buffer(NormalMode, LowLatencyMode):
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
            available there. DEEP_USE_MODE overrides both names.
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
        check_one_of("normal_strategy", normal_name, NORMAL_STRATEGIES)
        check_one_of("low_latency_strategy", low_latency_name, LOW_LATENCY_STRATEGIES)
        use_mode = env.use_mode()
        if use_mode:
            normal_name, low_latency_name = env.USE_MODES[use_mode]
        normal_strategy, low_latency_strategy = normal_name, low_latency_name
        self.group = group
        groups.check_member(group)
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        # Backend choice: an 'hccl' group takes the NPU path (deep_ep/npu/), a 'gloo' group the CPU one.
        self.on_npu = self.backend == npu.NPU_BACKEND
        if self.on_npu:
            npu.init_backend()  # torch_npu importable; warns when the wheel was built for another SoC
            # The normal strategy keeps its name (and its handle format); low-latency maps to MC2.
            low_latency_strategy = npu.resolve_strategies(normal_strategy, low_latency_strategy, low_latency_mode)[1]
        elif self.backend != "gloo":
            raise ValueError(
                f"group backend must be 'gloo' for CPU ranks or 'hccl' for Ascend NPUs, got {self.backend!r}"
            )
        elif low_latency_strategy == "ops":
            raise ValueError(
                "low_latency_strategy='ops' (DEEP_USE_MODE=ops) needs torch_npu and CANN's MC2 "
                "operators; on CPU use 'default' or 'alltoall'"
            )
        self.device = npu.current_device() if self.on_npu else torch.device("cpu")
        # The device path (NPU; or CPU with DEEP_EP_FORCE_TORCH_OPS=1, which runs the NPU path's code on
        # CPU): normal mode over the collective transport with torch ops and plain torch allocations.
        # The device path: the "default" normal strategy moves rows with all_to_all_single there.
        self.device_path = self.on_npu or ops.torch_ops_forced()
        self.runtime_id = next(_runtime_ids)
        self.low_latency_mode = low_latency_mode
        self.num_nvl_bytes = num_nvl_bytes or DEFAULT_NVL_BYTES
        self.num_rdma_bytes = num_rdma_bytes
        self.explicitly_destroy = explicitly_destroy
        # Our own group: its timeout is DEEP_EP_TIMEOUT_S, and our traffic never mixes with the caller's.
        # Only the ranks of `group` take part in making it (other ranks may be anywhere).
        self.comm = groups.group_over(group, "gloo", timedelta(seconds=timeout_seconds()))
        # Token rows of the collective transport: on NPU over HCCL (the caller's group); metadata stays on
        # the host and goes over `comm` (gloo) everywhere.
        self.data_comm = group if self.on_npu else self.comm
        self.rank_to_node = self._discover_nodes()
        self.node = int(self.rank_to_node[self.rank])
        self.local_ranks = (self.rank_to_node == self.node).nonzero().flatten().tolist()
        # Threads of the native kernels: this rank's share of the cores (DEEP_EP_NUM_THREADS overrides).
        self.num_threads = num_threads(len(self.local_ranks))
        self.topology = hierarchical.Topology(self.rank, self.rank_to_node)
        self.shm: Optional[shm.NodeShm] = None  # mapped by the first "default" normal strategy (node_shm)
        self.setup_operation = groups.CONSTRUCTION  # what a failure while mapping shared memory names
        self.pool = OutputPool()
        self.destroyed = False
        self._init_low_latency()
        # The backends, chosen once: every mode's calls go to them (deep_ep/strategies/).
        self._normal_strategy: NormalEPCommStrategy = get_normal_strategy(normal_strategy)(runtime=self, group=group)
        self._low_latency_strategy: LowLatencyEPCommStrategy = self._make_low_latency_strategy(low_latency_strategy)
        self.setup_operation = groups.FIRST_USE

    # ---- strategies ------------------------------------------------------------------------------
    @property
    def runtime(self) -> "Buffer":
        """The state the strategies run on (groups, shared memory, call bookkeeping): build strategies
        with `Strategy(runtime=buffer.runtime, group=group)`. Here it is the Buffer itself."""
        return self

    def node_shm(self) -> shm.NodeShm:
        """The node's normal-mode shared memory, mapped on first use (collective: every rank builds the
        "default" normal strategy at the same point)."""
        if self.shm is None:
            self.shm = shm.NodeShm(self.comm, self.local_ranks, self.num_nvl_bytes, self.setup_operation)
        return self.shm

    def _make_low_latency_strategy(self, name: str) -> LowLatencyEPCommStrategy:
        cls = get_low_latency_strategy(name)
        if name == "ops" or (name == "default" and self.npu_ll is not None):
            # "ops", and "default" on NPU: CANN's MC2 operators (deep_ep/npu/)
            return get_low_latency_strategy("ops" if self.on_npu else name)(runtime=self, group=self.group)
        return cls(runtime=self, group=self.group)

    def _adopt(self, strategy, base: type, name: str, make: Callable):
        if isinstance(strategy, str):
            return make(strategy)
        if not isinstance(strategy, base):
            raise TypeError(f"{name} must be a strategy name or a {base.__name__}, got {type(strategy).__name__}")
        if strategy.runtime is not self:
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
            lambda n: get_normal_strategy(n)(runtime=self, group=self.group),
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
    def _discover_nodes(self) -> torch.Tensor:
        # Every rank's host identity and pid: the nodes, and the peers whose liveness this process can
        # check, so that a failure in the collective transport names the ranks that died.
        peers: List[Optional[Tuple[str, int]]] = [None] * self.group_size
        collective.run_collective(
            self.comm,
            groups.CONSTRUCTION,
            lambda: dist.all_gather_object(peers, (_host_identity(), os.getpid()), group=self.comm),
        )
        hosts = [host for host, _ in peers]
        here = hosts[self.rank]
        collective.watch_group(
            self.comm,
            timeout_seconds(),
            {r: pid for r, (host, pid) in enumerate(peers) if host == here and r != self.rank},
            [r for r, host in enumerate(hosts) if host != here],
        )
        per_node = os.environ.get("DEEP_EP_RANKS_PER_NODE")
        if per_node:
            if not per_node.isdigit() or int(per_node) < 1:
                raise ValueError(f"DEEP_EP_RANKS_PER_NODE must be a positive integer, got {per_node!r}")
            return torch.arange(self.group_size) // int(per_node)
        order = {h: i for i, h in enumerate(dict.fromkeys(hosts))}
        return torch.tensor([order[h] for h in hosts])

    @property
    def num_nodes(self) -> int:
        return int(self.rank_to_node.max()) + 1

    def get_num_rdma_ranks(self) -> int:
        """Number of nodes in the group."""
        return self.num_nodes

    def get_rdma_rank(self) -> int:
        """This rank's node index."""
        return self.node

    def get_local_buffer_tensor(
        self, dtype: torch.dtype, size: Optional[torch.Size] = None, offset: int = 0, use_rdma_buffer: bool = False
    ) -> torch.Tensor:
        """A view of this rank's shared-memory data area (normal mode, default strategy)."""
        if use_rdma_buffer or self.shm is None:
            raise ValueError(
                "get_local_buffer_tensor: only the shared-memory buffer of normal mode "
                "(normal_strategy='default', one node) can be viewed"
            )
        area = self.shm.data[self.shm.local_index][offset:]
        element = torch.empty(0, dtype=dtype).element_size()
        view = area[: area.numel() // element * element].view(dtype)
        view = view if size is None else view[: torch.Size(size).numel()].view(size)
        # /dev/shm backs only what calls have used so far: reserve what the caller may touch.
        self.shm.reserve(offset + view.numel() * element, "get_local_buffer_tensor")
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
        """Releases the shared memory. Collective in spirit: call it on every rank."""
        if self.shm is not None:
            self.shm.close()
            self.shm = None
        if getattr(self, "ll", None) is not None:
            self.ll.close()
            self.ll = None
        if getattr(self, "npu_ll", None) is not None:
            npu.destroy_low_latency(self.npu_ll)
            self.npu_ll = None
        self.pool.clear()
        # Our own group goes now, too: a gloo group that lives on until interpreter exit (a Buffer
        # kept alive by an exception's traceback, say) can abort the process when it is freed then.
        comm, self.comm = getattr(self, "comm", None), None
        if getattr(self, "data_comm", None) is comm:
            self.data_comm = None
        if comm is not None and dist.is_initialized():
            try:
                dist.destroy_process_group(comm)
            except (ValueError, RuntimeError):
                pass  # already gone (destroyed with the default group)
        self.destroyed = True

    def __del__(self) -> None:
        shm_node = getattr(self, "shm", None)
        if shm_node is not None:
            shm_node.close()
        ll_node = getattr(self, "ll", None)
        if ll_node is not None:
            ll_node.close()

    def _check_alive(self) -> None:
        if self.destroyed:
            raise RuntimeError("deep_ep: this Buffer was destroyed; create a new one")
        # After a peer timed out or died, the barriers / the group cannot be trusted: say so before
        # touching any shared state.
        broken = (
            (self.shm.broken if self.shm is not None else None)
            or collective.failure(self.comm)
            or collective.failure(self.data_comm)
        )  # NPU: the rows' HCCL group
        if broken:
            raise RuntimeError(broken)

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
        return self.normal_strategy.get_dispatch_layout(
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
        """Sends every token to the ranks holding its top-k experts (see NormalMode.normal_dispatch for
        shapes). Returns (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list,
        handle, EventOverlap); with a handle (cached dispatch) only recv_x and the event are set.
        The handle is upstream's (deep_ep/handles.py): the 8-tuple on one node, the 9-tuple across
        nodes ("default"), a dict ("alltoall"). dispatch_wait_recv_cost_stats: None or int32 [R]; entry r
        grows by the microseconds this rank waited for rank r's rows."""
        config = self.get_dispatch_config(self.group_size) if config is None else config
        return self.normal_strategy.dispatch(
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
        NormalMode.normal_combine). Returns (combined_x [T, H], combined_topk_weights float32 [T, K],
        EventOverlap). combine_send_cost_stats: None or int32 [R]; entry r grows by the microseconds
        it took to hand this rank's rows over to rank r."""
        config = self.get_combine_config(self.group_size) if config is None else config
        return self.normal_strategy.combine(
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
        return self.low_latency_strategy.low_latency_dispatch(
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
        return self.low_latency_strategy.low_latency_combine(
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
        """Accepted for DeepEP-Ascend compatibility: there is no device kernel to profile on CPU."""

    def end_profile(self) -> None:
        """Accepted for DeepEP-Ascend compatibility (see begin_profile)."""

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
                shared-expert ranks; NPU: not yet).
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
            self,
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
        if self.npu_ll is not None:  # NPU: MC2 dispatch + npu_grouped_matmul + ... (deep_ep/npu/)
            return npu.fused_deep_moe(*args)
        return fused.fused_deep_moe(*args, profile_enable)
