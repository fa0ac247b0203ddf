"""Normal mode (prefill / training): the layout counts, dispatch (fresh and cached) and combine.

`NormalMode` (the runtime's `normal`) checks the arguments and hands each call to the transport of
the calling strategy (deep_ep/strategies/normal_strategy.py: shared memory inside a node, the
hierarchical transport between nodes, or torch.distributed's all_to_all_single) as a named call:
DispatchCall, CachedDispatchCall or CombineCall. The transport shares the per-call header its own
way; for a fresh dispatch it then asks `NormalMode.receive` for the routing (`layout.py`) and the
outputs (a ReceivedRows), which it fills. The strategies turn the DispatchState built from it into
DeepEP-Ascend's handle (deep_ep/handles.py). docs/normal_data_path.md describes the data path.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional, Protocol, Tuple, Union

import numpy as np
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
    is_token_in_rank: Optional[torch.Tensor] = None  # int32 [T, R] on the host, from dispatch's checking pass

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


def header_words(fields: List[int], counts: Optional[np.ndarray] = None) -> np.ndarray:
    """int64 [len(HEADER_FIELDS) (+ E)]: a call's header fields, then this rank's per-expert counts
    if given. The meta stays in numpy on the host: the transports hand it to native calls or to
    `collective.all_gather_meta`."""
    header = np.array(fields, dtype=np.int64)
    return header if counts is None else np.concatenate((header, counts))


def agreed_fields(*skip: int) -> np.ndarray:
    """int64 indices of the HEADER_FIELDS every rank must agree on: all but `skip`."""
    return np.array([i for i in range(len(HEADER_FIELDS)) if i not in skip], dtype=np.int64)


# The fields a call's ranks must agree on: a fresh dispatch lets the token count differ; a cached
# dispatch and a combine also the received rows (index 8), which follow from the handle.
DISPATCH_AGREED = agreed_fields(1)
HANDLE_AGREED = agreed_fields(1, 8)


def check_agreement(meta_all: np.ndarray, what: str, agreed: np.ndarray) -> None:
    """ValueError naming the first header field the ranks disagree on.

    meta_all: int64 [R, >= len(HEADER_FIELDS)], every rank's header; agreed: indices of the fields
    that must be equal on every rank (DISPATCH_AGREED, HANDLE_AGREED)."""
    headers = meta_all[:, agreed]
    # One vectorised comparison: this runs on every call, the message only on a mismatch.
    if (headers == headers[0]).all():
        return
    for column, index in enumerate(agreed.tolist()):
        values = headers[:, column].tolist()
        if values.count(values[0]) == len(values):
            continue
        shown = [OP_NAMES.get(v, v) for v in values] if index == 0 else values
        listed = ", ".join(f"rank {r}: {v}" for r, v in enumerate(shown))
        raise ValueError(f"deep_ep {what}: ranks disagree on {HEADER_FIELDS[index]} ({listed})")


@dataclass
class DispatchCall:
    """A fresh dispatch as NormalMode hands it to its transport, every argument checked."""

    meta: np.ndarray  # int64 [len(HEADER_FIELDS) + E]: the header, then this rank's rows per expert
    fields: List[torch.Tensor]  # uint8 [T, b_i]: x (or int8 x and its scales), topk_idx, topk_weights
    kinds: List[Tuple[torch.dtype, int]]  # dtype and width of every field's received rows
    topk_idx: torch.Tensor  # int64 [T, K] as the caller gave it
    host_topk_idx: torch.Tensor  # the same on the host, contiguous (the routing math runs there)
    expert_alignment: int
    num_worst_tokens: int
    stats: Optional[torch.Tensor]  # int32 [R] cost statistics, or None

    @property
    def num_topk(self) -> int:
        return self.topk_idx.shape[1]

    @property
    def num_experts(self) -> int:
        return int(self.meta[HEADER_FIELDS.index("num_experts")])


@dataclass
class ReceivedRows:
    """A fresh dispatch's received rows, laid out once every rank's header is known
    (`NormalMode.receive`); the transport fills `outs` and `sources`."""

    plan: layout.RoutingPlan
    outs: List[torch.Tensor]  # [N, width] per field, in the DispatchCall's kinds
    sources: torch.Tensor  # int64 [3, N]: source rank, source token and top-k column of each row, -1 for padding
    num_real_rows: int  # rows that hold a selection (the others are padding)
    taken: torch.Tensor  # int64 [L, R]: rows placed so far per (local expert, source rank)
    internode: Optional[InternodeState] = None  # across nodes: the routes combine needs
    rows_by_source: Optional[torch.Tensor] = None  # collective transport: rows in arrival order
    topk_local: bool = False  # the transport made the received top-k ids local already

    @property
    def out_bytes(self) -> List[torch.Tensor]:
        """The outputs as uint8 [N, bytes] rows."""
        return [as_byte_rows(o) for o in self.outs]


@dataclass
class CachedDispatchCall:
    """A dispatch along the routes of an earlier one: only x moves."""

    header: np.ndarray  # int64 [len(HEADER_FIELDS)]
    fields: List[torch.Tensor]  # uint8 [T, b_i]: x (or int8 x and its scales)
    outs: List[torch.Tensor]  # uint8 [N, b_i], filled by the transport
    state: DispatchState
    stats: Optional[torch.Tensor]

    def check(self, meta_all: np.ndarray) -> None:
        """ValueError unless every rank's header agrees."""
        check_agreement(meta_all, "dispatch (cached)", HANDLE_AGREED)


