"""Normal mode (prefill / training): the layout counts, dispatch (fresh and cached) and combine.

`NormalMode` checks the arguments, agrees a per-call header with the peers, computes the routing
once (`layout.py`) and hands the rows to the transport of the calling strategy
(deep_ep/strategies/normal_strategy.py: shared memory inside a node, the hierarchical transport
between nodes, or torch.distributed's all_to_all_single). It is a mixin of the Buffer's runtime;
the group, topology and shared memory come from `Buffer.__init__`. The strategies turn the
DispatchState it returns into DeepEP-Ascend's handle (deep_ep/handles.py).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Protocol, Tuple, Union

import torch

from . import env, layout, ops
from .transport import hierarchical, shm
from .transport.fields import as_byte_rows
from .utils import (
    FLOAT_DTYPES,
    NATIVE_DTYPE_CODES,
    EventOverlap,
    check_num_topk,
    check_tensor,
    resolve_quant_mode,
    topk_idx_t,
)

if TYPE_CHECKING:
    from .runtime import Runtime

# Operation codes in the per-call header, so ranks that call different things fail fast.
OP_DISPATCH, OP_CACHED_DISPATCH, OP_COMBINE = 1, 2, 3
OP_NAMES = {OP_DISPATCH: "dispatch", OP_CACHED_DISPATCH: "dispatch (cached)", OP_COMBINE: "combine"}
# Header fields that every rank must agree on (index 1 is the token count, which may differ).
HEADER_FIELDS = (
    "operation",
    "num_tokens",
    "hidden",
    "num_topk",
    "num_experts",
    "x dtype",
    "quant_mode",
    "expert_alignment",
    "num_worst_tokens",
)


@dataclass
class DispatchState:
    """What combine and cached dispatch need from a dispatch (the `state` of its handle)."""

    plan: layout.RoutingPlan
    recv_src_rank: torch.Tensor  # int64 [N_out], -1 for padding rows
    recv_src_idx: torch.Tensor  # int64 [N_out]
    recv_src_k: torch.Tensor  # int64 [N_out]: top-k column of each row's selection, -1 for padding rows
    num_out_rows: int
    num_tokens: int
    hidden: int
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    expert_alignment: int = 1
    num_worst_tokens: int = 0
    internode: Optional["InternodeState"] = None
    transport: Any = None  # the NormalTransport that moved the rows; combine must use the same

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


def check_agreement(meta_all: torch.Tensor, what: str, skip: Tuple[int, ...]) -> None:
    """ValueError naming the first header field the ranks disagree on.

    meta_all: int64 [R, >= len(HEADER_FIELDS)], every rank's header; skip: indices of the fields
    that may differ between ranks."""
    for index, name in enumerate(HEADER_FIELDS):
        if index in skip:
            continue
        column = meta_all[:, index]
        if bool((column != column[0]).any()):
            shown = [OP_NAMES.get(v, v) for v in column.tolist()] if index == 0 else column.tolist()
            values = ", ".join(f"rank {r}: {v}" for r, v in enumerate(shown))
            raise ValueError(f"deep_ep {what}: ranks disagree on {name} ({values})")


class NormalTransport(Protocol):
    """How one normal strategy moves rows (deep_ep/strategies/normal_strategy.py). `runtime` is the
    Buffer's Runtime (deep_ep/runtime.py); `stats` the caller's int32 [R] cost statistics or None."""

    shm: Optional[shm.NodeShm]  # the shared memory whose data area bounds a row, or None

    def dispatch(
        self,
        runtime: "Runtime",
        meta: torch.Tensor,
        fields: List[torch.Tensor],
        topk_idx: torch.Tensor,
        decide: Callable,
        state_box: dict,
        stats: Optional[torch.Tensor],
    ):
        """Moves a fresh dispatch's rows; returns (InternodeState or None, rows_by_source or None)."""

    def cached_dispatch(
        self,
        runtime: "Runtime",
        state: "DispatchState",
        header: torch.Tensor,
        fields: List[torch.Tensor],
        out_bytes: List[torch.Tensor],
        check: Callable,
        stats: Optional[torch.Tensor],
    ) -> None:
        """Moves a cached dispatch's rows along the routes of `state`."""

    def combine(
        self,
        runtime: "Runtime",
        state: "DispatchState",
        header: torch.Tensor,
        x_rows: torch.Tensor,
        check: Callable,
        reduce: Callable,
        out: torch.Tensor,
        weights: torch.Tensor,
        new_weights: Optional[torch.Tensor],
        biases: List[torch.Tensor],
        stats: Optional[torch.Tensor],
    ) -> None:
        """Returns the expert outputs `x_rows` and reduces them into `out`."""


