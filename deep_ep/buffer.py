"""deep_ep.Buffer: DeepEP-Ascend's expert-parallel API over CPU and NPU transports.

The Buffer checks arguments, picks a transport and shapes results; the routing
itself is computed in `layout.py` and the bytes are moved by `transport/`.
"""
from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Optional, Tuple, Union

import torch
import torch.distributed as dist

import deep_ep_cpp

from . import fused, layout, npu, ops
from .config import Config
from .fused import FuseMode
from .pool import OutputPool
from .transport import alltoall_low_latency, collective, hierarchical, shm, shm_low_latency
from .transport.fields import as_byte_rows
from .utils import (FLOAT_DTYPES, NATIVE_DTYPE_CODES, EventOverlap, check_one_of, check_tensor, num_threads,
                    timeout_seconds)

topk_idx_t = torch.int64

NORMAL_STRATEGIES = ("default", "alltoall")
LOW_LATENCY_STRATEGIES = ("default", "alltoall", "ops")
# DEEP_USE_MODE -> (normal_strategy, low_latency_strategy), as in DeepEP-Ascend.
USE_MODES = {"default": ("default", "default"), "alltoall": ("alltoall", "alltoall"), "ops": ("default", "ops")}
DEFAULT_NVL_BYTES = 64 << 20
MAX_TOPK = 16

# Operation codes in the per-call header, so ranks that call different things fail fast.
OP_DISPATCH, OP_CACHED_DISPATCH, OP_COMBINE = 1, 2, 3
OP_NAMES = {OP_DISPATCH: "dispatch", OP_CACHED_DISPATCH: "dispatch (cached)", OP_COMBINE: "combine"}
# Header fields that every rank must agree on (index 1 is the token count, which may differ).
HEADER_FIELDS = ("operation", "num_tokens", "hidden", "num_topk", "num_experts", "x dtype", "quant_mode",
                 "expert_alignment", "num_worst_tokens")
QUANT_CODES = {"bf16": 0, "int8": 1}


@dataclass
class DispatchState:
    """What combine and cached dispatch need from a dispatch (kept at the end of the handle)."""

    plan: layout.RoutingPlan
    recv_src_rank: torch.Tensor  # int64 [N_out], -1 for padding rows
    recv_src_idx: torch.Tensor  # int64 [N_out]
    num_out_rows: int
    num_tokens: int
    hidden: int
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    expert_alignment: int = 1
    num_worst_tokens: int = 0
    internode: Optional["InternodeState"] = None

    @functools.cached_property
    def rows_by_source(self) -> torch.Tensor:
        """int64 [real rows]: received rows in arrival (source) order (collective transport)."""
        return self.plan.rows_by_source()


@dataclass
class InternodeState:
    """A dispatch's routes across nodes (hierarchical transport), kept for combine."""

    forwarding: hierarchical.Forwarding
    forwarded_weights: torch.Tensor  # float32 [F, K], the dispatch weights of the forwarded rows
    selection_rank: torch.Tensor  # int32 [T + F, K]: node-local holder of each selection, -1 elsewhere
    selection_row: torch.Tensor  # int64 [T + F, K]: its row there


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip() in ("1", "true", "True")


