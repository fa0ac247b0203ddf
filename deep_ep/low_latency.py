"""Low-latency mode (decode): the runtime's low_latency_dispatch / low_latency_combine calls (used by
the low-latency strategies, deep_ep/strategies/low_latency_strategy.py, whose transports move the
rows) and clean_low_latency_buffer, with their receive hooks.

Fixed-size buffers, no host-side layout step, at most two results of each kind in flight (double
buffering, calls numbered the same on every rank). Strategy "default" on one node uses
transport/shm_low_latency.py (senders write rows into fixed slots of the receivers' shared memory
and bump a counter; the receive step waits for the counters and packs expert-major); "alltoall"
and more than one node use transport/alltoall_low_latency.py. Both give the same bits. On NPU the
calls go to CANN's MC2 operators (deep_ep/npu/). `LowLatencyMode` is `runtime.low_latency` of a Buffer's
runtime (deep_ep/runtime.py).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional, Protocol, Union

import torch
import torch.distributed as dist

from . import env, layout, npu
from .transport import collective, groups, shm_low_latency
from .transport.shm import SharedMemoryExhausted
from .utils import (
    FLOAT_DTYPES,
    NATIVE_DTYPE_CODES,
    EventOverlap,
    check_combine_topk_idx,
    check_low_latency_x,
    check_num_topk,
    check_positive_int,
    check_tensor,
    resolve_quant_mode,
    topk_idx_t,
)

if TYPE_CHECKING:
    from .runtime import Runtime

LL_FORMAT_INT8 = 3  # header format code of int8 rows (16-bit rows use NATIVE_DTYPE_CODES)
LL_FORMAT_NAMES = {0: "float32", 1: "bfloat16", 2: "float16", LL_FORMAT_INT8: "int8"}
LL_HEADER_FIELDS = (
    "call number",
    "status",
    "num_max_dispatch_tokens_per_rank",
    "num_experts",
    "hidden",
    "num_topk",
    "format",
    "num_tokens",
)
# Per call kind (0: dispatch, 1: combine): its name in messages, and how many leading header words every
# rank must agree on (dispatch: all but num_tokens; combine: all, the last being the dispatch's call number).
LL_KINDS = ("low_latency_dispatch", "low_latency_combine")
LL_COMPARED = (7, 8)
# low_latency_combine's sums, on every strategy: float32, each product and add rounded
# (docs/low_latency_data_path.md, "The reduction").
# Normal mode sums in float64, which its hierarchical transport's per-node partial sums need.
LL_SUMS = torch.float32


class LowLatencyTransport(Protocol):
    """How one low-latency strategy moves rows (deep_ep/strategies/low_latency_strategy.py): shared
    memory slots or all_to_all_single. `runtime` is the LowLatencyMode that numbers the calls."""

    ll: Optional[shm_low_latency.LowLatencyShm]  # the node's slots, or None (all_to_all_single)

    def reject(self, runtime: "LowLatencyMode", kind: int, seq: int, header: List[int], what: str) -> None:
        """Tells the peers that this rank rejected call `seq` of `kind` (they raise instead of waiting)."""

    def send_dispatch(
        self,
        runtime: "LowLatencyMode",
        state: "LowLatencyState",
        x: torch.Tensor,
        slot: torch.Tensor,
        counts: torch.Tensor,
        what: str,
    ) -> None:
        """Sends this rank's selections of a dispatch."""

    def receive_dispatch(self, runtime: "LowLatencyMode", state: "LowLatencyState") -> None:
        """Waits for every source's rows and packs them expert-major into state.recv."""

    def send_combine(self, runtime: "LowLatencyMode", task: "LowLatencyCombine", x: torch.Tensor, what: str) -> None:
        """Sends the expert outputs of the received rows back to their tokens' ranks."""

    def receive_combine(self, runtime: "LowLatencyMode", task: "LowLatencyCombine", dropped: torch.Tensor) -> None:
        """Waits for every holder's rows and reduces them into task.result."""


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
    slot: torch.Tensor  # int64 [T, K]: each selection's slot in its expert's block (layout.low_latency_slots)
    layout_range: torch.Tensor  # int64 [L * R]
    recv_count: torch.Tensor  # int64 [L]
    stats: Optional[torch.Tensor]
    transport: Any = None  # the LowLatencyTransport that moves the call's rows
    recv_count_out: Optional[torch.Tensor] = None  # recv_count as returned (prefix sums: expert_token_nums_type 0)
    recv: tuple = ()
    received: bool = False
    # collective transport only
    arrived: Optional[torch.Tensor] = None
    counts_from: Optional[torch.Tensor] = None
    arrival_rows: Optional[torch.Tensor] = None
    dropped: Optional[torch.Tensor] = None
    total: int = 0  # received rows, recv_count.sum()
    # With shared-expert ranks: the placement; topk_idx / num_experts / num_topk above are then the
    # transports' virtual ones (layout.SharedExperts), the handle shows the caller's.
    shared: Optional[layout.SharedExperts] = None
    public_experts: int = 0  # num_experts as the caller gave it (the handle's)
    local_experts: int = 0  # experts of this rank as the caller sees them (1 on a shared-expert rank)