class NormalMode:
    """The normal-mode calls of one Buffer's runtime (`runtime.normal`), called by the normal strategies
    with the transport that moves the rows."""

    def __init__(self, runtime: "Runtime") -> None:
        # A proxy: the runtime owns this object, and a strong reference back would make a cycle that
        # keeps the runtime's groups alive until the garbage collector runs (docs/lifetime.md).
        self.runtime = weakref.proxy(runtime)

    # ---- layout ----------------------------------------------------------------------------------
    def _check_topk_idx(self, topk_idx: torch.Tensor, num_experts: int, experts_name: str = "num_experts") -> None:
        check_tensor("topk_idx", topk_idx, dtypes=(topk_idx_t,), shape=(None, None))
        check_num_topk(topk_idx.shape[1])
        ranks = self.runtime.group_size
        if not isinstance(num_experts, int) or num_experts <= 0 or num_experts % ranks:
            raise ValueError(f"{experts_name} must be a positive multiple of the {ranks} ranks, got {num_experts!r}")
        if topk_idx.numel():
            low, high = layout.summarize_topk(topk_idx)
            if low < -1 or high >= num_experts:
                raise ValueError(f"topk_idx values must lie in [-1, {num_experts}), got values in [{low}, {high}]")

    def dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int):
        """Counts the rows this rank will send (get_dispatch_layout of every normal strategy).

        Args:
            topk_idx: int64 [T, K], values in [-1, num_experts).
            num_experts: E, a multiple of the group size.
        Returns:
            num_tokens_per_rank int32 [R], num_tokens_per_rdma_rank int32 [nodes] (None for one node),
            num_tokens_per_expert int32 [E] (or [rounds * E] per long-sequence round, see
            deep_ep.env.long_seq_rounds), is_token_in_rank int32 [T, R], EventOverlap.
        """
        self.runtime.check_alive()
        self._check_topk_idx(topk_idx, num_experts)
        self.runtime.check_devices(topk_idx=topk_idx)
        rounds = env.long_seq_rounds()
        if rounds.configured and topk_idx.shape[0] > rounds.rounds * rounds.per_round_tokens:
            raise ValueError(
                f"topk_idx has {topk_idx.shape[0]} tokens, more than DEEPEP_NORMAL_LONG_SEQ_ROUND * "
                f"DEEPEP_NORMAL_LONG_SEQ_PER_ROUND_TOKENS = {rounds.rounds * rounds.per_round_tokens}"
            )
        per_rank, per_node, per_expert, in_rank = layout.dispatch_layout(
            topk_idx,
            num_experts,
            self.runtime.group_size,
            self.runtime.rank_to_node if self.runtime.num_nodes > 1 else None,
        )
        if rounds.rounds > 1:
            per_expert = torch.cat(
                [
                    layout.dispatch_layout(
                        topk_idx[r * rounds.per_round_tokens : (r + 1) * rounds.per_round_tokens],
                        num_experts,
                        self.runtime.group_size,
                    )[2]
                    for r in range(rounds.rounds)
                ]
            )
        return per_rank, per_node, per_expert, in_rank, EventOverlap()

    # ---- dispatch --------------------------------------------------------------------------------
    def _token_fields(self, x, quant: str) -> Tuple[List[torch.Tensor], List[Tuple[torch.dtype, int]], int, int]:
        """Splits x into byte-row fields; returns (fields, [(dtype, width)], hidden, dtype code)."""
        if isinstance(x, (tuple, list)):
            if len(x) != 2:
                raise ValueError(f"x as a pair must be (int8 [T, H], float32 scales [T]), got {len(x)} items")
            q = check_tensor("x[0]", x[0], dtypes=(torch.int8,), shape=(None, None))
            check_tensor("x[1]", x[1], dtypes=(torch.float32,), shape=(q.shape[0],))
            return [as_byte_rows(q), as_byte_rows(x[1])], [(torch.int8, q.shape[1]), (torch.float32, 1)], q.shape[1], -1
        check_tensor("x", x, dtypes=FLOAT_DTYPES, shape=(None, None))
        if quant == "int8":
            q, scale = ops.quantize_int8(x, self.runtime.num_threads)
            return (
                [as_byte_rows(q), as_byte_rows(scale)],
                [(torch.int8, x.shape[1]), (torch.float32, 1)],
                x.shape[1],
                NATIVE_DTYPE_CODES[x.dtype],
            )
        return [as_byte_rows(x)], [(x.dtype, x.shape[1])], x.shape[1], NATIVE_DTYPE_CODES[x.dtype]

    def _check_buffer_fits(
        self, transport: "NormalTransport", bytes_per_token: int, num_fields: int, what: str
    ) -> None:
        if transport.shm is None:
            return
        needed = shm.data_bytes_needed(1, bytes_per_token, num_fields)
        if shm.window_rows(self.runtime.num_nvl_bytes, bytes_per_token, num_fields) < 1:
            raise ValueError(
                f"num_nvl_bytes={self.runtime.num_nvl_bytes} is too small for {what}: one token row "
                f"needs at least {needed} bytes; create the Buffer with num_nvl_bytes >= {needed}"
            )

    def _empty(self, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised output: from the pool on CPU, a plain allocation on the Buffer's device otherwise."""
        if self.runtime.device_path:
            return torch.empty(*shape, dtype=dtype, device=self.runtime.device)
        return self.runtime.pool.empty(shape, dtype)

    def _check_cost_stats(self, name: str, stats: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """None, or `stats` checked to be int32 [R] (on any device: the host adds the measured times)."""
        if stats is not None:
            check_tensor(name, stats, dtypes=(torch.int32,), shape=(self.runtime.group_size,))
        return stats

    def _check_devices(self, **tensors) -> None:
        """ValueError naming the first tensor that is not on the Buffer's device (CPU or this process's NPU)."""
        for name, tensor in tensors.items():
            for index, t in enumerate(tensor if isinstance(tensor, (tuple, list)) else [tensor]):
                if isinstance(t, torch.Tensor) and t.device != self.runtime.device:
                    shown = f"{name}[{index}]" if isinstance(tensor, (tuple, list)) else name
                    raise ValueError(f"{shown} must be on the Buffer's device {self.runtime.device}, got {t.device}")

    def dispatch(
        self,
        transport: "NormalTransport",
        x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
        handle_state: Optional["DispatchState"] = None,
        num_tokens_per_rank: Optional[torch.Tensor] = None,
        is_token_in_rank: Optional[torch.Tensor] = None,
        num_tokens_per_expert: Optional[torch.Tensor] = None,
        topk_idx: Optional[torch.Tensor] = None,
        topk_weights: Optional[torch.Tensor] = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None,
        quant_mode: Optional[str] = None,
    ):
        """Sends every token to the ranks holding its top-k experts (normal mode).

        Args:
            x: [T, H] bfloat16/float16/float32, or an already quantized pair
                (int8 [T, H], float32 scales [T]) that is sent as is.
            transport: the strategy's row mover (deep_ep/strategies/normal_strategy.py).
            handle_state: the state of an earlier dispatch's handle: cached mode, same routes, only x moves.
            num_tokens_per_expert: int32 [E] from get_dispatch_layout (gives E), or [rounds * E] with the
                long-sequence rounds (deep_ep.env.long_seq_rounds); num_tokens_per_rank and
                is_token_in_rank are checked when given.
            topk_idx: int64 [T, K] in [-1, E); topk_weights: float32 [T, K].
            expert_alignment: pad every expert's block to a multiple of it with zero rows.
            num_worst_tokens: if > 0, recv_x has exactly this many rows.
            dispatch_wait_recv_cost_stats: None or int32 [R]; entry r grows by the microseconds this
                rank waited for the rows of rank r.
            quant_mode: None, "bf16" or "int8" (per-token dynamic int8).
        Returns:
            recv_x [N, H] (a pair (int8 [N, H], float32 [N]) with int8), recv_topk_idx int64 [N, K]
            (local expert ids, -1 elsewhere), recv_topk_weights float32 [N, K],
            num_recv_tokens_per_expert_list (L ints), the DispatchState (the strategy makes the handle),
            EventOverlap.
            Received rows are grouped by local expert, then source rank, then source token.
        """
        self.runtime.check_alive()
        quant = resolve_quant_mode(quant_mode, env.normal_int8_quant())
        stats = self._check_cost_stats("dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats)
        if handle_state is not None:
            return self._cached_dispatch(transport, x, handle_state, quant, stats)
        if topk_idx is None or topk_weights is None:
            raise ValueError("dispatch needs topk_idx and topk_weights unless a handle is given")
        if num_tokens_per_expert is None:
            raise ValueError("dispatch needs num_tokens_per_expert (from get_dispatch_layout) unless a handle is given")
        check_tensor("num_tokens_per_expert", num_tokens_per_expert, dtypes=(torch.int32, torch.int64), shape=(None,))
        rounds = env.long_seq_rounds().rounds
        if num_tokens_per_expert.shape[0] % rounds:
            raise ValueError(
                f"num_tokens_per_expert must have rounds * E entries ({rounds} long-sequence rounds), "
                f"got {num_tokens_per_expert.shape[0]}"
            )
        num_experts = num_tokens_per_expert.shape[0] // rounds
        host_idx = topk_idx.cpu()  # the routing math runs on the host (the same tensor on CPU)
        self._check_topk_idx(host_idx, num_experts, "num_experts (the length of num_tokens_per_expert)")
        num_tokens, num_topk = topk_idx.shape
        check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=(num_tokens, num_topk))
        self.runtime.check_devices(x=x, topk_idx=topk_idx, topk_weights=topk_weights)
        fields, kinds, hidden, dtype_code = self._token_fields(x, quant)
        if fields[0].shape[0] != num_tokens:
            raise ValueError(f"x must have {num_tokens} rows (as topk_idx), got {fields[0].shape[0]}")
        if is_token_in_rank is not None:
            check_tensor(
                "is_token_in_rank",
                is_token_in_rank,
                dtypes=(torch.int32, torch.bool),
                shape=(num_tokens, self.runtime.group_size),
            )
        if num_tokens_per_rank is not None:
            check_tensor(
                "num_tokens_per_rank",
                num_tokens_per_rank,
                dtypes=(torch.int32, torch.int64),
                shape=(self.runtime.group_size,),
            )
        for name, value in (("expert_alignment", expert_alignment), ("num_worst_tokens", num_worst_tokens)):
            lowest = 1 if name == "expert_alignment" else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
                raise ValueError(f"{name} must be an int >= {lowest}, got {value!r}")
        tokens_per_expert = torch.bincount(host_idx.reshape(-1) + 1, minlength=num_experts + 1)[1:]  # -1 -> bin 0
        given = num_tokens_per_expert.cpu().to(torch.int64).view(rounds, num_experts).sum(0)
        if not torch.equal(tokens_per_expert, given):
            raise ValueError(
                "num_tokens_per_expert does not match topk_idx; pass the counts get_dispatch_layout "
                "returned for this topk_idx"
            )
        fields += [as_byte_rows(topk_idx), as_byte_rows(topk_weights)]
        kinds += [(torch.int64, num_topk), (torch.float32, num_topk)]
        self._check_buffer_fits(transport, sum(f.shape[1] for f in fields), len(fields), "dispatch")
        quant_code = 1 if len(kinds) == 4 else 0
        header = torch.tensor(
            [
                OP_DISPATCH,
                num_tokens,
                hidden,
                num_topk,
                num_experts,
                dtype_code,
                quant_code,
                expert_alignment,
                num_worst_tokens,
            ],
            dtype=torch.int64,
        )
        experts_per_rank = num_experts // self.runtime.group_size
        state_box = {}

        def decide(meta_all: torch.Tensor):
            check_agreement(meta_all, "dispatch", skip=(1,))
            plan = layout.plan_routing(host_idx, meta_all[:, len(HEADER_FIELDS) :], self.runtime.rank, expert_alignment)
            if num_worst_tokens and int(plan.rows_per_rank.max()) > num_worst_tokens:
                over = [r for r, n in enumerate(plan.rows_per_rank.tolist()) if n > num_worst_tokens]
                raise ValueError(
                    f"num_worst_tokens={num_worst_tokens} is too small: ranks {over} receive "
                    f"{[int(plan.rows_per_rank[r]) for r in over]} rows"
                )
            out_rows = num_worst_tokens or plan.num_recv_rows
            outs = [self.runtime.empty((out_rows, width), dtype) for dtype, width in kinds]
            src_rank = torch.full((out_rows,), -1, dtype=torch.int64)
            src_idx = torch.full((out_rows,), -1, dtype=torch.int64)
            src_k = torch.full((out_rows,), -1, dtype=torch.int64)
            state_box.update(plan=plan, outs=outs, src_rank=src_rank, src_idx=src_idx, src_k=src_k)
            already = torch.zeros(experts_per_rank, self.runtime.group_size, dtype=torch.int64)

            def routes(source: int, regions: List[torch.Tensor], begin: int, end: int):
                window_topk = regions[len(kinds) - 2][: end - begin].view(torch.int64)
                if len(regions) > len(kinds):  # rows forwarded from other nodes say where they come from
                    origin_rank = regions[-2][: end - begin].view(torch.int64).flatten()
                    origin_token = regions[-1][: end - begin].view(torch.int64).flatten()
                else:
                    origin_token = torch.arange(begin, end)
                    origin_rank = torch.full_like(origin_token, self.runtime.local_ranks[source])
                row, out_row, rank, token, k = plan.receive_rows(window_topk, origin_rank, origin_token, already)
                src_rank[out_row], src_idx[out_row], src_k[out_row] = rank, token, k
                return row + begin, out_row

            return [as_byte_rows(o) for o in outs], routes

        meta = torch.cat([header, tokens_per_expert])
        internode, rows_by_source = transport.dispatch(self.runtime, meta, fields, topk_idx, decide, state_box, stats)
        plan, outs, src_rank, src_idx, src_k = (
            state_box[key] for key in ("plan", "outs", "src_rank", "src_idx", "src_k")
        )
        self._zero_padding(outs, src_rank, topk_fill=True)
        recv_raw_topk, recv_topk_weights = outs[-2], outs[-1]
        recv_x = (outs[0], outs[1].view(-1)) if quant_code or isinstance(x, (tuple, list)) else outs[0]
        recv_topk_idx = layout.localize_topk_idx_(recv_raw_topk, self.runtime.rank, experts_per_rank)
        state = DispatchState(
            plan=plan,
            recv_src_rank=src_rank,
            recv_src_idx=src_idx,
            recv_src_k=src_k,
            num_out_rows=src_rank.numel(),
            num_tokens=num_tokens,
            hidden=hidden,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            expert_alignment=expert_alignment,
            num_worst_tokens=num_worst_tokens,
            internode=internode,
        )
        if rows_by_source is not None:
            state.rows_by_source = rows_by_source
        state.transport = transport
        counts = plan.expert_rows
        if env.expert_token_nums_type() == 0:
            counts = torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0).tolist()
        return recv_x, recv_topk_idx, recv_topk_weights, counts, state, EventOverlap()

    @staticmethod
    def _zero_padding(outs: List[torch.Tensor], src_rank: torch.Tensor, topk_fill: bool) -> None:
        """Padding rows (no source) are zero; their top-k ids are -1."""
        padding = (src_rank < 0).nonzero().flatten()
        if not padding.numel():
            return
        for index, out in enumerate(outs):
            is_topk_idx = topk_fill and index == len(outs) - 2
            out.index_fill_(0, padding.to(out.device), -1 if is_topk_idx else 0)

    def _cached_dispatch(
        self, transport: "NormalTransport", x, state: DispatchState, quant: str, stats: Optional[torch.Tensor]
    ):
        if state.internode is not None:
            # Across nodes the forwarders need the top-k to place rows: a dispatch with the handle's
            # routing lands every row where the first one did.
            counts = state.plan.tokens_per_expert_all[self.runtime.rank]
            rounds = env.long_seq_rounds().rounds  # the counts of round 0 carry them all
            counts = torch.cat([counts, counts.new_zeros((rounds - 1) * counts.numel())])
            recv_x = self.dispatch(
                transport,
                x,
                num_tokens_per_expert=counts,
                topk_idx=state.topk_idx,
                topk_weights=state.topk_weights,
                expert_alignment=state.expert_alignment,
                num_worst_tokens=state.num_worst_tokens,
                dispatch_wait_recv_cost_stats=stats,
                quant_mode=quant,
            )[0]
            return recv_x, None, None, None, None, EventOverlap()
        fields, kinds, hidden, dtype_code = self._token_fields(x, quant)
        if fields[0].shape[0] != state.num_tokens:
            raise ValueError(f"x must have {state.num_tokens} rows (the handle's tokens), got {fields[0].shape[0]}")
        self._check_buffer_fits(transport, sum(f.shape[1] for f in fields), len(fields), "dispatch")
        plan = state.plan
        header = torch.tensor(
            [
                OP_CACHED_DISPATCH,
                state.num_tokens,
                hidden,
                0,
                plan.num_experts,
                dtype_code,
                1 if len(kinds) == 2 else 0,
                0,
                state.num_out_rows,
            ],
            dtype=torch.int64,
        )
        self.runtime.check_devices(x=x)
        outs = [self.runtime.empty((state.num_out_rows, width), dtype) for dtype, width in kinds]
        out_bytes = [as_byte_rows(o) for o in outs]
        check = functools.partial(check_agreement, what="dispatch (cached)", skip=(1, 8))
        transport.cached_dispatch(self.runtime, state, header, fields, out_bytes, check, stats)
        self._zero_padding(outs, state.recv_src_rank, topk_fill=False)
        recv_x = (outs[0], outs[1].view(-1)) if len(outs) == 2 else outs[0]
        return recv_x, None, None, None, None, EventOverlap()

    # ---- combine ---------------------------------------------------------------------------------
    def combine(
        self,
        transport: "NormalTransport",
        x: torch.Tensor,
        state: DispatchState,
        topk_weights: Optional[torch.Tensor] = None,
        bias: Union[None, torch.Tensor, Tuple[torch.Tensor, torch.Tensor]] = None,
        combine_send_cost_stats: Optional[torch.Tensor] = None,
    ):
        """Returns expert outputs to their tokens and sums them with the routing weights.

        Args:
            x: [N, H] bfloat16/float16/float32 expert outputs in the received layout.
            state: the DispatchState of the dispatch's handle.
            topk_weights: float32 [T, K] of this rank's tokens; default: the weights sent at dispatch.
            bias: None, a [T, H] tensor or a pair of them, added to the result.
            combine_send_cost_stats: None or int32 [R]; entry r grows by the microseconds it took to
                hand this rank's rows over to rank r.
        Returns:
            (combined_x [T, H] in x's dtype, combined_topk_weights float32 [T, K] (the weights used, 0
            where topk_idx is -1), EventOverlap). combined_x[t] = sum over k with topk_idx[t, k] != -1 of
            w[t, k] * x[row(t, k)], accumulated in float32 in k order.
        """
        self.runtime.check_alive()
        stats = self._check_cost_stats("combine_send_cost_stats", combine_send_cost_stats)
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
        self._check_buffer_fits(transport, state.hidden * x.element_size(), 1, "combine")
        self.runtime.check_devices(x=x, topk_weights=weights, bias=biases)
        x = x.contiguous()
        out = self.runtime.empty((num_tokens, state.hidden), x.dtype)
        header = torch.tensor(
            [
                OP_COMBINE,
                num_tokens,
                state.hidden,
                num_topk,
                plan.num_experts,
                NATIVE_DTYPE_CODES[x.dtype],
                0,
                0,
                state.num_out_rows,
            ],
            dtype=torch.int64,
        )
        check = functools.partial(check_agreement, what="combine", skip=(1, 8))

        def reduce(sources: List[torch.Tensor], src_rank: torch.Tensor, src_row: torch.Tensor) -> None:
            ops.weighted_reduce(out, sources, x.dtype, src_rank, src_row, weights, biases, self.runtime.num_threads)

        transport.combine(
            self.runtime, state, header, as_byte_rows(x), check, reduce, out, weights, topk_weights, biases, stats
        )
        return out, weights.masked_fill(state.topk_idx < 0, 0), EventOverlap()
