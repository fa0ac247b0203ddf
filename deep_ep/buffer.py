"""deep_ep.Buffer: DeepEP-Ascend's expert-parallel API over CPU and NPU transports.

The Buffer checks arguments, picks a transport and shapes results; the routing
itself is computed in `layout.py` and the bytes are moved by `transport/`.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import layout, ops
from .config import Config
from .pool import OutputPool
from .transport import collective, shm
from .transport.fields import as_byte_rows
from .utils import (FLOAT_DTYPES, NATIVE_DTYPE_CODES, EventOverlap, check_one_of, check_tensor,
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
    rows_by_source: torch.Tensor  # int64 [real rows]: received rows in arrival (source) order
    num_out_rows: int
    num_tokens: int
    hidden: int
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor


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
            (torch.distributed all_to_all_single for everything).
        low_latency_strategy: "default", "alltoall" or "ops" (NPU only).
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
        if self.backend != "gloo":
            raise ValueError(f"group backend must be 'gloo' for CPU ranks, got {self.backend!r} "
                             "(the NPU path needs torch_npu and an 'hccl' group)")
        if low_latency_strategy == "ops":
            raise ValueError("low_latency_strategy='ops' (DEEP_USE_MODE=ops) needs torch_npu and CANN's MC2 "
                             "operators; on CPU use 'default' or 'alltoall'")
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
        self.rank_to_node = self._discover_nodes()
        self.node = int(self.rank_to_node[self.rank])
        self.local_ranks = (self.rank_to_node == self.node).nonzero().flatten().tolist()
        self.shm: Optional[shm.NodeShm] = None
        if normal_strategy == "default" and self.num_nodes == 1:
            self.shm = shm.NodeShm(self.comm, self.local_ranks, self.num_nvl_bytes, "deep_ep normal mode")
        self.pool = OutputPool()
        self.destroyed = False

    # ---- topology --------------------------------------------------------------------------------
    def _discover_nodes(self) -> torch.Tensor:
        per_node = os.environ.get("DEEP_EP_RANKS_PER_NODE")
        if per_node:
            if not per_node.isdigit() or int(per_node) < 1:
                raise ValueError(f"DEEP_EP_RANKS_PER_NODE must be a positive integer, got {per_node!r}")
            return torch.arange(self.group_size) // int(per_node)
        hosts: List[Optional[str]] = [None] * self.group_size
        dist.all_gather_object(hosts, _host_identity(), group=self.comm)
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
        self.pool.clear()
        self.destroyed = True

    def __del__(self) -> None:
        shm_node = getattr(self, "shm", None)
        if shm_node is not None:
            shm_node.close()

    def _check_alive(self) -> None:
        if self.destroyed:
            raise RuntimeError("deep_ep: this Buffer was destroyed; create a new one")

    # ---- layout ----------------------------------------------------------------------------------
    def _check_topk_idx(self, topk_idx: torch.Tensor, num_experts: int) -> None:
        check_tensor("topk_idx", topk_idx, dtypes=(topk_idx_t,), shape=(None, None))
        if not 1 <= topk_idx.shape[1] <= MAX_TOPK:
            raise ValueError(f"topk_idx must have 1 to {MAX_TOPK} columns (top-k), got {topk_idx.shape[1]}")
        if not isinstance(num_experts, int) or num_experts <= 0 or num_experts % self.group_size:
            raise ValueError(f"num_experts must be a positive multiple of the {self.group_size} ranks, "
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
        self._check_topk_idx(topk_idx, num_experts)
        num_tokens, num_topk = topk_idx.shape
        check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=(num_tokens, num_topk))
        fields, kinds, hidden, dtype_code = self._token_fields(x, quant)
        if fields[0].shape[0] != num_tokens:
            raise ValueError(f"x must have {num_tokens} rows (as topk_idx), got {fields[0].shape[0]}")
        if is_token_in_rank is not None:
            check_tensor("is_token_in_rank", is_token_in_rank, dtypes=(torch.int32, torch.bool),
                         shape=(num_tokens, self.group_size))
        for name, value in (("expert_alignment", expert_alignment), ("num_worst_tokens", num_worst_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "expert_alignment" else 0):
                raise ValueError(f"{name} must be an int >= {1 if name == 'expert_alignment' else 0}, got {value!r}")
        tokens_per_expert = torch.bincount(topk_idx[topk_idx >= 0], minlength=num_experts)
        if not torch.equal(tokens_per_expert, num_tokens_per_expert.to(torch.int64)):
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
            plan = layout.plan_routing(topk_idx, meta_all[:, len(HEADER_FIELDS):], self.rank, expert_alignment)
            if num_worst_tokens and int(plan.rows_per_rank.max()) > num_worst_tokens:
                over = [r for r, n in enumerate(plan.rows_per_rank.tolist()) if n > num_worst_tokens]
                raise ValueError(f"num_worst_tokens={num_worst_tokens} is too small: ranks {over} receive "
                                 f"{[int(plan.rows_per_rank[r]) for r in over]} rows")
            out_rows = num_worst_tokens or plan.num_recv_rows
            outs = [self.pool.empty((out_rows, width), dtype) for dtype, width in kinds]
            src_rank = torch.full((out_rows,), -1, dtype=torch.int64)
            src_idx = torch.full((out_rows,), -1, dtype=torch.int64)
            state_box.update(plan=plan, outs=outs, src_rank=src_rank, src_idx=src_idx)
            already = torch.zeros(self.group_size, experts_per_rank, dtype=torch.int64)

            def routes(source: int, regions: List[torch.Tensor], begin: int, end: int):
                window_topk = regions[-2][: end - begin].view(torch.int64)
                token, _, expert = layout.expert_major_entries(window_topk, self.rank * experts_per_rank,
                                                              (self.rank + 1) * experts_per_rank)
                rank = self.local_ranks[source]
                rows = plan.receive_positions(rank, expert, already[rank])
                already[rank] += torch.bincount(expert - self.rank * experts_per_rank, minlength=experts_per_rank)
                token = token + begin
                src_rank[rows], src_idx[rows] = rank, token
                return token, rows

            return [as_byte_rows(o) for o in outs], routes

        meta = torch.cat([header, tokens_per_expert])
        if self.shm is not None:
            shm.dispatch_rows(self.shm, meta, fields, decide)
            plan, outs = state_box["plan"], state_box["outs"]
            rows_by_source = plan.rows_by_source()
        else:
            decide(collective.all_gather_meta(self.comm, meta))
            plan, outs = state_box["plan"], state_box["outs"]
            rows_by_source = plan.rows_by_source()
            arrived = collective.dispatch_rows(self.comm, self.group_size, num_topk, fields,
                                               [as_byte_rows(o) for o in outs], plan.dest_rank, plan.dest_row,
                                               plan.recv_counts.sum(0).tolist(), rows_by_source)
            sources = torch.repeat_interleave(torch.arange(self.group_size), plan.recv_counts.sum(0))
            state_box["src_rank"][rows_by_source] = sources
            state_box["src_idx"][rows_by_source] = arrived
        src_rank, src_idx = state_box["src_rank"], state_box["src_idx"]
        self._zero_padding(outs, src_rank, topk_fill=True)
        recv_raw_topk, recv_topk_weights = outs[-2], outs[-1]
        recv_x = (outs[0], outs[1].view(-1)) if quant_code or isinstance(x, (tuple, list)) else outs[0]
        recv_topk_idx = layout.local_topk_idx(recv_raw_topk, self.rank, experts_per_rank)
        state = DispatchState(plan=plan, recv_src_rank=src_rank, recv_src_idx=src_idx,
                              rows_by_source=rows_by_source, num_out_rows=src_rank.numel(), num_tokens=num_tokens,
                              hidden=hidden, topk_idx=topk_idx, topk_weights=topk_weights)
        handle = self._make_handle(state, topk_idx)
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
            out.index_fill_(0, padding, -1 if is_topk_idx else 0)

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
        fields, kinds, hidden, dtype_code = self._token_fields(x, quant)
        if fields[0].shape[0] != state.num_tokens:
            raise ValueError(f"x must have {state.num_tokens} rows (the handle's tokens), got {fields[0].shape[0]}")
        self._check_buffer_fits(sum(f.shape[1] for f in fields), len(fields), "dispatch")
        plan = state.plan
        header = torch.tensor([OP_CACHED_DISPATCH, state.num_tokens, hidden, 0, plan.num_experts, dtype_code,
                               1 if len(kinds) == 2 else 0, 0, state.num_out_rows], dtype=torch.int64)
        outs = [self.pool.empty((state.num_out_rows, width), dtype) for dtype, width in kinds]
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
            check(collective.all_gather_meta(self.comm, header))
            collective.dispatch_rows(self.comm, self.group_size, state.topk_idx.shape[1], fields, out_bytes,
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
        x = x.contiguous()
        out = self.pool.empty((num_tokens, state.hidden), x.dtype)
        header = torch.tensor([OP_COMBINE, num_tokens, state.hidden, num_topk, plan.num_experts,
                               NATIVE_DTYPE_CODES[x.dtype], 0, 0, state.num_out_rows], dtype=torch.int64)

        def check(meta_all: torch.Tensor) -> None:
            problem = _disagreement(meta_all, HEADER_FIELDS, skip=(1, 8))
            if problem:
                raise ValueError(f"deep_ep combine: {problem}")

        def reduce(sources: List[torch.Tensor], src_rank: torch.Tensor, src_row: torch.Tensor) -> None:
            ops.weighted_reduce(out, sources, x.dtype, src_rank, src_row, weights, biases)

        x_rows = as_byte_rows(x)
        if self.shm is not None:
            shm.combine_rows(self.shm, header, check, x_rows, plan.rows_per_rank.tolist(), plan.dest_rank,
                             plan.dest_row, reduce)
        else:
            check(collective.all_gather_meta(self.comm, header))
            collective.combine_rows(self.comm, self.group_size, x_rows, state.rows_by_source,
                                    plan.recv_counts.sum(0).tolist(), plan.dest_rank, plan.dest_row, reduce)
        return out, None, EventOverlap()