@dataclass
class LowLatencyCombine:
    """One low_latency_combine call, for its hook."""

    state: LowLatencyState
    seq: int
    header: List[int]
    topk_idx: torch.Tensor
    weights: torch.Tensor
    result: torch.Tensor
    out: Optional[torch.Tensor]
    # The receive runs inside the call (no return_recv_hook): x cannot change before it, so the shared
    # memory transport leaves this rank's own rows in x instead of copying them.
    immediate: bool = False
    received: bool = False
    arrived: Optional[torch.Tensor] = None
    arrived_row: Optional[torch.Tensor] = None
    # shared-memory transport, immediate calls only: x, and int64 [T * K] its row of each own selection (-1: none)
    x: Optional[torch.Tensor] = None
    own_rows: Optional[torch.Tensor] = None


LowLatencyCall = Union[LowLatencyState, LowLatencyCombine]


def _dropped(state: LowLatencyState, topk_idx: torch.Tensor) -> torch.Tensor:
    """int32 [T, K]: -1 where topk_idx has no expert, else 0 (the one source of the reduction)."""
    if topk_idx is not state.topk_idx:
        return (topk_idx < 0).to(torch.int32).neg_()
    if state.dropped is None:
        state.dropped = (topk_idx < 0).to(torch.int32).neg_()
    return state.dropped


def ll_disagreement(headers: List[List[int]], mine: List[int], compared: int, what: str) -> Optional[str]:
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
        return (
            f"deep_ep {what}: ranks {rejected} rejected their arguments{more}; no data moved. "
            "See the error raised on those ranks."
        )
    for index in range(compared):
        column = [h[index] for h in headers]
        if any(v != mine[index] for v in column):
            name = (
                LL_HEADER_FIELDS[index]
                if not (what == "low_latency_combine" and index == 7)
                else "the dispatch handle (call number)"
            )
            shown = (
                [LL_FORMAT_NAMES.get(v, v) for v in column] if index == 6 and what == "low_latency_dispatch" else column
            )
            values = ", ".join(f"rank {r}: {v}" for r, v in enumerate(shown))
            return f"deep_ep {what}: ranks disagree on {name} ({values})"
    return None


