"""deep_ep.Buffer: DeepEP-Ascend's expert-parallel API over CPU and NPU transports.

This module holds the Buffer itself: construction (strategy choice, the group's nodes, the
normal-mode shared memory), static helpers and lifetime. Its modes come from mixins, one module
each: normal mode (get_dispatch_layout / dispatch / combine) from `normal.py`, low-latency mode
(low_latency_dispatch / low_latency_combine / clean_low_latency_buffer) from `low_latency.py`;
fused_deep_moe's pipeline lives in `fused.py` (CPU) and `npu.py` (NPU). The routing itself is
computed in `layout.py` and the bytes are moved by `transport/`.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from . import fused, npu, ops
from .config import Config
from .fused import FuseMode
from .low_latency import LowLatencyMode
from .normal import NormalMode
from .pool import OutputPool
from .transport import collective, hierarchical, shm
from .utils import EventOverlap, check_one_of, timeout_seconds, topk_idx_t

__all__ = ["Buffer", "FuseMode", "topk_idx_t"]

NORMAL_STRATEGIES = ("default", "alltoall")
LOW_LATENCY_STRATEGIES = ("default", "alltoall", "ops")
# DEEP_USE_MODE -> (normal_strategy, low_latency_strategy), as in DeepEP-Ascend.
USE_MODES = {"default": ("default", "default"), "alltoall": ("alltoall", "alltoall"), "ops": ("default", "ops")}
DEFAULT_NVL_BYTES = 64 << 20


def _host_identity() -> str:
    """Ranks with the same identity share memory. The boot id separates containers of one host
    name that do not share /dev/shm from each other only as far as the OS tells us."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class Buffer(NormalMode, LowLatencyMode):
    """The communication buffer of an expert-parallel group.

    Args:
        group: torch.distributed ProcessGroup (gloo on CPU, hccl on NPU). Collective:
            every rank of the group constructs the Buffer.
        num_nvl_bytes: bytes of this rank's intra-node (shared-memory) data area; 0 picks
            64 MiB. Larger data goes in rounds; it must hold one token row.
        num_rdma_bytes: bytes of the low-latency / inter-node buffer.
        low_latency_mode: enables low_latency_dispatch / low_latency_combine.
        normal_strategy: "default" (shared memory inside a node) or "alltoall"
            (torch.distributed all_to_all_single for everything). On NPU (an 'hccl' group) both
            run HCCL all_to_all_single (deep_ep/npu/).
        low_latency_strategy: "default", "alltoall" or "ops" (NPU only). On NPU "default" and "ops"
            run CANN's MC2 operators; "alltoall" is not available there.
        explicitly_destroy: if True, `destroy()` must be called before exit.
        Other arguments are accepted for DeepEP compatibility and have no effect on CPU.
    """

    num_sms: int = 20

    def __init__(self, group: dist.ProcessGroup, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 12,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 normal_strategy: str = "default", low_latency_strategy: str = "default",
                 explicitly_destroy: bool = False) -> None:
        if not dist.is_initialized():
            raise RuntimeError("deep_ep.Buffer needs torch.distributed: call torch.distributed.init_process_group "
                               "(backend 'gloo' on CPU, 'hccl' on NPU) first")
        for name, value in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        check_one_of("normal_strategy", normal_strategy, NORMAL_STRATEGIES)
        check_one_of("low_latency_strategy", low_latency_strategy, LOW_LATENCY_STRATEGIES)
        use_mode = os.environ.get("DEEP_USE_MODE")
        if use_mode:
            check_one_of("DEEP_USE_MODE", use_mode, tuple(USE_MODES))
            normal_strategy, low_latency_strategy = USE_MODES[use_mode]
        self.group = group
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        # Backend choice: an 'hccl' group takes the NPU path (deep_ep/npu/), a 'gloo' group the CPU one.
        self.on_npu = self.backend == npu.NPU_BACKEND
        if self.on_npu:
            npu.init_backend()  # torch_npu importable; warns when the wheel was built for another SoC
            normal_strategy, low_latency_strategy = npu.resolve_strategies(normal_strategy, low_latency_strategy,
                                                                           low_latency_mode)
        elif self.backend != "gloo":
            raise ValueError(f"group backend must be 'gloo' for CPU ranks or 'hccl' for Ascend NPUs, got "
                             f"{self.backend!r}")
        elif low_latency_strategy == "ops":
            raise ValueError("low_latency_strategy='ops' (DEEP_USE_MODE=ops) needs torch_npu and CANN's MC2 "
                             "operators; on CPU use 'default' or 'alltoall'")
        self.device = npu.current_device() if self.on_npu else torch.device("cpu")
        # The device path (NPU; or CPU with DEEP_EP_FORCE_TORCH_OPS=1, which runs the NPU path's code on
        # CPU): normal mode over the collective transport with torch ops and plain torch allocations.
        self.device_path = self.on_npu or ops.torch_ops_forced()
        if self.device_path:
            normal_strategy = npu.NORMAL_ON_NPU[normal_strategy]
        self.normal_strategy = normal_strategy
        self.low_latency_strategy = low_latency_strategy
        self.low_latency_mode = low_latency_mode
        self.num_nvl_bytes = num_nvl_bytes or DEFAULT_NVL_BYTES
        self.num_rdma_bytes = num_rdma_bytes
        self.explicitly_destroy = explicitly_destroy
        # Our own group: its timeout is DEEP_EP_TIMEOUT_S, and our traffic never mixes with the caller's.
        self.comm = dist.new_group(list(range(self.group_size)) if group is dist.group.WORLD else
                                   dist.get_process_group_ranks(group),
                                   backend="gloo", timeout=timedelta(seconds=timeout_seconds()))
        # Token rows of the collective transport: on NPU over HCCL (the caller's group); metadata stays on
        # the host and goes over `comm` (gloo) everywhere.
        self.data_comm = group if self.on_npu else self.comm
        self.rank_to_node = self._discover_nodes()
        self.node = int(self.rank_to_node[self.rank])
        self.local_ranks = (self.rank_to_node == self.node).nonzero().flatten().tolist()
        self.topology = hierarchical.Topology(self.rank, self.rank_to_node)
        self.shm: Optional[shm.NodeShm] = None
        if normal_strategy == "default":
            # Shared memory inside this rank's node; with several nodes, the hierarchical transport.
            self.shm = shm.NodeShm(self.comm, self.local_ranks, self.num_nvl_bytes, "deep_ep normal mode")
        self.pool = OutputPool()
        self.destroyed = False
        self._init_low_latency()

    # ---- topology --------------------------------------------------------------------------------
    def _discover_nodes(self) -> torch.Tensor:
        # Every rank's host identity and pid: the nodes, and the peers whose liveness this process can
        # check, so that a failure in the collective transport names the ranks that died.
        peers: List[Optional[Tuple[str, int]]] = [None] * self.group_size
        dist.all_gather_object(peers, (_host_identity(), os.getpid()), group=self.comm)
        hosts = [host for host, _ in peers]
        collective.watch_group(self.comm, timeout_seconds(), {r: pid for r, (host, pid) in enumerate(peers)
                                                              if host == hosts[self.rank] and r != self.rank})
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

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: Optional[torch.Size] = None, offset: int = 0,
                                use_rdma_buffer: bool = False) -> torch.Tensor:
        """A view of this rank's shared-memory data area (normal mode, default strategy)."""
        if use_rdma_buffer or self.shm is None:
            raise ValueError("get_local_buffer_tensor: only the shared-memory buffer of normal mode "
                             "(normal_strategy='default', one node) can be viewed")
        area = self.shm.data[self.shm.local_index][offset:]
        element = torch.empty(0, dtype=dtype).element_size()
        view = area[: area.numel() // element * element].view(dtype)
        return view if size is None else view[: torch.Size(size).numel()].view(size)

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
        broken = (self.shm.broken if self.shm is not None else None) or collective.failure(self.comm) or \
            collective.failure(self.data_comm)  # NPU: the rows' HCCL group
        if broken:
            raise RuntimeError(broken)

    # ---- fused_deep_moe (pipeline in fused.py) -----------------------------------------------------
    def fused_deep_moe(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                       gmm1_permuted_weight: torch.Tensor, gmm1_permuted_weight_scale: torch.Tensor,
                       gmm2_weight: torch.Tensor, gmm2_weight_scale: torch.Tensor,
                       num_max_dispatch_tokens_per_rank: int, num_experts: int, quant_mode: int = 1,
                       fuse_mode: int = FuseMode.FUSED_DEEP_MOE, profile_enable: bool = False):
        """Dispatch + W8A8 SwiGLU expert MLP + combine in one call (decode; needs low_latency_mode=True).

        Per token: int8 quantization (s_x = max|x| / 127), low-latency dispatch; per received row of
        local expert e: h = (xq @ W1[e]) * s_x * s_w1[e] (float32, exact int32 accumulation),
        a = silu(gate) * up, int8 requantization of a (s_a = max|a| / 127), y = (aq @ W2[e]) * s_a *
        s_w2[e] rounded to bfloat16; then combine: output[t] = sum over k of topk_weights[t, k] * y.

        Args:
            x: [T, H] bfloat16 (float16 / float32 also accepted), T <= num_max_dispatch_tokens_per_rank.
            topk_idx: int64 [T, K] in [-1, E), -1 = no expert; the experts of a row are distinct.
            topk_weights: float32 [T, K], the weights of the combine.
            gmm1_permuted_weight: int8 [L, H, 2I], this rank's L = E / R local experts; columns gate/up
                interleaved in tiles of 64 (deep_ep.permute_gmm1_weight makes it from [L, 2I, H]
                gate-then-up weights); 2I a multiple of 128.
            gmm1_permuted_weight_scale: float32 [L, 2I] per-column scales, same column order (float16 /
                bfloat16 are converted to float32, as DeepEP-Ascend does).
            gmm2_weight: int8 [L, I, H].
            gmm2_weight_scale: float32 [L, H] per-column scales (float16 / bfloat16 converted).
            num_max_dispatch_tokens_per_rank: Nmax, the same on every rank (num_rdma_bytes must hold
                Buffer.get_low_latency_rdma_size_hint(Nmax, H, R, E)).
            num_experts: E, the same on every rank, a multiple of R.
            quant_mode: 1 (W8A8 per-token dynamic int8), the only mode; anything else is a ValueError.
            fuse_mode: FuseMode.FUSED_DEEP_MOE (or 1), the only mode; FuseMode.DISPATCH_FFN_COMBINE and
                other values are a ValueError.
            profile_enable: accepted for DeepEP-Ascend compatibility; no effect.
        Returns:
            (output [T, H] bfloat16 (float16 for float16 x), ep_recv_count int32 [L * R]):
            ep_recv_count[e * R + r] = rows local expert e received from rank r.
        Raises:
            TypeError / ValueError on the calling rank before any data moves (wrong dtype or shape of any
            argument, L != E / R, H or I that do not match, T > Nmax); the peers then raise ValueError
            naming that rank instead of waiting.
        """
        if self.npu_ll is not None:  # NPU: MC2 dispatch + npu_grouped_matmul + ... (deep_ep/npu/)
            fused.check_modes(quant_mode, fuse_mode)
            return npu.fused_deep_moe(self, x, topk_idx, topk_weights, gmm1_permuted_weight,
                                      gmm1_permuted_weight_scale, gmm2_weight, gmm2_weight_scale,
                                      num_max_dispatch_tokens_per_rank, num_experts, quant_mode)
        return fused.fused_deep_moe(self, x, topk_idx, topk_weights, gmm1_permuted_weight,
                                    gmm1_permuted_weight_scale, gmm2_weight, gmm2_weight_scale,
                                    num_max_dispatch_tokens_per_rank, num_experts, quant_mode, fuse_mode,
                                    profile_enable)