def _host_identity() -> str:
    """Ranks with the same identity share memory. The boot id separates containers of one host
    name that do not share /dev/shm from each other only as far as the OS tells us."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _disagreement(meta_all: torch.Tensor, fields: Tuple[str, ...], skip: Tuple[int, ...]) -> Optional[str]:
    for index, name in enumerate(fields):
        if index in skip:
            continue
        column = meta_all[:, index]
        if bool((column != column[0]).any()):
            values = ", ".join(f"rank {r}: {int(v)}" for r, v in enumerate(column.tolist()))
            if index == 0:
                values = ", ".join(f"rank {r}: {OP_NAMES.get(int(v), int(v))}" for r, v in enumerate(column))
            return f"ranks disagree on {name} ({values})"
    return None


class Buffer:
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
            run HCCL all_to_all_single (deep_ep/npu.py).
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
        # Backend choice: an 'hccl' group takes the NPU path (deep_ep/npu.py), a 'gloo' group the CPU one.
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
        if not isinstance(num_ranks, int) or num_ranks < 1:
            raise ValueError(f"num_ranks must be a positive int, got {num_ranks!r}")
        return Config(Buffer.num_sms, 6, 256, 6, 128)

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

    # ---- low-latency mode ------------------------------------------------------------------------
    # Decode path: fixed-size buffers, no host-side layout step. Strategy "default" on one node uses
    # transport/shm_low_latency.py (senders write rows into fixed slots of the receivers' shared memory
    # and bump a counter; the receive step waits for the counters and packs expert-major); "alltoall"
    # and more than one node use transport/alltoall_low_latency.py. Both give the same bits.
    def _init_low_latency(self) -> None:
        self.ll: Optional[shm_low_latency.LowLatencyShm] = None
        self.npu_ll = None  # NPU: CANN's MC2 operators on a dedicated HCCL group (transport/npu_ops.py)
        self._ll_seq = [0, 0]  # calls so far per kind (dispatch, combine); equal on every rank
        self._ll_pending: List[List[Optional[int]]] = [[None, None], [None, None]]  # [kind][parity] -> seq
        self._ll_recv: List[Optional[tuple]] = [None, None]  # per parity: (key, recv tensors)
        self._ll_epoch = 0  # bumped by clean_low_latency_buffer: older hooks refuse to run
        self._ll_broken: Optional[str] = None
        self._ll_fits: set = set()
        if not self.low_latency_mode:
            return
        sizes: List[Optional[int]] = [None] * self.group_size
        dist.all_gather_object(sizes, self.num_rdma_bytes, group=self.comm)
        if len(set(sizes)) > 1:
            raise ValueError(f"num_rdma_bytes must be the same on every rank, got {sizes} (by rank)")
        if self.low_latency_strategy == "default" and self.num_nodes == 1 and self.num_rdma_bytes > 0:
            self.ll = shm_low_latency.LowLatencyShm(self.comm, self.local_ranks, self.num_rdma_bytes)
        if self.on_npu:
            self.npu_ll = npu.create_low_latency(self)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """Bytes of `num_rdma_bytes` that low-latency mode needs (the real size, not a placeholder).

        Args:
            num_max_dispatch_tokens_per_rank: Nmax, the most tokens any rank dispatches in one call.
            hidden: H. num_ranks: R, ranks in the group. num_experts: E, a multiple of R.
        Returns: control words and mailboxes for R ranks plus, twice (double buffering), E * Nmax
            dispatch slots of 8 bytes, Nmax token rows of 2H bytes with a float32 scale each, and
            Nmax * min(E, 16) combine rows of 2H bytes.
        """
        for name, value in (("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank),
                            ("hidden", hidden), ("num_ranks", num_ranks), ("num_experts", num_experts)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_experts % num_ranks:
            raise ValueError(f"num_experts must be a multiple of num_ranks, got {num_experts} and {num_ranks}")
        return shm_low_latency.bytes_needed(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    def _ll_ready(self, what: str) -> None:
        if self.ll is None or self.destroyed:  # the shared-memory path uses neither NodeShm nor the group
            self._check_alive()
        if not self.low_latency_mode:
            raise RuntimeError(f"deep_ep: {what} needs a Buffer created with low_latency_mode=True")
        if self._ll_broken:
            raise RuntimeError(self._ll_broken)

    def _ll_check_sizes(self, num_max_tokens, hidden: int, num_experts) -> None:
        """Nmax / E are ints, E % R == 0, and num_rdma_bytes holds the layout (ValueError naming the size)."""
        key = (num_max_tokens, hidden, num_experts)
        if key in self._ll_fits:
            return
        for name, value in (("num_max_dispatch_tokens_per_rank", num_max_tokens), ("num_experts", num_experts)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_experts % self.group_size:
            raise ValueError(f"num_experts must be a positive multiple of the {self.group_size} ranks, "
                             f"got {num_experts}")
        if num_experts // self.group_size > shm_low_latency.MAX_LOCAL_EXPERTS:
            raise ValueError(f"low-latency mode supports up to {shm_low_latency.MAX_LOCAL_EXPERTS} experts per "
                             f"rank, got {num_experts // self.group_size}")
        needed = self.get_low_latency_rdma_size_hint(num_max_tokens, hidden, self.group_size, num_experts)
        if self.num_rdma_bytes < needed or (self.ll is not None and not self.ll.fits(num_max_tokens, hidden,
                                                                                     num_experts)):
            raise ValueError(f"num_rdma_bytes={self.num_rdma_bytes} is too small for low-latency mode with "
                             f"num_max_dispatch_tokens_per_rank={num_max_tokens}, hidden={hidden}, "
                             f"{self.group_size} ranks and num_experts={num_experts}: it needs {needed} bytes "
                             f"(Buffer.get_low_latency_rdma_size_hint({num_max_tokens}, {hidden}, "
                             f"{self.group_size}, {num_experts}))")
        self._ll_fits.add(key)

    def _ll_begin(self, kind: int, what: str) -> int:
        """The sequence number of the next call of `kind`; refuses a third call in flight."""
        seq = self._ll_seq[kind] + 1
        if self._ll_pending[kind][seq & 1] is not None:
            raise RuntimeError(f"deep_ep {what}: two earlier calls still wait for their hook; call the older "
                               "hook first (at most two low-latency results may be in flight)")
        return seq

    def _ll_reject(self, kind: int, seq: int, header: List[int], what: str) -> None:
        """This rank rejected its arguments: tell the peers (so they fail fast instead of waiting) and
        consume their call, which keeps every rank's sequence numbers in step."""
        self._ll_seq[kind] = seq
        if self.ll is not None:
            parity = seq & 1
            self._ll_guard(lambda: self.ll.wait_acks(kind, parity, seq, what))
            self.ll.publish(kind, parity, seq, header)
            self.ll.ack(kind, parity, seq)
        else:
            counts = torch.zeros(self.group_size, 1, dtype=torch.int64)
            alltoall_low_latency.exchange_headers(self.comm, header, counts, what)

    def _ll_guard(self, wait) -> None:
        """Runs a wait on peers; a timeout or a dead peer leaves low-latency mode unusable until
        clean_low_latency_buffer() runs on every rank (or the Buffer is recreated)."""
        try:
            wait()
        except RuntimeError as error:
            self._ll_broken = (f"deep_ep: low-latency mode cannot be used after an earlier failure ({error}); "
                               "call clean_low_latency_buffer() on every rank, or recreate the Buffer.")
            raise

    def _ll_quant(self, x, use_fp8: bool, quant_mode: Optional[str]) -> str:
        if quant_mode is not None:
            check_one_of("quant_mode", quant_mode, tuple(QUANT_CODES))
            quant = quant_mode
        else:
            quant = "int8" if use_fp8 else "bf16"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor [T, H], got {type(x).__name__}")
        if quant == "int8" and x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"x of dtype {x.dtype} cannot be quantized to int8 (use_fp8=True / quant_mode='int8'); "
                            "pass bfloat16, float16 or float32")
        if quant == "bf16" and x.dtype not in (torch.bfloat16, torch.float16):
            raise TypeError(f"x must be bfloat16 or float16 without int8 quantization (use_fp8=False / "
                            f"quant_mode='bf16'), got {x.dtype}")
        return quant

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False,
                             topk_weights: Optional[torch.Tensor] = None, quant_mode: Optional[str] = None):
        """Sends every token to the ranks holding its top-k experts, into fixed-size buffers (decode path).

        Args:
            x: [T, H] bfloat16 (float16 too; float32 with int8), T <= num_max_dispatch_tokens_per_rank.
            topk_idx: int64 [T, K] in [-1, E), -1 = no expert; the experts of a row are distinct.
            num_max_dispatch_tokens_per_rank: Nmax, the same on every rank.
            num_experts: E, the same on every rank, a multiple of R.
            cumulative_local_expert_recv_stats: None or int32 [L]; recv_count is added to it.
            use_fp8: True (default): per-token int8 (scale = max|x| / 127, A2/A3 behaviour); False: bf16.
            round_scale, use_ue8m0: accepted for DeepEP compatibility; no effect (int8 scales are float32).
            async_finish: accepted (CPU calls complete before returning).
            return_recv_hook: if True the call only sends; `hook()` receives and packs, and the results
                are valid only after it.
            topk_weights: None or float32 [T, K]; kept in the handle.
            quant_mode: None, "bf16" or "int8"; overrides use_fp8.
        Returns:
            recv_x: [M, H] with M = Nmax * R * min(K, L) (x's dtype), or with int8 the pair
                (int8 [M, H], float32 scales [M]). Rows are packed expert-major: local expert 0's rows
                from rank 0 in token order, then from rank 1, ..., then expert 1, ...; only the first
                recv_count.sum() rows hold data. The memory is reused by the call after next (two
                results may be alive at once).
            recv_count: int64 [L], rows per local expert.
            handle: (src_info int32 [M, 3] (source rank, source token, top-k column; -1 past the rows),
                layout_range int64 [L * R] (inclusive prefix of the rows of (local expert, source rank)
                blocks, expert-major), Nmax, H, E, recv_count, topk_weights, state).
            event: EventOverlap. hook: callable with return_recv_hook, else None.
        """
        what = "low_latency_dispatch"
        self._ll_ready(what)
        if self.npu_ll is not None:  # NPU: npu_moe_distribute_dispatch_v2 (deep_ep/npu.py)
            return npu.low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                                            cumulative_local_expert_recv_stats, use_fp8, return_recv_hook,
                                            topk_weights, quant_mode)
        seq = self._ll_begin(0, what)
        try:
            quant = self._ll_quant(x, use_fp8, quant_mode)
            if not (x.dim() == 2 and isinstance(topk_idx, torch.Tensor) and topk_idx.dtype == topk_idx_t
                    and topk_idx.dim() == 2 and topk_idx.shape[0] == x.shape[0]):  # else: say what is wrong
                check_tensor("x", x, dtypes=FLOAT_DTYPES, shape=(None, None))
                check_tensor("topk_idx", topk_idx, dtypes=(topk_idx_t,), shape=(x.shape[0], None))
            num_tokens, hidden = x.shape
            num_topk = topk_idx.shape[1]
            if not 1 <= num_topk <= MAX_TOPK:
                raise ValueError(f"topk_idx must have 1 to {MAX_TOPK} columns (top-k), got {num_topk}")
            self._ll_check_sizes(num_max_dispatch_tokens_per_rank, hidden, num_experts)
            if num_tokens > num_max_dispatch_tokens_per_rank:
                raise ValueError(f"x has {num_tokens} tokens, more than num_max_dispatch_tokens_per_rank="
                                 f"{num_max_dispatch_tokens_per_rank}")
            experts_per_rank = num_experts // self.group_size
            if cumulative_local_expert_recv_stats is not None:
                check_tensor("cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats,
                             dtypes=(torch.int32,), shape=(experts_per_rank,))
            if topk_weights is not None:
                check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=(num_tokens, num_topk))
            x, topk_idx = x.contiguous(), topk_idx.contiguous()
            slot, counts = layout.low_latency_slots(topk_idx, num_experts)
        except (ValueError, TypeError):
            tokens = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() == 2 else -1
            nmax = num_max_dispatch_tokens_per_rank if isinstance(num_max_dispatch_tokens_per_rank, int) else -1
            self._ll_reject(0, seq, [seq, 1, nmax, -1, -1, -1, -1, tokens], what)
            raise
        self._ll_seq[0] = seq
        parity = seq & 1
        num_max = num_max_dispatch_tokens_per_rank
        quantized = quant == "int8"
        fmt = LL_FORMAT_INT8 if quantized else NATIVE_DTYPE_CODES[x.dtype]
        header = [seq, 0, num_max, num_experts, hidden, num_topk, fmt, num_tokens]
        num_rows = num_max * self.group_size * min(num_topk, experts_per_rank)
        state = LowLatencyState(seq=seq, epoch=self._ll_epoch, header=header, num_max_tokens=num_max,
                                hidden=hidden, num_experts=num_experts, num_topk=num_topk, num_tokens=num_tokens,
                                num_rows=num_rows, quantized=quantized,
                                dtype=x.dtype if x.dtype != torch.float32 else torch.bfloat16,
                                topk_idx=topk_idx, topk_weights=topk_weights,
                                src_info=torch.empty(num_rows, 3, dtype=torch.int32),
                                layout_range=torch.empty(experts_per_rank * self.group_size, dtype=torch.int64),
                                recv_count=torch.empty(experts_per_rank, dtype=torch.int64),
                                stats=cumulative_local_expert_recv_stats)
        state.recv = self._ll_recv_buffers(parity, num_rows, hidden, quantized, state.dtype)
        if self.ll is not None:
            areas = self.ll.areas(num_max, hidden, num_experts, parity)
            self._ll_guard(lambda: self.ll.wait_acks(0, parity, seq, what))
            me = self.ll.local_index
            deep_ep_cpp.ll_dispatch_send(x.data_ptr(), NATIVE_DTYPE_CODES[x.dtype], quantized, num_tokens, hidden,
                                         num_topk, topk_idx.numpy(), slot.numpy(), experts_per_rank, me, num_max,
                                         areas.tokens[me], areas.scales[me], areas.info, header,
                                         self.ll.send_header[0][parity], counts.numpy(),
                                         self.ll.send_signal[0][parity], seq, num_threads())
        else:
            self._ll_alltoall_dispatch(state, x, counts)
        self._ll_pending[0][parity] = seq
        hook = functools.partial(self._ll_dispatch_receive, state)
        recv_x = state.recv if quantized else state.recv[0]
        handle = (state.src_info, state.layout_range, num_max, hidden, num_experts, state.recv_count,
                  topk_weights, state)
        if return_recv_hook:
            return recv_x, state.recv_count, handle, EventOverlap(), hook
        hook()
        return recv_x, state.recv_count, handle, EventOverlap(), None

    def _ll_recv_buffers(self, parity: int, rows: int, hidden: int, quantized: bool, dtype: torch.dtype):
        """The receive tensors of one parity, reused by every other call (double buffering)."""
        key = (rows, hidden, quantized, dtype)
        cached = self._ll_recv[parity]
        if cached is None or cached[0] != key:
            if quantized:
                tensors = (torch.empty(rows, hidden, dtype=torch.int8), torch.empty(rows, dtype=torch.float32))
            else:
                tensors = (torch.empty(rows, hidden, dtype=dtype),)
            cached = self._ll_recv[parity] = (key, tensors)
        return cached[1]

    def _ll_check_hook(self, state: "LowLatencyState", what: str) -> None:
        if state.epoch != self._ll_epoch:
            raise RuntimeError(f"deep_ep {what}: this hook belongs to a call made before "
                               "clean_low_latency_buffer(); its data is gone")
        self._check_alive()
        if self._ll_broken:
            raise RuntimeError(self._ll_broken)

    def _ll_finish(self, kind: int, state: "LowLatencyState") -> None:
        state.received = True
        if self._ll_pending[kind][state.seq & 1] == state.seq:
            self._ll_pending[kind][state.seq & 1] = None

    def _ll_dispatch_receive(self, state: "LowLatencyState") -> None:
        """Waits for every source's rows of this call and packs them expert-major (the hook)."""
        if state.received:
            return
        what = "low_latency_dispatch (receive)"
        self._ll_check_hook(state, what)
        parity = state.seq & 1
        experts_per_rank = state.num_experts // self.group_size
        if self.ll is not None:
            self._ll_guard(lambda: self.ll.wait_signals(0, parity, state.seq, what))
            problem = _ll_disagreement(self.ll.headers(0, parity).tolist(), state.header, 7, "low_latency_dispatch")
            if problem:
                self.ll.ack(0, parity, state.seq)
                self._ll_finish(0, state)
                raise ValueError(problem)
            counts = self.ll.counts(parity, experts_per_rank)
            block_rows = layout.low_latency_recv_layout(counts, state.layout_range.numpy(), state.recv_count.numpy())
            areas = self.ll.areas(state.num_max_tokens, state.hidden, state.num_experts, parity)
            me = self.ll.local_index
            recv = state.recv
            state.total = deep_ep_cpp.ll_pack(
                areas.info[me], areas.tokens, areas.scales if state.quantized else [],
                recv[0].shape[1] * recv[0].element_size(), state.num_topk, block_rows,
                state.layout_range.numpy(), state.num_max_tokens, recv[0].data_ptr(),
                recv[1].data_ptr() if state.quantized else 0, state.src_info.numpy(), state.num_rows,
                self.ll.recv_ack[0][parity], state.seq, num_threads())
        else:
            self._ll_alltoall_pack(state)
        if state.stats is not None:
            state.stats.add_(state.recv_count)
        self._ll_finish(0, state)

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: tuple, zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out: Optional[torch.Tensor] = None):
        """Returns expert outputs to their tokens and sums them with the routing weights.

        Args:
            x: [M, H] expert outputs in the packed layout of low_latency_dispatch, in the handle's dtype
                (bfloat16 unless x was float16); rows past recv_count.sum() are ignored.
            topk_idx: int64 [T, K], as given to low_latency_dispatch (entries may be set to -1 to drop them).
            topk_weights: float32 [T, K], the weights of the sum.
            handle: from low_latency_dispatch (after its hook, if any).
            zero_copy, async_finish: accepted for DeepEP compatibility.
            return_recv_hook: if True the call only sends; `hook()` receives and reduces, and
                combined_x is valid only after it.
            out: None or a [T, H] tensor of x's dtype that receives the result.
        Returns:
            (combined_x [T, H], EventOverlap, hook or None). combined_x[t] = sum over k with
            topk_idx[t, k] != -1 of topk_weights[t, k] * x[row(t, k)], in float32, k ascending.
        """
        what = "low_latency_combine"
        self._ll_ready(what)
        if self.npu_ll is not None:  # NPU: npu_moe_distribute_combine_v2 (deep_ep/npu.py)
            return npu.low_latency_combine(self, x, topk_idx, topk_weights, handle, return_recv_hook, out)
        state = _ll_state_of(handle)
        if not state.received:
            raise RuntimeError("deep_ep low_latency_combine: call the hook of the low_latency_dispatch that made "
                               "this handle first")
        seq = self._ll_begin(1, what)
        num_tokens, num_topk, hidden = state.num_tokens, state.num_topk, state.hidden
        try:
            check_tensor("x", x, dtypes=(state.dtype,), shape=(state.num_rows, hidden))
            check_tensor("topk_idx", topk_idx, dtypes=(topk_idx_t,), shape=(num_tokens, num_topk))
            check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=(num_tokens, num_topk))
            if out is not None:
                check_tensor("out", out, dtypes=(state.dtype,), shape=(num_tokens, hidden))
            if topk_idx is not state.topk_idx and not torch.equal(topk_idx, state.topk_idx):
                kept = topk_idx >= 0
                if not torch.equal(topk_idx[kept], state.topk_idx[kept]):
                    raise ValueError("topk_idx must be the one given to low_latency_dispatch (entries may be set "
                                     "to -1 to leave them out)")
        except (ValueError, TypeError):
            self._ll_reject(1, seq, [seq, 1, -1, -1, -1, -1, -1, state.seq], what)
            raise
        self._ll_seq[1] = seq
        parity = seq & 1
        x = x.contiguous()
        header = [seq, 0, state.num_max_tokens, state.num_experts, hidden, num_topk, NATIVE_DTYPE_CODES[x.dtype],
                  state.seq]
        result = out if out is not None and out.is_contiguous() else self.pool.empty((num_tokens, hidden), x.dtype)
        total = state.total
        task = LowLatencyCombine(state=state, seq=seq, header=header, topk_idx=topk_idx, weights=topk_weights,
                                 result=result, out=out)
        if self.ll is not None:
            areas = self.ll.areas(state.num_max_tokens, hidden, state.num_experts, parity)
            self._ll_guard(lambda: self.ll.wait_acks(1, parity, seq, what))
            deep_ep_cpp.ll_combine_send(x.data_ptr(), hidden * x.element_size(), total, state.src_info[:total].numpy(),
                                        num_topk, areas.returns, areas.return_rows, header,
                                        self.ll.send_header[1][parity], self.ll.send_signal[1][parity], seq,
                                        num_threads())
        else:
            self._ll_alltoall_combine(task, x, total)
        self._ll_pending[1][parity] = seq
        hook = functools.partial(self._ll_combine_receive, task)
        if return_recv_hook:
            return result if out is None else out, EventOverlap(), hook
        hook()
        return result if out is None else out, EventOverlap(), None

    def _ll_combine_receive(self, task: "LowLatencyCombine") -> None:
        """Waits for every holder's rows of this call and reduces them (the hook)."""
        if task.received:
            return
        what = "low_latency_combine (receive)"
        state = task.state
        self._ll_check_hook(state, what)
        parity = task.seq & 1
        dropped = _ll_dropped(state, task.topk_idx)
        if self.ll is not None:
            self._ll_guard(lambda: self.ll.wait_signals(1, parity, task.seq, what))
            problem = _ll_disagreement(self.ll.headers(1, parity).tolist(), task.header, 8, "low_latency_combine")
            if problem:
                self.ll.ack(1, parity, task.seq)
                self._ll_finish(1, task)
                raise ValueError(problem)
            rows = self.ll.return_view(state.num_max_tokens, state.hidden, state.num_experts, parity)
            ops.weighted_reduce(task.result, [rows], task.result.dtype, dropped, _ll_selection_rows(state),
                                task.weights)
            self.ll.ack(1, parity, task.seq)
        else:
            ops.weighted_reduce(task.result, [task.arrived], task.result.dtype, dropped, task.arrived_row,
                                task.weights)
        if task.out is not None and task.out is not task.result:
            task.out.copy_(task.result)
        self._ll_finish(1, task)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Resets the low-latency signalling state (collective: call it on every rank).

        Args: Nmax, H, E of the calls to come; num_rdma_bytes must hold them (ValueError otherwise).
        Hooks of earlier calls can no longer run; results already received stay valid.
        """
        self._check_alive()
        if not self.low_latency_mode:
            raise RuntimeError("deep_ep: clean_low_latency_buffer needs a Buffer created with low_latency_mode=True")
        if self.npu_ll is not None:
            return npu.clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts)
        self._ll_check_sizes(num_max_dispatch_tokens_per_rank, hidden, num_experts)
        dist.barrier(group=self.comm)
        if self.ll is not None:
            self.ll.reset()
        dist.barrier(group=self.comm)
        self._ll_seq = [0, 0]
        self._ll_pending = [[None, None], [None, None]]
        self._ll_epoch += 1
        self._ll_broken = None

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
        if self.npu_ll is not None:  # NPU: MC2 dispatch + npu_grouped_matmul + ... (deep_ep/npu.py)
            fused.check_modes(quant_mode, fuse_mode)
            return npu.fused_deep_moe(self, x, topk_idx, topk_weights, gmm1_permuted_weight,
                                      gmm1_permuted_weight_scale, gmm2_weight, gmm2_weight_scale,
                                      num_max_dispatch_tokens_per_rank, num_experts, quant_mode)
        return fused.fused_deep_moe(self, x, topk_idx, topk_weights, gmm1_permuted_weight,
                                    gmm1_permuted_weight_scale, gmm2_weight, gmm2_weight_scale,
                                    num_max_dispatch_tokens_per_rank, num_experts, quant_mode, fuse_mode,
                                    profile_enable)

    # -- low-latency mode over all_to_all_single (strategy "alltoall", or more than one node) --
    def _ll_alltoall_dispatch(self, state: "LowLatencyState", x: torch.Tensor, counts: torch.Tensor) -> None:
        """Exchanges headers, counts and rows now; the hook packs them (_ll_alltoall_pack)."""
        what = "low_latency_dispatch"
        experts_per_rank = state.num_experts // self.group_size
        counts_to = counts.view(self.group_size, experts_per_rank)
        meta = alltoall_low_latency.exchange_headers(self.comm, state.header, counts_to, what)
        problem = _ll_disagreement(meta[:, :shm_low_latency.HEADER_WORDS].tolist(), state.header, 7, what)
        if problem:
            self._ll_pending[0][state.seq & 1] = None
            raise ValueError(problem)
        counts_from = meta[:, shm_low_latency.HEADER_WORDS: shm_low_latency.HEADER_WORDS + experts_per_rank]
        token, k, _, _ = layout.expert_major_entries(state.topk_idx, 0, state.num_experts)
        if state.quantized:
            q, scale = ops.quantize_int8(x)
            fields = [q, scale.view(-1, 1)]
        else:
            fields = [x]
        info = torch.stack([token, k], 1).to(torch.int32)
        send = torch.cat([as_byte_rows(f.index_select(0, token)) for f in fields] + [as_byte_rows(info)], 1)
        state.arrived = alltoall_low_latency.exchange(self.comm, send, counts_to.sum(1).tolist(),
                                                      counts_from.sum(1).tolist(), what)
        state.counts_from = counts_from.clone()

    def _ll_alltoall_pack(self, state: "LowLatencyState") -> None:
        layout.low_latency_recv_layout(state.counts_from.numpy(), state.layout_range.numpy(),
                                       state.recv_count.numpy())
        rows = layout.low_latency_arrival_rows(state.counts_from, state.layout_range)
        state.arrival_rows = rows
        arrived, recv = state.arrived, state.recv
        width = recv[0].shape[1] * recv[0].element_size()
        recv[0].view(torch.uint8).view(-1, width).index_copy_(0, rows, arrived[:, :width])
        if state.quantized:
            recv[1].view(torch.uint8).view(-1, 4).index_copy_(0, rows, arrived[:, width: width + 4])
        info = arrived[:, -8:].clone(memory_format=torch.contiguous_format).view(torch.int32)  # fresh storage: aligned
        sources = torch.repeat_interleave(torch.arange(self.group_size), state.counts_from.sum(1))
        state.src_info.fill_(-1)
        state.src_info[rows] = torch.cat([sources.to(torch.int32).view(-1, 1), info], 1)
        state.total = rows.numel()
        state.arrived = None

    def _ll_alltoall_combine(self, task: "LowLatencyCombine", x: torch.Tensor, total: int) -> None:
        what = "low_latency_combine"
        state = task.state
        meta = alltoall_low_latency.exchange_headers(self.comm, task.header,
                                                     torch.zeros(self.group_size, 1, dtype=torch.int64), what)
        problem = _ll_disagreement(meta[:, :shm_low_latency.HEADER_WORDS].tolist(), task.header, 8, what)
        if problem:
            self._ll_pending[1][task.seq & 1] = None
            raise ValueError(problem)
        experts_per_rank = state.num_experts // self.group_size
        _, counts = layout.low_latency_slots(state.topk_idx, state.num_experts)
        back = counts.view(self.group_size, experts_per_rank).sum(1).tolist()
        send = as_byte_rows(x).index_select(0, state.arrival_rows)
        task.arrived = alltoall_low_latency.exchange(self.comm, send, state.counts_from.sum(1).tolist(), back, what)
        token, k, _, _ = layout.expert_major_entries(state.topk_idx, 0, state.num_experts)
        position = torch.full((state.num_tokens * state.num_topk,), -1, dtype=torch.int64)
        position[token * state.num_topk + k] = torch.arange(token.numel())
        task.arrived_row = position.clamp_min(0).view(state.num_tokens, state.num_topk)

    # ---- layout ----------------------------------------------------------------------------------
    def _check_topk_idx(self, topk_idx: torch.Tensor, num_experts: int,
                        experts_name: str = "num_experts") -> None:
        check_tensor("topk_idx", topk_idx, dtypes=(topk_idx_t,), shape=(None, None))
        if not 1 <= topk_idx.shape[1] <= MAX_TOPK:
            raise ValueError(f"topk_idx must have 1 to {MAX_TOPK} columns (top-k), got {topk_idx.shape[1]}")
        if not isinstance(num_experts, int) or num_experts <= 0 or num_experts % self.group_size:
            raise ValueError(f"{experts_name} must be a positive multiple of the {self.group_size} ranks, "
                             f"got {num_experts!r}")
        if topk_idx.numel():
            low, high = int(topk_idx.min()), int(topk_idx.max())
            if low < -1 or high >= num_experts:
                raise ValueError(f"topk_idx values must lie in [-1, {num_experts}), got values in [{low}, {high}]")
            ordered = torch.sort(topk_idx, dim=1).values
            if bool(((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any()):
                raise ValueError("topk_idx: the experts of one token must be distinct (apart from -1)")

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event: Optional[EventOverlap] = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Counts the rows this rank will send.

        Args:
            topk_idx: int64 [T, K], values in [-1, num_experts).
            num_experts: E, a multiple of the group size.
        Returns:
            num_tokens_per_rank int32 [R], num_tokens_per_rdma_rank int32 [nodes] (None for one node),
            num_tokens_per_expert int32 [E], is_token_in_rank int32 [T, R], EventOverlap.
        """
        self._check_alive()
        self._check_topk_idx(topk_idx, num_experts)
        self._check_devices(topk_idx=topk_idx)
        per_rank, per_node, per_expert, in_rank = layout.dispatch_layout(
            topk_idx, num_experts, self.group_size, self.rank_to_node if self.num_nodes > 1 else None)
        return per_rank, per_node, per_expert, in_rank, EventOverlap()

    # ---- dispatch --------------------------------------------------------------------------------
    def _resolve_quant(self, quant_mode: Optional[str]) -> str:
        if quant_mode is not None:
            check_one_of("quant_mode", quant_mode, tuple(QUANT_CODES))
            return quant_mode
        return "int8" if _env_flag("DEEP_NORMAL_MODE_USE_INT8_QUANT") else "bf16"

    def _token_fields(self, x, quant: str) -> Tuple[List[torch.Tensor], List[Tuple[torch.dtype, int]], int, int]:
        """Splits x into byte-row fields; returns (fields, [(dtype, width)], hidden, dtype code)."""
        if isinstance(x, (tuple, list)):
            if len(x) != 2:
                raise ValueError(f"x as a pair must be (int8 [T, H], float32 scales [T]), got {len(x)} items")
            q = check_tensor("x[0]", x[0], dtypes=(torch.int8,), shape=(None, None))
            check_tensor("x[1]", x[1], dtypes=(torch.float32,), shape=(q.shape[0],))
            return [as_byte_rows(q), as_byte_rows(x[1])], [(torch.int8, q.shape[1]), (torch.float32, 1)], \
                q.shape[1], -1
        check_tensor("x", x, dtypes=FLOAT_DTYPES, shape=(None, None))
        if quant == "int8":
            q, scale = ops.quantize_int8(x)
            return [as_byte_rows(q), as_byte_rows(scale)], [(torch.int8, x.shape[1]), (torch.float32, 1)], \
                x.shape[1], NATIVE_DTYPE_CODES[x.dtype]
        return [as_byte_rows(x)], [(x.dtype, x.shape[1])], x.shape[1], NATIVE_DTYPE_CODES[x.dtype]

    def _check_buffer_fits(self, bytes_per_token: int, num_fields: int, what: str) -> None:
        if self.shm is None:
            return
        needed = shm.data_bytes_needed(1, bytes_per_token, num_fields)
        if shm.window_rows(self.num_nvl_bytes, bytes_per_token, num_fields) < 1:
            raise ValueError(f"num_nvl_bytes={self.num_nvl_bytes} is too small for {what}: one token row "
                             f"needs at least {needed} bytes; create the Buffer with num_nvl_bytes >= {needed}")

    def _empty(self, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised output: from the pool on CPU, a plain allocation on the Buffer's device otherwise."""
        if self.device_path:
            return torch.empty(*shape, dtype=dtype, device=self.device)
        return self.pool.empty(shape, dtype)

    def _check_devices(self, **tensors) -> None:
        """ValueError naming the first tensor that is not on the Buffer's device (CPU or this process's NPU)."""
        for name, tensor in tensors.items():
            for index, t in enumerate(tensor if isinstance(tensor, (tuple, list)) else [tensor]):
                if isinstance(t, torch.Tensor) and t.device != self.device:
                    shown = f"{name}[{index}]" if isinstance(tensor, (tuple, list)) else name
                    raise ValueError(f"{shown} must be on the Buffer's device {self.device}, got {t.device}")

    def dispatch(self, x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], handle: Optional[tuple] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_expert: Optional[torch.Tensor] = None, topk_idx: Optional[torch.Tensor] = None,
                 topk_weights: Optional[torch.Tensor] = None, expert_alignment: int = 1, num_worst_tokens: int = 0,
                 config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                 async_finish: bool = False, allocate_on_comm_stream: bool = False,
                 quant_mode: Optional[str] = None):
        """Sends every token to the ranks holding its top-k experts (normal mode).

        Args:
            x: [T, H] bfloat16/float16/float32, or an already quantized pair
                (int8 [T, H], float32 scales [T]) that is sent as is.
            handle: the handle of an earlier dispatch: cached mode, same routes, only x moves.
            num_tokens_per_expert: int32 [E] from get_dispatch_layout (gives E); other layout
                tensors are accepted for API compatibility.
            topk_idx: int64 [T, K] in [-1, E); topk_weights: float32 [T, K].
            expert_alignment: pad every expert's block to a multiple of it with zero rows.
            num_worst_tokens: if > 0, recv_x has exactly this many rows.
            quant_mode: None, "bf16" or "int8" (per-token dynamic int8).
        Returns:
            recv_x [N, H] (a pair (int8 [N, H], float32 [N]) with int8), recv_topk_idx int64 [N, K]
            (local expert ids, -1 elsewhere), recv_topk_weights float32 [N, K],
            num_recv_tokens_per_expert_list (L ints), handle, EventOverlap.
            Received rows are grouped by local expert, then source rank, then source token.
        """
        self._check_alive()
        quant = self._resolve_quant(quant_mode)
        if handle is not None:
            return self._cached_dispatch(x, handle, quant)
        if topk_idx is None or topk_weights is None:
            raise ValueError("dispatch needs topk_idx and topk_weights unless a handle is given")
        if num_tokens_per_expert is None:
            raise ValueError("dispatch needs num_tokens_per_expert (from get_dispatch_layout) unless a handle "
                             "is given")
        check_tensor("num_tokens_per_expert", num_tokens_per_expert, dtypes=(torch.int32, torch.int64),
                     shape=(None,))
        num_experts = num_tokens_per_expert.shape[0]
        host_idx = topk_idx.cpu()  # the routing math runs on the host (the same tensor on CPU)
        self._check_topk_idx(host_idx, num_experts, "num_experts (the length of num_tokens_per_expert)")
        num_tokens, num_topk = topk_idx.shape
        check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=(num_tokens, num_topk))
        self._check_devices(x=x, topk_idx=topk_idx, topk_weights=topk_weights)
        fields, kinds, hidden, dtype_code = self._token_fields(x, quant)
        if fields[0].shape[0] != num_tokens:
            raise ValueError(f"x must have {num_tokens} rows (as topk_idx), got {fields[0].shape[0]}")
        if is_token_in_rank is not None:
            check_tensor("is_token_in_rank", is_token_in_rank, dtypes=(torch.int32, torch.bool),
                         shape=(num_tokens, self.group_size))
        for name, value in (("expert_alignment", expert_alignment), ("num_worst_tokens", num_worst_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "expert_alignment" else 0):
                raise ValueError(f"{name} must be an int >= {1 if name == 'expert_alignment' else 0}, got {value!r}")
        tokens_per_expert = torch.bincount(host_idx[host_idx >= 0], minlength=num_experts)
        if not torch.equal(tokens_per_expert, num_tokens_per_expert.cpu().to(torch.int64)):
            raise ValueError("num_tokens_per_expert does not match topk_idx; pass the counts get_dispatch_layout "
                             "returned for this topk_idx")
        fields += [as_byte_rows(topk_idx), as_byte_rows(topk_weights)]
        kinds += [(torch.int64, num_topk), (torch.float32, num_topk)]
        self._check_buffer_fits(sum(f.shape[1] for f in fields), len(fields), "dispatch")
        quant_code = 1 if len(kinds) == 4 else 0
        header = torch.tensor([OP_DISPATCH, num_tokens, hidden, num_topk, num_experts, dtype_code, quant_code,
                               expert_alignment, num_worst_tokens], dtype=torch.int64)
        experts_per_rank = num_experts // self.group_size
        state_box = {}

        def decide(meta_all: torch.Tensor):
            problem = _disagreement(meta_all, HEADER_FIELDS, skip=(1,))
            if problem:
                raise ValueError(f"deep_ep dispatch: {problem}")
            plan = layout.plan_routing(host_idx, meta_all[:, len(HEADER_FIELDS):], self.rank, expert_alignment)
            if num_worst_tokens and int(plan.rows_per_rank.max()) > num_worst_tokens:
                over = [r for r, n in enumerate(plan.rows_per_rank.tolist()) if n > num_worst_tokens]
                raise ValueError(f"num_worst_tokens={num_worst_tokens} is too small: ranks {over} receive "
                                 f"{[int(plan.rows_per_rank[r]) for r in over]} rows")
            out_rows = num_worst_tokens or plan.num_recv_rows
            outs = [self._empty((out_rows, width), dtype) for dtype, width in kinds]
            src_rank = torch.full((out_rows,), -1, dtype=torch.int64)
            src_idx = torch.full((out_rows,), -1, dtype=torch.int64)
            state_box.update(plan=plan, outs=outs, src_rank=src_rank, src_idx=src_idx)
            already = torch.zeros(experts_per_rank, self.group_size, dtype=torch.int64)

            def routes(source: int, regions: List[torch.Tensor], begin: int, end: int):
                window_topk = regions[len(kinds) - 2][: end - begin].view(torch.int64)
                if len(regions) > len(kinds):  # rows forwarded from other nodes say where they come from
                    origin_rank = regions[-2][: end - begin].view(torch.int64).flatten()
                    origin_token = regions[-1][: end - begin].view(torch.int64).flatten()
                else:
                    origin_token = torch.arange(begin, end)
                    origin_rank = torch.full_like(origin_token, self.local_ranks[source])
                row, out_row, rank, token = plan.receive_rows(window_topk, origin_rank, origin_token, already)
                src_rank[out_row], src_idx[out_row] = rank, token
                return row + begin, out_row

            return [as_byte_rows(o) for o in outs], routes

        meta = torch.cat([header, tokens_per_expert])
        internode = None
        if self.shm is not None and self.num_nodes > 1:
            placement = decide(collective.all_gather_meta(self.comm, meta, "dispatch"))
            plan, outs = state_box["plan"], state_box["outs"]
            internode = self._dispatch_across_nodes(fields, topk_idx, placement, plan)
            rows_by_source = None
        elif self.shm is not None:
            shm.dispatch_rows(self.shm, meta, fields, decide)
            plan, outs = state_box["plan"], state_box["outs"]
            rows_by_source = None
        else:
            decide(collective.all_gather_meta(self.comm, meta, "dispatch"))
            plan, outs = state_box["plan"], state_box["outs"]
            rows_by_source = plan.rows_by_source()
            arrived = collective.dispatch_rows(self.data_comm, self.group_size, num_topk, fields,
                                               [as_byte_rows(o) for o in outs], plan.dest_rank, plan.dest_row,
                                               plan.recv_counts.sum(0).tolist(), rows_by_source)
            sources = torch.repeat_interleave(torch.arange(self.group_size), plan.recv_counts.sum(0))
            state_box["src_rank"][rows_by_source] = sources
            state_box["src_idx"][rows_by_source] = arrived
        src_rank, src_idx = state_box["src_rank"], state_box["src_idx"]
        self._zero_padding(outs, src_rank, topk_fill=True)
        recv_raw_topk, recv_topk_weights = outs[-2], outs[-1]
        recv_x = (outs[0], outs[1].view(-1)) if quant_code or isinstance(x, (tuple, list)) else outs[0]
        recv_topk_idx = layout.localize_topk_idx_(recv_raw_topk, self.rank, experts_per_rank)
        state = DispatchState(plan=plan, recv_src_rank=src_rank, recv_src_idx=src_idx,
                              num_out_rows=src_rank.numel(), num_tokens=num_tokens, hidden=hidden,
                              topk_idx=topk_idx, topk_weights=topk_weights, expert_alignment=expert_alignment,
                              num_worst_tokens=num_worst_tokens, internode=internode)
        if rows_by_source is not None:
            state.rows_by_source = rows_by_source
        handle = self._make_handle(state, host_idx)
        counts = plan.expert_rows
        if os.environ.get("MOE_EXPERT_TOKEN_NUMS_TYPE", "1").strip() == "0":
            counts = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0).tolist()
        return recv_x, recv_topk_idx, recv_topk_weights, counts, handle, EventOverlap()

    @staticmethod
    def _zero_padding(outs: List[torch.Tensor], src_rank: torch.Tensor, topk_fill: bool) -> None:
        """Padding rows (no source) are zero; their top-k ids are -1."""
        padding = (src_rank < 0).nonzero().flatten()
        if not padding.numel():
            return
        for index, out in enumerate(outs):
            is_topk_idx = topk_fill and index == len(outs) - 2
            out.index_fill_(0, padding.to(out.device), -1 if is_topk_idx else 0)

    def _dispatch_across_nodes(self, fields: List[torch.Tensor], topk_idx: torch.Tensor, placement: tuple,
                               plan: layout.RoutingPlan) -> InternodeState:
        """Hierarchical dispatch: each (token, node) pair crosses the network once, to the node's
        forwarder, which publishes it beside its own tokens in the node's shared memory.

        fields: uint8 row fields ending with topk_idx and topk_weights; placement: (output
        fields, routes) as decided for this rank."""
        num_tokens, num_topk = topk_idx.shape
        forwarding = hierarchical.plan_forwarding(self.comm, self.topology, topk_idx, plan.experts_per_rank)
        tokens = torch.arange(num_tokens)
        arrived = hierarchical.forward_rows(self.comm, forwarding, fields + [as_byte_rows(tokens)])
        forwarding.origin_token = arrived[-1].view(torch.int64).flatten()
        published = [torch.cat([own, far]) for own, far in zip(fields, arrived)]
        published.append(as_byte_rows(torch.cat([torch.full_like(tokens, self.rank), forwarding.origin_rank])))
        published.append(as_byte_rows(torch.cat([tokens, forwarding.origin_token])))
        node_header = torch.tensor([OP_DISPATCH, published[0].shape[0]], dtype=torch.int64)
        shm.dispatch_rows(self.shm, node_header, published, lambda _: placement)
        forwarded_topk = arrived[len(fields) - 2].view(torch.int64).view(-1, num_topk)
        # Destinations outside this node come out wrong here (the forwarder holds only the tokens
        # that touch its node) and are dropped by to_local.
        far_rank, far_row = plan.destinations(forwarded_topk, forwarding.origin_rank)
        selection_rank, selection_row = hierarchical.to_local(torch.cat([plan.dest_rank, far_rank]),
                                                              torch.cat([plan.dest_row, far_row]), self.topology)
        forwarded_weights = arrived[len(fields) - 1].view(torch.float32).view(-1, num_topk)
        return InternodeState(forwarding, forwarded_weights, selection_rank, selection_row)

    def _make_handle(self, state: DispatchState, topk_idx: torch.Tensor) -> tuple:
        plan = state.plan
        num_ranks = self.group_size
        dest = torch.where(topk_idx >= 0, topk_idx // plan.experts_per_rank, torch.full_like(topk_idx, num_ranks))
        in_rank = torch.zeros(topk_idx.shape[0], num_ranks + 1, dtype=torch.int32).scatter_(1, dest, 1)
        return (plan.rank_prefix_matrix(),
                plan.block_start[self.rank].t().contiguous().to(torch.int32),  # [R, L] block starts
                torch.cumsum(torch.tensor(plan.expert_rows, dtype=torch.int64), 0).to(torch.int32),
                state.recv_src_idx.to(torch.int32),
                in_rank[:, :num_ranks].contiguous(),
                plan.recv_counts.to(torch.int32),
                state.topk_idx,
                state.topk_weights,
                state)

    @staticmethod
    def _state_of(handle) -> DispatchState:
        if not isinstance(handle, tuple) or len(handle) < 9 or not isinstance(handle[8], DispatchState):
            raise TypeError("handle must be the handle returned by Buffer.dispatch")
        return handle[8]

    def _cached_dispatch(self, x, handle: tuple, quant: str):
        state = self._state_of(handle)
        if state.internode is not None:
            # Across nodes the forwarders need the top-k to place rows: a dispatch with the handle's
            # routing lands every row where the first one did.
            recv_x = self.dispatch(x, num_tokens_per_expert=state.plan.tokens_per_expert_all[self.rank],
                                   topk_idx=state.topk_idx, topk_weights=state.topk_weights,
                                   expert_alignment=state.expert_alignment, num_worst_tokens=state.num_worst_tokens,
                                   quant_mode=quant)[0]
            return recv_x, None, None, None, None, EventOverlap()
        fields, kinds, hidden, dtype_code = self._token_fields(x, quant)
        if fields[0].shape[0] != state.num_tokens:
            raise ValueError(f"x must have {state.num_tokens} rows (the handle's tokens), got {fields[0].shape[0]}")
        self._check_buffer_fits(sum(f.shape[1] for f in fields), len(fields), "dispatch")
        plan = state.plan
        header = torch.tensor([OP_CACHED_DISPATCH, state.num_tokens, hidden, 0, plan.num_experts, dtype_code,
                               1 if len(kinds) == 2 else 0, 0, state.num_out_rows], dtype=torch.int64)
        self._check_devices(x=x)
        outs = [self._empty((state.num_out_rows, width), dtype) for dtype, width in kinds]
        out_bytes = [as_byte_rows(o) for o in outs]

        def check(meta_all: torch.Tensor) -> None:
            problem = _disagreement(meta_all, HEADER_FIELDS, skip=(1, 8))
            if problem:
                raise ValueError(f"deep_ep dispatch (cached): {problem}")

        if self.shm is not None:
            real = (state.recv_src_rank >= 0).nonzero().flatten()
            by_source = {r: real[state.recv_src_rank[real] == r] for r in self.local_ranks}

            def decide(meta_all: torch.Tensor):
                check(meta_all)

                def routes(source: int, regions, begin: int, end: int):
                    rows = by_source[self.local_ranks[source]]
                    token = state.recv_src_idx[rows]
                    keep = (token >= begin) & (token < end)
                    return token[keep], rows[keep]

                return out_bytes, routes

            shm.dispatch_rows(self.shm, header, fields, decide)
        else:
            check(collective.all_gather_meta(self.comm, header, "dispatch (cached)"))
            collective.dispatch_rows(self.data_comm, self.group_size, state.topk_idx.shape[1], fields, out_bytes,
                                     plan.dest_rank, plan.dest_row, plan.recv_counts.sum(0).tolist(),
                                     state.rows_by_source)
        self._zero_padding(outs, state.recv_src_rank, topk_fill=False)
        recv_x = (outs[0], outs[1].view(-1)) if len(outs) == 2 else outs[0]
        return recv_x, None, None, None, None, EventOverlap()

    # ---- combine ---------------------------------------------------------------------------------
    def combine(self, x: torch.Tensor, handle: tuple, topk_weights: Optional[torch.Tensor] = None,
                bias: Union[None, torch.Tensor, Tuple[torch.Tensor, torch.Tensor]] = None,
                config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Returns expert outputs to their tokens and sums them with the routing weights.

        Args:
            x: [N, H] bfloat16/float16/float32 expert outputs in the received layout.
            handle: from dispatch.
            topk_weights: float32 [T, K] of this rank's tokens; default: the weights sent at dispatch.
            bias: None, a [T, H] tensor or a pair of them, added to the result.
        Returns:
            (combined_x [T, H] in x's dtype, None, EventOverlap). combined_x[t] = sum over k with
            topk_idx[t, k] != -1 of w[t, k] * x[row(t, k)], accumulated in float32 in k order.
        """
        self._check_alive()
        state = self._state_of(handle)
        plan = state.plan
        check_tensor("x", x, dtypes=FLOAT_DTYPES, shape=(state.num_out_rows, state.hidden))
        num_tokens, num_topk = state.topk_idx.shape
        weights = state.topk_weights if topk_weights is None else topk_weights
        check_tensor("topk_weights", weights, dtypes=(torch.float32,), shape=(num_tokens, num_topk))
        biases = list(bias) if isinstance(bias, (tuple, list)) else [bias] if bias is not None else []
        if len(biases) > 2:
            raise ValueError(f"bias must be a tensor or a pair of tensors, got {len(biases)} items")
        for i, b in enumerate(biases):
            check_tensor(f"bias[{i}]", b, dtypes=FLOAT_DTYPES, shape=(num_tokens, state.hidden))
        self._check_buffer_fits(state.hidden * x.element_size(), 1, "combine")
        self._check_devices(x=x, topk_weights=weights, bias=biases)
        x = x.contiguous()
        out = self._empty((num_tokens, state.hidden), x.dtype)
        header = torch.tensor([OP_COMBINE, num_tokens, state.hidden, num_topk, plan.num_experts,
                               NATIVE_DTYPE_CODES[x.dtype], 0, 0, state.num_out_rows], dtype=torch.int64)

        def check(meta_all: torch.Tensor) -> None:
            problem = _disagreement(meta_all, HEADER_FIELDS, skip=(1, 8))
            if problem:
                raise ValueError(f"deep_ep combine: {problem}")

        def reduce(sources: List[torch.Tensor], src_rank: torch.Tensor, src_row: torch.Tensor) -> None:
            ops.weighted_reduce(out, sources, x.dtype, src_rank, src_row, weights, biases)

        x_rows = as_byte_rows(x)
        if state.internode is not None:
            check(collective.all_gather_meta(self.comm, header, "combine"))
            internode = state.internode
            forwarded_weights = internode.forwarded_weights
            if topk_weights is not None:  # the forwarders sum with the owner's new weights
                forwarded_weights = hierarchical.forward_rows(self.comm, internode.forwarding, [as_byte_rows(weights)],
                                                              "combine")[0].view(torch.float32)
                forwarded_weights = forwarded_weights.view(-1, num_topk)
            reduce = hierarchical.hierarchical_reduce(self.comm, self.topology, internode.forwarding, out, x.dtype,
                                                      weights, forwarded_weights, biases)
            shm.combine_rows(self.shm, header, lambda _: None, x_rows,
                             [int(plan.rows_per_rank[r]) for r in self.local_ranks], internode.selection_rank,
                             internode.selection_row, reduce)
        elif self.shm is not None:
            shm.combine_rows(self.shm, header, check, x_rows, plan.rows_per_rank.tolist(), plan.dest_rank,
                             plan.dest_row, reduce)
        else:
            check(collective.all_gather_meta(self.comm, header, "combine"))
            collective.combine_rows(self.data_comm, self.group_size, x_rows, state.rows_by_source,
                                    plan.recv_counts.sum(0).tolist(), plan.dest_rank, plan.dest_row, reduce)
        return out, None, EventOverlap()


# ---- low-latency mode: per-call state ----------------------------------------------------------------------
LL_FORMAT_INT8 = 3  # header format code of int8 rows (16-bit rows use NATIVE_DTYPE_CODES)
LL_FORMAT_NAMES = {0: "float32", 1: "bfloat16", 2: "float16", LL_FORMAT_INT8: "int8"}
LL_HEADER_FIELDS = ("call number", "status", "num_max_dispatch_tokens_per_rank", "num_experts", "hidden",
                    "num_topk", "format", "num_tokens")


@dataclass
class LowLatencyState:
    """What the hook, low_latency_combine and the handle need from one low_latency_dispatch."""

    seq: int  # dispatch call number, the same on every rank
    epoch: int
    header: List[int]
    num_max_tokens: int
    hidden: int
    num_experts: int
    num_topk: int
    num_tokens: int
    num_rows: int  # M
    quantized: bool
    dtype: torch.dtype  # dtype of combine's x
    topk_idx: torch.Tensor
    topk_weights: Optional[torch.Tensor]
    src_info: torch.Tensor  # int32 [M, 3]
    layout_range: torch.Tensor  # int64 [L * R]
    recv_count: torch.Tensor  # int64 [L]
    stats: Optional[torch.Tensor]
    recv: tuple = ()
    received: bool = False
    # collective transport only
    arrived: Optional[torch.Tensor] = None
    counts_from: Optional[torch.Tensor] = None
    arrival_rows: Optional[torch.Tensor] = None
    selection_rows: Optional[torch.Tensor] = None
    dropped: Optional[torch.Tensor] = None
    total: int = 0  # received rows, recv_count.sum()


@dataclass
class LowLatencyCombine:
    state: LowLatencyState
    seq: int
    header: List[int]
    topk_idx: torch.Tensor
    weights: torch.Tensor
    result: torch.Tensor
    out: Optional[torch.Tensor]
    received: bool = False
    arrived: Optional[torch.Tensor] = None
    arrived_row: Optional[torch.Tensor] = None


def _ll_state_of(handle) -> LowLatencyState:
    if not isinstance(handle, tuple) or len(handle) < 8 or not isinstance(handle[7], LowLatencyState):
        raise TypeError("handle must be the handle returned by Buffer.low_latency_dispatch")
    return handle[7]


def _ll_dropped(state: LowLatencyState, topk_idx: torch.Tensor) -> torch.Tensor:
    """int32 [T, K]: -1 where topk_idx has no expert, else 0 (the one source of the reduction)."""
    if topk_idx is not state.topk_idx:
        return (topk_idx < 0).to(torch.int32).neg_()
    if state.dropped is None:
        state.dropped = (topk_idx < 0).to(torch.int32).neg_()
    return state.dropped


def _ll_selection_rows(state: LowLatencyState) -> torch.Tensor:
    """int64 [T, K]: the combine row of selection (t, k), t * K + k."""
    if state.selection_rows is None:
        state.selection_rows = torch.arange(state.num_tokens * state.num_topk).view(state.num_tokens,
                                                                                    state.num_topk)
    return state.selection_rows


def _ll_disagreement(headers: List[List[int]], mine: List[int], compared: int, what: str) -> Optional[str]:
    """Why the ranks' headers (one per source rank) do not allow this call, or None."""
    expected = mine[:compared]
    if all(h[:compared] == expected for h in headers):
        return None
    rejected = [r for r, h in enumerate(headers) if h[1] != 0]
    if rejected:
        details = []
        for r in rejected:
            h = headers[r]
            if what == "low_latency_dispatch" and h[2] >= 0 and h[7] > h[2]:
                details.append(f"rank {r} has {h[7]} tokens > num_max_dispatch_tokens_per_rank {h[2]}")
        more = f" ({'; '.join(details)})" if details else ""
        return (f"deep_ep {what}: ranks {rejected} rejected their arguments{more}; no data moved. "
                "See the error raised on those ranks.")
    for index in range(compared):
        column = [h[index] for h in headers]
        if any(v != mine[index] for v in column):
            name = LL_HEADER_FIELDS[index] if not (what == "low_latency_combine" and index == 7) else \
                "the dispatch handle (call number)"
            shown = [LL_FORMAT_NAMES.get(v, v) for v in column] if index == 6 and what == "low_latency_dispatch" \
                else column
            values = ", ".join(f"rank {r}: {v}" for r, v in enumerate(shown))
            return f"deep_ep {what}: ranks disagree on {name} ({values})"
    return None