class LowLatencyMode:
    """The low-latency calls of one Buffer's runtime (`runtime.low_latency`): call numbering, checks,
    hooks and the node's low-latency shared memory. The strategies call ll_dispatch / ll_combine with
    the transport that moves the rows; fused_deep_moe and the NPU backend use the same call protocol
    (ready, begin, reject_dispatch, ll_guard, ll_finish)."""

    def __init__(self, runtime: "Runtime") -> None:
        # A proxy: the runtime owns this object (a strong reference back would be a cycle).
        self.runtime = weakref.proxy(runtime)
        self.ll: Optional[shm_low_latency.LowLatencyShm] = None
        self.npu_ll = None  # NPU: CANN's MC2 operators on a dedicated HCCL group (deep_ep/npu/operators.py)
        self._seq = [0, 0]  # calls so far per kind (dispatch, combine); equal on every rank
        self._pending: List[List[Optional[int]]] = [[None, None], [None, None]]  # [kind][parity] -> seq
        self._recv: List[Optional[tuple]] = [None, None]  # per parity: (key, recv tensors)
        self._epoch = 0  # bumped by clean_low_latency_buffer: older hooks refuse to run
        self._broken: Optional[str] = None
        self._fits: set = set()
        if not runtime.low_latency_mode:
            return
        sizes: List[Optional[int]] = [None] * runtime.group_size
        collective.run_collective(
            runtime.comm,
            groups.CONSTRUCTION,
            lambda: dist.all_gather_object(sizes, runtime.num_rdma_bytes, group=runtime.comm),
        )
        if len(set(sizes)) > 1:
            raise ValueError(f"num_rdma_bytes must be the same on every rank, got {sizes} (by rank)")
        if runtime.on_npu:
            self.npu_ll = npu.create_low_latency(runtime)

    def close(self) -> None:
        """Unmaps the low-latency shared memory and frees the NPU's dedicated communicator."""
        if self.ll is not None:
            self.ll.close()
            self.ll = None
        if self.npu_ll is not None:
            npu.destroy_low_latency(self.npu_ll)
            self.npu_ll = None

    def shm(self) -> Optional[shm_low_latency.LowLatencyShm]:
        """The node's low-latency shared memory (mapped on first use: collective, every rank calls it
        when building a "default" low-latency strategy), or None where there is none: several nodes,
        low_latency_mode=False or the NPU path. num_rdma_bytes=0 sizes it by the calls (docs/memory.md)."""
        if (
            self.ll is None
            and self.runtime.low_latency_mode
            and self.runtime.num_nodes == 1
            and not self.runtime.on_npu
        ):
            self.ll = shm_low_latency.LowLatencyShm(
                self.runtime.comm, self.runtime.local_ranks, self.runtime.num_rdma_bytes, self.runtime.setup_operation
            )
        return self.ll

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
    ) -> int:
        """Bytes of `num_rdma_bytes` that low-latency mode needs (the real size, not a placeholder).

        Args:
            num_max_dispatch_tokens_per_rank: Nmax, the most tokens any rank dispatches in one call.
            hidden: H. num_ranks: R, ranks in the group. num_experts: E, a multiple of R.
        Returns: control words and mailboxes for R ranks plus, twice (double buffering), E * Nmax
            dispatch slots of 8 bytes, Nmax token rows of 2H bytes with a float32 scale each, and
            Nmax * 17 combine rows of 2H bytes. With MOE_SHARED_EXPERT_RANK_NUM = S > 0 the slots are
            for R * ceil(E / (R - S)) experts (E may count the shared expert or not).
        """
        for name, value in (
            ("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank),
            ("hidden", hidden),
            ("num_ranks", num_ranks),
            ("num_experts", num_experts),
        ):
            check_positive_int(name, value)
        shared = env.shared_expert_rank_num()
        if not shared and num_experts % num_ranks:
            raise ValueError(f"num_experts must be a multiple of num_ranks, got {num_experts} and {num_ranks}")
        return shm_low_latency.bytes_needed(
            num_max_dispatch_tokens_per_rank, hidden, num_ranks, layout.hint_experts(num_experts, num_ranks, shared)
        )

    # ---- call bookkeeping (also used by fused.py and npu/backend.py) -----------------------------------------
    def _check_runtime(self) -> None:
        if self.ll is None or self.runtime.destroyed:  # the shared-memory path uses neither NodeShm nor the group
            self.runtime.check_alive()

    def ready(self, what: str) -> None:
        self._check_runtime()
        if not self.runtime.low_latency_mode:
            raise RuntimeError(f"deep_ep: {what} needs a Buffer created with low_latency_mode=True")
        if self._broken:
            raise RuntimeError(self._broken)

    def check_sizes(
        self, num_max_tokens, hidden: int, num_experts, ll: Optional[shm_low_latency.LowLatencyShm] = None
    ) -> layout.SharedExperts:
        """Nmax / E are ints, E a multiple of the expert-holding ranks, and num_rdma_bytes holds the
        layout (ValueError naming the size). Returns the expert placement (MOE_SHARED_EXPERT_RANK_NUM).
        num_rdma_bytes=0, which upstream accepts, needs no room: the calls go over all_to_all_single."""
        roles = layout.SharedExperts.check(num_experts, self.runtime.group_size, env.shared_expert_rank_num())
        key = (num_max_tokens, hidden, roles, ll is not None)
        if key in self._fits:
            return roles
        check_positive_int("num_max_dispatch_tokens_per_rank", num_max_tokens)
        if roles.experts_per_rank > shm_low_latency.MAX_LOCAL_EXPERTS:
            raise ValueError(
                f"low-latency mode supports up to {shm_low_latency.MAX_LOCAL_EXPERTS} experts per "
                f"rank, got {roles.experts_per_rank}"
            )
        needed = shm_low_latency.bytes_needed(num_max_tokens, hidden, self.runtime.group_size, roles.virtual_experts)
        # num_rdma_bytes=0 holds whatever the segment's address space (if any) holds.
        if 0 < self.runtime.num_rdma_bytes < needed or (
            ll is not None and not ll.fits(num_max_tokens, hidden, roles.virtual_experts)
        ):
            raise ValueError(
                f"num_rdma_bytes={self.runtime.num_rdma_bytes or ll.num_bytes} is too small for "
                f"low-latency mode with "
                f"num_max_dispatch_tokens_per_rank={num_max_tokens}, hidden={hidden}, "
                f"{self.runtime.group_size} ranks and num_experts={num_experts}: it needs {needed} bytes "
                f"(Buffer.get_low_latency_rdma_size_hint({num_max_tokens}, {hidden}, "
                f"{self.runtime.group_size}, {num_experts}))"
            )
        if len(self._fits) >= shm_low_latency.MAX_CACHED_LAYOUTS:  # callers that vary Nmax / H / E
            self._fits.clear()
        self._fits.add(key)
        return roles

    def begin(self, kind: int, what: str) -> int:
        """The sequence number of the next call of `kind`; refuses a third call in flight."""
        seq = self._seq[kind] + 1
        if self._pending[kind][seq & 1] is not None:
            raise RuntimeError(
                f"deep_ep {what}: two earlier calls still wait for their hook; call the older "
                "hook first (at most two low-latency results may be in flight)"
            )
        return seq

    def _reject(self, kind: int, seq: int, header: List[int], what: str, transport: "LowLatencyTransport") -> None:
        """This rank rejected its arguments: tell the peers (so they fail fast instead of waiting) and
        consume their call, which keeps every rank's sequence numbers in step."""
        self._seq[kind] = seq
        transport.reject(self, kind, seq, header, what)

    def reject_dispatch(
        self,
        seq: int,
        x,
        num_max_dispatch_tokens_per_rank,
        what: str,
        transport: "LowLatencyTransport",
    ) -> None:
        """_reject of a dispatch call (low_latency_dispatch, fused_deep_moe): the "rejected" header
        carries x's token count and Nmax, so the peers can name a rank that has more tokens than Nmax.
        `transport`: the one the call would have used."""
        tokens = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() == 2 else -1
        nmax = num_max_dispatch_tokens_per_rank if isinstance(num_max_dispatch_tokens_per_rank, int) else -1
        self._reject(0, seq, [seq, 1, nmax, -1, -1, -1, -1, tokens], what, transport)

    def ll_guard(self, wait, *args):
        """Returns wait(*args), a call that waits on peers; a timeout or a dead peer leaves low-latency
        mode unusable until clean_low_latency_buffer() runs on every rank (or the Buffer is recreated)."""
        try:
            return wait(*args)
        except SharedMemoryExhausted:
            raise  # no peer is left waiting: the calls stay in step
        except RuntimeError as error:
            self._broken = (
                f"deep_ep: low-latency mode cannot be used after an earlier failure ({error}); "
                "call clean_low_latency_buffer() on every rank, or recreate the Buffer."
            )
            raise

    def _check_hook(self, state: LowLatencyState, what: str) -> None:
        if state.epoch != self._epoch:
            raise RuntimeError(
                f"deep_ep {what}: this hook belongs to a call made before clean_low_latency_buffer(); its data is gone"
            )
        self._check_runtime()
        if self._broken:
            raise RuntimeError(self._broken)

    def ll_drop_pending(self, kind: int, seq: int) -> None:
        """Call `seq` of `kind` failed before its hook: it no longer counts as in flight."""
        self._pending[kind][seq & 1] = None

    def ll_finish(self, kind: int, call: LowLatencyCall) -> None:
        call.received = True
        if self._pending[kind][call.seq & 1] == call.seq:
            self._pending[kind][call.seq & 1] = None

    # ---- dispatch --------------------------------------------------------------------------------
    def ll_dispatch(
        self,
        transport: "LowLatencyTransport",
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
        use_fp8: bool = True,
        return_recv_hook: bool = False,
        topk_weights: Optional[torch.Tensor] = None,
        quant_mode: Optional[str] = None,
    ):
        """Sends every token to the ranks holding its top-k experts, into fixed-size buffers (decode path).

        Args:
            transport: the strategy's row mover (deep_ep/strategies/low_latency_strategy.py).
            x: [T, H] bfloat16 (float16 too; float32 with int8), T <= num_max_dispatch_tokens_per_rank.
            topk_idx: int64 [T, K] in [-1, E), -1 = no expert. A row may name an expert more than once:
                each (t, k) selection is its own received row (at most Nmax selections of one expert).
            num_max_dispatch_tokens_per_rank: Nmax, the same on every rank.
            num_experts: E, the same on every rank, a multiple of R. With MOE_SHARED_EXPERT_RANK_NUM = S > 0
                (docs/semantics.md): E routed experts, a multiple of R - S, L = E / (R - S) on ranks [S, R);
                ranks [0, S) hold the shared expert (L = 1) and receive every token of the sources
                s with s % S == rank; combine adds its output with weight 1.
            cumulative_local_expert_recv_stats: None or int32 [L]; recv_count is added to it.
            use_fp8: True (default): per-token int8 (scale = max|x| / 127, A2/A3 behaviour); False: bf16.
            return_recv_hook: if True the call only sends; `hook()` receives and packs, and the results
                are valid only after it.
            topk_weights: None or float32 [T, K]; kept in the handle.
            quant_mode: None, "bf16" or "int8"; overrides use_fp8.
        Returns:
            recv_x: [M, H] with M = Nmax * R * min(K, L) (Nmax * ceil(R / S) on a shared-expert rank)
                (x's dtype), or with int8 the pair
                (int8 [M, H], float32 scales [M]). Rows are packed expert-major: local expert 0's rows
                from rank 0 in token order, then from rank 1, ..., then expert 1, ...; only the first
                recv_count.sum() rows hold data. The memory is reused by the call after next (two
                results may be alive at once).
            recv_count: int64 [L], rows per local expert (their inclusive prefix sums with
                MOE_EXPERT_TOKEN_NUMS_TYPE=0).
            state: the LowLatencyState (the strategy makes the handle from it: src_info int32 [M, 3]
                (source rank, source token, top-k column; -1 past the rows), layout_range int64 [L * R]
                (inclusive prefix of the rows of (local expert, source rank) blocks, expert-major)).
            event: EventOverlap. hook: a callable that receives (a no-op once received).
        """
        what = "low_latency_dispatch"
        self.ready(what)
        seq = self.begin(0, what)
        try:
            quant = check_low_latency_x(x, resolve_quant_mode(quant_mode, use_fp8))
            if not (
                x.dim() == 2
                and isinstance(topk_idx, torch.Tensor)
                and topk_idx.dtype == topk_idx_t
                and topk_idx.dim() == 2
                and topk_idx.shape[0] == x.shape[0]
            ):  # else: say what is wrong
                check_tensor("x", x, dtypes=FLOAT_DTYPES, shape=(None, None))
                check_tensor("topk_idx", topk_idx, dtypes=(topk_idx_t,), shape=(x.shape[0], None))
            num_tokens, hidden = x.shape
            num_topk = topk_idx.shape[1]
            check_num_topk(num_topk)
            roles = self.check_sizes(num_max_dispatch_tokens_per_rank, hidden, num_experts, transport.ll)
            if num_tokens > num_max_dispatch_tokens_per_rank:
                raise ValueError(
                    f"x has {num_tokens} tokens, more than num_max_dispatch_tokens_per_rank="
                    f"{num_max_dispatch_tokens_per_rank}"
                )
            local_experts = roles.local_experts(self.runtime.rank)
            if cumulative_local_expert_recv_stats is not None:
                check_tensor(
                    "cumulative_local_expert_recv_stats",
                    cumulative_local_expert_recv_stats,
                    dtypes=(torch.int32,),
                    shape=(local_experts,),
                )
            if topk_weights is not None:
                check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=(num_tokens, num_topk))
            x, topk_idx = x.contiguous(), topk_idx.contiguous()
            shared = roles if roles.num_shared_ranks else None
            if shared is not None:  # the transports route the shared expert as one more top-k column
                topk_idx = shared.virtual_topk(topk_idx, self.runtime.rank)
            virtual_experts = roles.virtual_experts
            slot, counts = layout.low_latency_slots(topk_idx, virtual_experts, num_max_dispatch_tokens_per_rank)
            if transport.ll is not None:  # every rank's /dev/shm backs what this call writes
                self.ll_guard(
                    transport.ll.prepare, seq, num_max_dispatch_tokens_per_rank, hidden, virtual_experts, what
                )
        except (ValueError, TypeError, SharedMemoryExhausted):
            self.reject_dispatch(seq, x, num_max_dispatch_tokens_per_rank, what, transport)
            raise
        self._seq[0] = seq
        parity = seq & 1
        num_max = num_max_dispatch_tokens_per_rank
        quantized = quant == "int8"
        fmt = LL_FORMAT_INT8 if quantized else NATIVE_DTYPE_CODES[x.dtype]
        num_rows = roles.packed_rows(self.runtime.rank, num_max, num_topk)
        public_experts, experts_per_rank = num_experts, virtual_experts // self.runtime.group_size
        num_experts, num_topk = virtual_experts, topk_idx.shape[1]
        header = [seq, 0, num_max, num_experts, hidden, num_topk, fmt, num_tokens]
        state = LowLatencyState(
            seq=seq,
            epoch=self._epoch,
            header=header,
            num_max_tokens=num_max,
            hidden=hidden,
            num_experts=num_experts,
            num_topk=num_topk,
            num_tokens=num_tokens,
            num_rows=num_rows,
            quantized=quantized,
            dtype=x.dtype if x.dtype != torch.float32 else torch.bfloat16,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            src_info=torch.empty(num_rows, 3, dtype=torch.int32),
            slot=slot,
            layout_range=torch.empty(experts_per_rank * self.runtime.group_size, dtype=torch.int64),
            recv_count=torch.empty(experts_per_rank, dtype=torch.int64),
            stats=cumulative_local_expert_recv_stats,
            transport=transport,
            shared=shared,
            public_experts=public_experts,
            local_experts=local_experts,
        )
        state.recv_count_out = (
            state.recv_count if env.expert_token_nums_type() == 1 else torch.empty_like(state.recv_count)
        )
        state.recv = self._recv_buffers(parity, num_rows, hidden, quantized, state.dtype)
        transport.send_dispatch(self, state, x, slot, counts, what)
        self._pending[0][parity] = seq
        hook = functools.partial(self._dispatch_receive, state)
        if not return_recv_hook:
            hook()
        recv_x = state.recv if quantized else state.recv[0]
        # A shared rank has one local expert: its blocks are the first R of the virtual layout.
        return recv_x, state.recv_count_out[:local_experts], state, EventOverlap(), hook

    def _recv_buffers(self, parity: int, rows: int, hidden: int, quantized: bool, dtype: torch.dtype):
        """The receive tensors of one parity, reused by every other call (double buffering)."""
        key = (rows, hidden, quantized, dtype)
        cached = self._recv[parity]
        if cached is None or cached[0] != key:
            if quantized:
                tensors = (torch.empty(rows, hidden, dtype=torch.int8), torch.empty(rows, dtype=torch.float32))
            else:
                tensors = (torch.empty(rows, hidden, dtype=dtype),)
            cached = self._recv[parity] = (key, tensors)
        return cached[1]

    def _dispatch_receive(self, state: LowLatencyState) -> None:
        """Waits for every source's rows of this call and packs them expert-major (the hook)."""
        if state.received:
            return
        self._check_hook(state, "low_latency_dispatch (receive)")
        state.transport.receive_dispatch(self, state)
        if state.stats is not None:  # [local experts]: 1 on a shared rank, whose other counts are 0
            state.stats.add_(state.recv_count[: state.stats.numel()])
        if state.recv_count_out is not state.recv_count:
            torch.cumsum(state.recv_count, 0, out=state.recv_count_out)
        self.ll_finish(0, state)

    # ---- combine ---------------------------------------------------------------------------------
    def ll_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        state: LowLatencyState,
        return_recv_hook: bool = False,
        out: Optional[torch.Tensor] = None,
    ):
        """Returns expert outputs to their tokens and sums them with the routing weights.

        Args:
            x: [M, H] expert outputs in the packed layout of low_latency_dispatch, in the handle's dtype
                (bfloat16 unless x was float16); rows past recv_count.sum() are ignored.
            topk_idx: int64 [T, K], as given to low_latency_dispatch (entries may be set to -1 to drop them).
            topk_weights: float32 [T, K], the weights of the sum.
            state: the LowLatencyState of low_latency_dispatch's handle (after its hook, if any).
            return_recv_hook: if True the call only sends; `hook()` receives and reduces, and
                combined_x is valid only after it.
            out: None or a [T, H] tensor of x's dtype that receives the result.
        Returns:
            (combined_x [T, H], EventOverlap, hook: a callable that receives; a no-op once received).
            combined_x[t] = sum over k with
            topk_idx[t, k] != -1 of topk_weights[t, k] * x[row(t, k)], in float32, k ascending.
        """
        what = "low_latency_combine"
        self.ready(what)
        if not state.received:
            raise RuntimeError(
                "deep_ep low_latency_combine: call the hook of the low_latency_dispatch that made this handle first"
            )
        seq = self.begin(1, what)
        num_tokens, num_topk, hidden = state.num_tokens, state.num_topk, state.hidden
        try:
            if state.shared is not None:  # the shared expert's column, as at dispatch
                check_tensor("topk_idx", topk_idx, dtypes=(topk_idx_t,), shape=(num_tokens, num_topk - 1))
                check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=(num_tokens, num_topk - 1))
                topk_idx = state.shared.virtual_topk(topk_idx, self.runtime.rank)
                topk_weights = state.shared.virtual_weights(topk_weights)
            if not (
                isinstance(x, torch.Tensor)
                and x.dtype == state.dtype
                and x.shape == (state.num_rows, hidden)
                and isinstance(topk_idx, torch.Tensor)
                and topk_idx.dtype == topk_idx_t
                and topk_idx.shape == (num_tokens, num_topk)
                and isinstance(topk_weights, torch.Tensor)
                and topk_weights.dtype == torch.float32
                and topk_weights.shape == (num_tokens, num_topk)
            ):  # else: say what is wrong
                check_tensor("x", x, dtypes=(state.dtype,), shape=(state.num_rows, hidden))
                check_tensor("topk_idx", topk_idx, dtypes=(topk_idx_t,), shape=(num_tokens, num_topk))
                check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=(num_tokens, num_topk))
            if out is not None:
                check_tensor("out", out, dtypes=(state.dtype,), shape=(num_tokens, hidden))
            check_combine_topk_idx(topk_idx, state.topk_idx)
        except (ValueError, TypeError):
            self._reject(1, seq, [seq, 1, -1, -1, -1, -1, -1, state.seq], what, state.transport)
            raise
        self._seq[1] = seq
        parity = seq & 1
        x = x.contiguous()
        header = [
            seq,
            0,
            state.num_max_tokens,
            state.num_experts,
            hidden,
            num_topk,
            NATIVE_DTYPE_CODES[x.dtype],
            state.seq,
        ]
        result = (
            out if out is not None and out.is_contiguous() else self.runtime.pool.empty((num_tokens, hidden), x.dtype)
        )
        task = LowLatencyCombine(
            state=state,
            seq=seq,
            header=header,
            topk_idx=topk_idx,
            weights=topk_weights,
            result=result,
            out=out,
            immediate=not return_recv_hook,
        )
        state.transport.send_combine(self, task, x, what)
        self._pending[1][parity] = seq
        hook = functools.partial(self._combine_receive, task)
        if not return_recv_hook:
            hook()
        return result if out is None else out, EventOverlap(), hook

    def combine_buffer(self, state: LowLatencyState) -> torch.Tensor:
        """[M, H] in the handle's dtype where the next low_latency_combine's x may be written: passed
        as x, its rows are read where they are instead of being copied (shared memory; on the other
        transports it is a plain tensor). It is the memory of the next combine's parity, handed out
        once every rank has read the combine two calls back; the next buffer is another one."""
        what = "get_next_low_latency_combine_buffer"
        self.ready(what)
        if not state.received:
            raise RuntimeError(f"deep_ep {what}: call the hook of the low_latency_dispatch that made this handle first")
        self._check_hook(state, what)
        return state.transport.combine_buffer(self, state, self.begin(1, what), what)

    def _combine_receive(self, task: LowLatencyCombine) -> None:
        """Waits for every holder's rows of this call and reduces them (the hook)."""
        if task.received:
            return
        state = task.state
        self._check_hook(state, "low_latency_combine (receive)")
        dropped = _dropped(state, task.topk_idx)
        state.transport.receive_combine(self, task, dropped)
        if task.out is not None and task.out is not task.result:
            task.out.copy_(task.result)
        self.ll_finish(1, task)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Resets the low-latency signalling state (collective: call it on every rank).

        Args: Nmax, H, E of the calls to come; num_rdma_bytes must hold them (ValueError otherwise).
        Hooks of earlier calls can no longer run; results already received stay valid. A Buffer
        without low_latency_mode has no such state: there it returns at once, on any rank, as
        DeepEP-Ascend's does.
        """
        self.runtime.check_alive()
        if not self.runtime.low_latency_mode:
            return
        if self.npu_ll is not None:
            return npu.clean_low_latency_buffer(self.runtime, num_max_dispatch_tokens_per_rank, hidden, num_experts)
        self.check_sizes(num_max_dispatch_tokens_per_rank, hidden, num_experts)

        def barrier() -> None:
            collective.run_collective(
                self.runtime.comm, "clean_low_latency_buffer", lambda: dist.barrier(group=self.runtime.comm)
            )

        barrier()
        if self.ll is not None:
            self.ll.reset()
        barrier()
        self._seq = [0, 0]
        self._pending = [[None, None], [None, None]]
        self._epoch += 1
        self._broken = None