@dataclass
class CombineCall:
    """A combine as NormalMode hands it to its transport, every argument checked."""

    header: np.ndarray  # int64 [len(HEADER_FIELDS)]
    state: DispatchState
    x_rows: torch.Tensor  # uint8 [N, H * itemsize]: the expert outputs in the received layout
    reduction: ops.Reduction  # into the output, with the weights and biases to use
    new_weights: Optional[torch.Tensor]  # the caller's float32 [T, K] weights, or None (the dispatch's)
    stats: Optional[torch.Tensor]

    def check(self, meta_all: np.ndarray) -> None:
        """ValueError unless every rank's header agrees."""
        check_agreement(meta_all, "combine", HANDLE_AGREED)


class NormalTransport(Protocol):
    """How one normal strategy moves rows (deep_ep/strategies/normal_strategy.py). `runtime` is the
    Buffer's Runtime (deep_ep/runtime.py)."""

    shm: Optional[shm.NodeShm]  # the shared memory whose data area bounds a row, or None

    def dispatch(self, runtime: "Runtime", call: DispatchCall) -> ReceivedRows:
        """Moves a fresh dispatch's rows: shares the meta, lets `runtime.normal.receive` lay out the
        outputs (it raises on every rank alike) and fills them."""

    def cached_dispatch(self, runtime: "Runtime", call: CachedDispatchCall) -> None:
        """Moves a cached dispatch's rows along the routes of `call.state`."""

    def combine(self, runtime: "Runtime", call: CombineCall) -> None:
        """Returns the expert outputs to their tokens and runs `call.reduction` on them."""


class NormalMode:
    """The normal-mode calls of one Buffer's runtime (`runtime.normal`), called by the normal strategies
    with the transport that moves the rows."""

    def __init__(self, runtime: "Runtime") -> None:
        # A proxy: the runtime owns this object, and a strong reference back would make a cycle that
        # keeps the runtime's groups alive until the garbage collector runs (docs/lifetime.md).
        self.runtime = weakref.proxy(runtime)

    # ---- layout ----------------------------------------------------------------------------------
    def _count_topk_idx(
        self, topk_idx: torch.Tensor, num_experts: int, experts_name: str = "num_experts", with_ranks: bool = True
    ) -> layout.SelectionCounts:
        """Checks topk_idx (int64 [T, K] in [-1, num_experts)) and counts it in one native
        pass on the host (layout.count_selections); ValueError naming what is wrong."""
        check_tensor("topk_idx", topk_idx, dtypes=(topk_idx_t,), shape=(None, None))
        check_num_topk(topk_idx.shape[1])
        ranks = self.runtime.group_size
        if not isinstance(num_experts, int) or num_experts <= 0 or num_experts % ranks:
            raise ValueError(f"{experts_name} must be a positive multiple of the {ranks} ranks, got {num_experts!r}")
        rank_to_node = self.runtime.rank_to_node if with_ranks and self.runtime.num_nodes > 1 else None
        host = topk_idx.cpu().contiguous()
        counts = layout.count_selections(host, num_experts, ranks, with_ranks, rank_to_node)
        if counts.low < -1 or counts.high >= num_experts:
            raise ValueError(
                f"topk_idx values must lie in [-1, {num_experts}), got values in [{counts.low}, {counts.high}]"
            )
        return counts

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
        device_path = self.runtime.device_path
        native = ops.native_ok(topk_idx, device_path)
        # On CPU the checking pass counts everything; on a device it only checks (on a host copy).
        counts = self._count_topk_idx(topk_idx, num_experts, with_ranks=native)
        self.runtime.check_devices(topk_idx=topk_idx)
        rounds = env.normal_settings().rounds
        if rounds.configured and topk_idx.shape[0] > rounds.rounds * rounds.per_round_tokens:
            raise ValueError(
                f"topk_idx has {topk_idx.shape[0]} tokens, more than DEEPEP_NORMAL_LONG_SEQ_ROUND * "
                f"DEEPEP_NORMAL_LONG_SEQ_PER_ROUND_TOKENS = {rounds.rounds * rounds.per_round_tokens}"
            )
        if native:
            per_rank, per_node, per_expert, in_rank = counts.layout()
        else:
            per_rank, per_node, per_expert, in_rank = layout.dispatch_layout(
                topk_idx,
                num_experts,
                self.runtime.group_size,
                self.runtime.rank_to_node if self.runtime.num_nodes > 1 else None,
                device_path,
            )
        if rounds.rounds > 1:
            per_expert = torch.cat(
                [
                    layout.dispatch_layout(
                        topk_idx[r * rounds.per_round_tokens : (r + 1) * rounds.per_round_tokens],
                        num_experts,
                        self.runtime.group_size,
                        device_path=device_path,
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
            q, scale = ops.quantize_int8(x, self.runtime.num_threads, self.runtime.device_path)
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
        if transport.shm is None or shm.window_rows(self.runtime.num_nvl_bytes, bytes_per_token, num_fields):
            return
        needed = shm.data_bytes_needed(1, bytes_per_token, num_fields)
        raise ValueError(
            f"num_nvl_bytes={self.runtime.num_nvl_bytes} is too small for {what}: one token row "
            f"needs at least {needed} bytes; create the Buffer with num_nvl_bytes >= {needed}"
        )

    def _check_cost_stats(self, name: str, stats: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """None, or `stats` checked to be int32 [R] (on any device: the host adds the measured times)."""
        if stats is not None:
            check_tensor(name, stats, dtypes=(torch.int32,), shape=(self.runtime.group_size,))
        return stats

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
        settings = env.normal_settings()
        quant = resolve_quant_mode(quant_mode, settings.int8_quant)
        stats = self._check_cost_stats("dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats)
        if handle_state is not None:
            return self._cached_dispatch(transport, x, handle_state, quant, stats, settings.rounds.rounds)
        if topk_idx is None or topk_weights is None:
            raise ValueError("dispatch needs topk_idx and topk_weights unless a handle is given")
        if num_tokens_per_expert is None:
            raise ValueError("dispatch needs num_tokens_per_expert (from get_dispatch_layout) unless a handle is given")
        check_tensor("num_tokens_per_expert", num_tokens_per_expert, dtypes=(torch.int32, torch.int64), shape=(None,))
        rounds = settings.rounds.rounds
        if num_tokens_per_expert.shape[0] % rounds:
            raise ValueError(
                f"num_tokens_per_expert must have rounds * E entries ({rounds} long-sequence rounds), "
                f"got {num_tokens_per_expert.shape[0]}"
            )
        num_experts = num_tokens_per_expert.shape[0] // rounds
        # The checking pass also gives is_token_in_rank, which the handle carries (no second pass).
        counts = self._count_topk_idx(topk_idx, num_experts, "num_experts (the length of num_tokens_per_expert)")
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
        given = num_tokens_per_expert if rounds == 1 else num_tokens_per_expert.reshape(rounds, num_experts).sum(0)
        if counts.per_expert.tolist() != given.tolist():
            raise ValueError(
                "num_tokens_per_expert does not match topk_idx; pass the counts get_dispatch_layout "
                "returned for this topk_idx"
            )
        fields += [as_byte_rows(topk_idx), as_byte_rows(topk_weights)]
        kinds += [(torch.int64, num_topk), (torch.float32, num_topk)]
        self._check_buffer_fits(transport, sum(f.shape[1] for f in fields), len(fields), "dispatch")
        quant_code = 1 if len(kinds) == 4 else 0
        header = [
            OP_DISPATCH,
            num_tokens,
            hidden,
            num_topk,
            num_experts,
            dtype_code,
            quant_code,
            expert_alignment,
            num_worst_tokens,
        ]
        call = DispatchCall(
            meta=header_words(header, counts.per_expert),
            fields=fields,
            kinds=kinds,
            topk_idx=topk_idx,
            host_topk_idx=counts.host,
            expert_alignment=expert_alignment,
            num_worst_tokens=num_worst_tokens,
            stats=stats,
        )
        received = transport.dispatch(self.runtime, call)
        plan, outs = received.plan, received.outs
        if received.num_real_rows < received.sources.shape[1]:
            self._zero_padding(outs, received.sources[0], topk_fill=True)
        recv_x = (outs[0], outs[1].view(-1)) if quant_code or isinstance(x, (tuple, list)) else outs[0]
        recv_topk_idx = outs[-2]
        if not received.topk_local:
            experts_per_rank = num_experts // self.runtime.group_size
            layout.localize_topk_idx_(recv_topk_idx, self.runtime.rank, experts_per_rank, self.runtime.device_path)
        state = DispatchState(
            plan=plan,
            recv_src_rank=received.sources[0],
            recv_src_idx=received.sources[1],
            recv_src_k=received.sources[2],
            num_out_rows=received.sources.shape[1],
            num_tokens=num_tokens,
            hidden=hidden,
            topk_idx=topk_idx,
            topk_weights=topk_weights,
            expert_alignment=expert_alignment,
            num_worst_tokens=num_worst_tokens,
            internode=received.internode,
            transport=transport,
            is_token_in_rank=torch.from_numpy(counts.in_rank),
        )
        if received.rows_by_source is not None:
            state.rows_by_source = received.rows_by_source
        expert_rows = plan.expert_rows
        if settings.expert_token_nums_type == 0:
            expert_rows = list(itertools.accumulate(expert_rows))
        return recv_x, recv_topk_idx, outs[-1], expert_rows, state, EventOverlap()

    def receive(self, call: DispatchCall, meta_all: np.ndarray, agree: bool = False) -> ReceivedRows:
        """Lays out a fresh dispatch's received rows from every rank's meta int64 [R, m] (the
        transports call it once the meta is shared; `agree`: they found the ranks agree on
        DISPATCH_AGREED already); ValueError when the ranks disagree or num_worst_tokens is too small
        (the same on every rank: they see the same meta)."""
        if not agree:
            check_agreement(meta_all, "dispatch", DISPATCH_AGREED)
        plan = layout.plan_routing(
            call.host_topk_idx, meta_all[:, len(HEADER_FIELDS) :], self.runtime.rank, call.expert_alignment
        )
        worst = call.num_worst_tokens
        rows_per_rank = plan.rows_per_rank.tolist()
        if worst and max(rows_per_rank) > worst:
            over = [r for r, n in enumerate(rows_per_rank) if n > worst]
            raise ValueError(
                f"num_worst_tokens={worst} is too small: ranks {over} receive {[rows_per_rank[r] for r in over]} rows"
            )
        out_rows = worst or rows_per_rank[self.runtime.rank]
        # numpy for the small host arrays: microseconds less per call than torch.full / zeros (and
        # empty + fill, where np.full adds a Python frame).
        sources = np.empty((3, out_rows), dtype=np.int64)
        sources.fill(-1)
        return ReceivedRows(
            plan=plan,
            outs=[self.runtime.empty((out_rows, width), dtype) for dtype, width in call.kinds],
            sources=torch.from_numpy(sources),
            num_real_rows=plan.num_real_rows,
            taken=torch.from_numpy(np.zeros((plan.experts_per_rank, plan.num_ranks), dtype=np.int64)),
        )

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
        self,
        transport: "NormalTransport",
        x,
        state: DispatchState,
        quant: str,
        stats: Optional[torch.Tensor],
        rounds: int,
    ):
        if state.internode is not None:
            # Across nodes the forwarders need the top-k to place rows: a dispatch with the handle's
            # routing lands every row where the first one did.
            counts = state.plan.tokens_per_expert_all[self.runtime.rank]
            # The counts of round 0 carry them all.
            counts = torch.from_numpy(np.concatenate([counts, np.zeros((rounds - 1) * counts.size, counts.dtype)]))
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
        header = header_words(
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
            ]
        )
        self.runtime.check_devices(x=x)
        outs = [self.runtime.empty((state.num_out_rows, width), dtype) for dtype, width in kinds]
        transport.cached_dispatch(
            self.runtime, CachedDispatchCall(header, fields, [as_byte_rows(o) for o in outs], state, stats)
        )
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
            w[t, k] * x[row(t, k)], summed in float64 in k order and rounded once (every strategy and
            host count gives the same bits; docs/normal_data_path.md).
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
        out = self.runtime.empty((num_tokens, state.hidden), x.dtype)
        header = header_words(
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
            ]
        )
        reduction = ops.Reduction(out, x.dtype, weights, biases, self.runtime.num_threads, self.runtime.device_path)
        transport.combine(self.runtime, CombineCall(header, state, as_byte_rows(x), reduction, topk_weights, stats))
        return out, weights.masked_fill(state.topk_idx < 0, 0), EventOverlap()
