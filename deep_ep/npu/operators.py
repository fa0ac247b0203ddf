"""CANN's fused MC2 MoE operators through torch_npu: low-latency dispatch/combine and fused_deep_moe.

Used by ``deep_ep.Buffer`` for low-latency mode with strategy ``"ops"`` and for ``fused_deep_moe``
on NPU. The calls follow the torch_npu documentation of the release found at run time
(``versions.py``; ``docs/npu.md`` has the sources). Nothing here can be run without an NPU:
the code maps the Buffer's shapes onto the operators' and back. ``torch_npu`` is imported
lazily: importing this module works on any machine.

How deep_ep's routing becomes the operators' (choices the operators leave to the caller):

* Every call pads ``x`` to ``BS = Nmax`` rows (true rows first) and passes ``global_bs = Nmax * R``:
  all ranks call with the same BS, ``T = 0`` works (the operators need ``BS > 0``) and shapes are
  static.
* ``x_active_mask`` is the 2-D ``[BS, K]`` form where the release documents it for the mode, else
  the 1-D ``[BS]`` form, and None on A2 hierarchy and for the v1 operators.
* **Sink experts.** The operators reject ``-1`` in ``expert_ids``; a 2-D mask drops such entries.
  Where the mask cannot (1-D or None), every rank gets ``s = ceil(K / R)`` extra experts after its
  ``L`` real ones (the operators see ``R * (L + s)`` experts; real expert ``g`` is operator expert
  ``(g // L) * (L + s) + g % L``), and the j-th ``-1`` entry of a row goes to sink ``L + j // R`` of
  rank ``(rank + j) % R`` with weight 0. With ``S`` shared-expert ranks (``shared_expert_rank_num``)
  only the ``R - S`` routed ranks hold experts, so ``R - S`` takes the place of ``R`` here. A rank's
  rows are grouped by its local expert, so the sink rows come after all real rows: ``recv_count``,
  the layout and ``ep_recv_count`` only count real experts, and the ``M`` rows returned as
  ``recv_x`` hold every real row. The cost is the sink rows on the wire.
* A2 hierarchical mode is selected by HCCL's environment pair with ``comm_alg`` left empty; deep_ep
  never passes ``comm_alg`` (torch_npu 7.1.0 has no such argument, A3 has no "hierarchy").

Operator facts relied on beyond the signatures:

* ``ep_recv_counts`` of the dispatch: its first ``L' * R`` entries (``L'`` operator experts per
  rank) are the inclusive prefix sum of received rows at ``[e * R + r]`` (local expert ``e``,
  source rank ``r``). CANN says the values may change between versions, so ``recv_layout`` checks
  them against ``expert_token_nums`` and raises if they no longer match.
* ``npu_dequant_swiglu_quant(activate_left=True)`` computes ``silu(left half) * right half``, so
  gmm1's output columns must be ``[gate | up]``.
* ``npu_grouped_matmul`` with int8 inputs and bf16 output wants ``scale`` in bf16 (as vLLM-Ascend
  passes it).
"""

from __future__ import annotations

import dataclasses
import math
import weakref

import torch
import torch.distributed as dist

from .. import layout
from ..fused import ExpertWeights
from ..transport import groups
from . import versions

# gmm1_permuted_weight interleaves gate/up columns in tiles of this width (deep_ep.permute_gmm1_weight).
_GATE_UP_TILE = 64
_MB = 1 << 20
_HCCL_DEFAULT_MB = 200


def torch_npu_available() -> bool:
    """True when ``import torch_npu`` succeeds (not cached: tests swap the module)."""
    try:
        import torch_npu  # noqa: F401
    except Exception:  # a broken CANN install raises more than ImportError
        return False
    return True


def detect_soc() -> str | None:
    """The Ascend SoC family of the current device.

    Returns ``"A2"`` for ``Ascend910B*``, ``"A3"`` for ``Ascend910_93*`` (from
    ``torch.npu.get_device_name()``), and ``None`` when torch_npu is missing, no
    NPU is visible, or the device is another SoC.
    """
    if not torch_npu_available():
        return None
    import torch_npu  # noqa: F401  (registers torch.npu)

    if not torch.npu.is_available():
        return None
    name = torch.npu.get_device_name()
    if name.startswith("Ascend910B"):
        return "A2"
    if name.startswith("Ascend910_93"):
        return "A3"
    return None


def detect_release() -> versions.Release:
    """The rules of the installed torch_npu / CANN (the oldest release's when torch_npu cannot say)."""
    if not torch_npu_available():
        return versions.OLDEST
    import torch_npu

    return versions.release_for_cann(versions.cann_version(torch_npu))


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def hccl_buffsize_mb(
    num_max_dispatch_tokens_per_rank: int,
    hidden: int,
    num_ranks: int,
    num_experts: int,
    num_topk: int,
    mode: str | None = None,
    release: versions.Release | None = None,
    num_shared_ranks: int = 0,
) -> int:
    """``HCCL_BUFFSIZE`` (MB) the MC2 dispatch/combine operators need for these sizes.

    ``mode``: "A2-fullmesh", "A2-hierarchy" or "A3" (None: this machine's, from the device and the
    environment); ``release``: whose mask rules decide the sink experts (None: the installed one);
    ``num_shared_ranks``: S shared-expert ranks (MOE_SHARED_EXPERT_RANK_NUM), E then a multiple of R - S.
    With ``BS`` = Nmax, ``L'`` operator experts per routed rank and ``E' = R * L'`` (sink experts
    included; shared-expert ranks counted like routed ones, an upper bound), bf16 rows of ``2H``
    bytes, in bytes::

        A2 fullmesh:  2 * (BS * R * min(L', K) * 2H + 2 MB)
        A2 hierarchy: (E' + R / 4) * Align512(BS * (2H + 4 * Align8(K) * 4)) + 8 MB
        A3:           2 * (BS * R * L' * Align512(Align32(2H) + 64) + BS * (K + 1) * Align512(2H))

    rounded up to whole MB and never below HCCL's default of 200 MB. Set it before the HCCL group
    is created.
    """
    if num_ranks <= 0:
        raise ValueError(f"num_ranks must be positive, got {num_ranks}")
    placement = layout.SharedExperts.check(num_experts, num_ranks, num_shared_ranks)
    if mode is None:
        mode = versions.mc2_mode(detect_soc())
        if mode is None:
            raise ValueError(
                "no Atlas A2/A3 NPU detected: give the mode (A2-fullmesh, A2-hierarchy or A3; --mode "
                "on the command line)"
            )
    if mode not in versions.MODES:
        raise ValueError(f"mode must be one of {list(versions.MODES)}, got {mode!r}")
    release = release or detect_release()
    routed_ranks = num_ranks - num_shared_ranks
    sinks = versions.sinks_per_rank(versions.mask_rank(release, mode, True), routed_ranks, num_topk)
    op_local = placement.experts_per_rank + sinks
    bs, row = num_max_dispatch_tokens_per_rank, 2 * hidden
    if mode == versions.A2_FULLMESH:
        need = 2 * (bs * num_ranks * min(op_local, num_topk) * row + 2 * _MB)
    elif mode == versions.A2_HIERARCHY:
        need = (op_local * num_ranks + num_ranks // 4) * _align(bs * (row + 4 * _align(num_topk, 8) * 4), 512) + 8 * _MB
    else:  # one shared expert: the operators' default shared_expert_num
        need = 2 * (
            bs * num_ranks * op_local * _align(_align(row, 32) + 64, 512) + bs * (num_topk + 1) * _align(row, 512)
        )
    return max(_HCCL_DEFAULT_MB, math.ceil(need / _MB))


def _npu_device() -> torch.device:
    """The NPU device type (valid only once torch_npu is imported)."""
    return torch.device("npu")


def _unpermute_gate_up(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile-interleaved gmm1 columns -> ``[gate | up]`` halves.

    Layout of ``weight`` int8 ``[L, H, 2I]`` and ``scale`` ``[L, 2I]``: tile 2j
    holds gate columns ``[64j, 64j+64)``, tile 2j+1 the up columns ``[64j, 64j+64)``.
    Returns contiguous ``[L, H, 2I]`` and float32 ``[L, 2I]`` with gate columns
    ``[0, I)`` then up columns ``[I, 2I)``.
    """
    num_local_experts, hidden, two_i = weight.shape
    tiles = two_i // (2 * _GATE_UP_TILE)
    # [.., tile j, (gate|up), 64] -> [.., (gate|up), tile j, 64]
    w = weight.reshape(num_local_experts, hidden, tiles, 2, _GATE_UP_TILE).transpose(2, 3)
    s = scale.reshape(num_local_experts, tiles, 2, _GATE_UP_TILE).transpose(1, 2)
    return (
        w.reshape(num_local_experts, hidden, two_i).contiguous(),
        s.reshape(num_local_experts, two_i).to(torch.float32).contiguous(),
    )


def _shared_expert_args(num_shared_ranks: int) -> dict:
    """The operators' shared-expert arguments: none without shared-expert ranks (their defaults);
    else one shared expert on the first ``num_shared_ranks`` ranks, as DeepEP-Ascend passes them."""
    if not num_shared_ranks:
        return {}
    return dict(shared_expert_num=1, shared_expert_rank_num=num_shared_ranks)


def _in_out_weight(weight: torch.Tensor, scale: None) -> tuple[torch.Tensor, None]:
    """gmm2 ``[L, H, I]`` ([out, in]) -> contiguous ``[L, I, H]``, npu_grouped_matmul's weight order."""
    return weight.transpose(1, 2).contiguous(), scale


def _fill_masked_expert_ids(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Replace ``-1`` in ``topk_idx`` (int64 ``[BS, K]``) by valid ids; returns int32 ``[BS, K]``.

    For the 2-D mask, which drops these entries: the operators reject -1 and want the K ids of a
    row distinct, so the j-th ``-1`` of a row gets the j-th smallest expert id the row does not use.
    """
    valid = topk_idx >= 0
    rows = topk_idx.shape[0]
    used = torch.zeros(rows, num_experts + 1, dtype=torch.int32, device=topk_idx.device)
    # column num_experts is a sink for the -1 entries
    used.scatter_(1, torch.where(valid, topk_idx, num_experts), 1)
    free_ids = torch.sort(used[:, :num_experts], dim=1, stable=True).indices  # unused ids first
    slot = ((~valid).to(torch.int64).cumsum(1) - 1).clamp(min=0)
    return torch.where(valid, topk_idx, free_ids.gather(1, slot)).to(torch.int32)


@dataclasses.dataclass(frozen=True)
class OperatorExperts:
    """How deep_ep's experts and ``-1`` entries map onto the operators' experts for one call shape
    (see "Sink experts" in the module doc)."""

    rank: int
    num_ranks: int  # R
    num_experts: int  # E, deep_ep's (the routed experts)
    mask_rank: int  # versions.MASK_*
    sinks: int  # s, sink experts per routed rank (0 with the 2-D mask)
    num_shared_ranks: int = 0  # S: ranks [0, S) hold the shared expert only (layout.SharedExperts)

    @property
    def routed_ranks(self) -> int:  # R - S, the ranks that hold routed (and sink) experts
        return self.num_ranks - self.num_shared_ranks

    @property
    def experts_per_rank(self) -> int:  # L of a routed rank
        return self.num_experts // self.routed_ranks

    @property
    def is_shared(self) -> bool:
        return self.rank < self.num_shared_ranks

    @property
    def num_local_experts(self) -> int:  # this rank's L: 1 on a shared-expert rank
        return 1 if self.is_shared else self.experts_per_rank

    @property
    def local_per_routed_rank(self) -> int:  # L + s, the operators' experts on a routed rank
        return self.experts_per_rank + self.sinks

    @property
    def local(self) -> int:  # this rank's operator experts (sinks included)
        return 1 if self.is_shared else self.local_per_routed_rank

    @property
    def total(self) -> int:  # the operators' moe_expert_num (routed experts and sinks)
        return self.routed_ranks * self.local_per_routed_rank

    def expert_ids(self, topk_idx: torch.Tensor) -> torch.Tensor:
        """int32 ``[BS, K]`` expert_ids for padded int64 ``topk_idx`` ``[BS, K]`` in ``[-1, E)``."""
        if self.mask_rank == versions.MASK_ENTRIES:
            return _fill_masked_expert_ids(topk_idx, self.num_experts)
        valid = topk_idx >= 0
        per_rank, op_per_rank, routed = self.experts_per_rank, self.local_per_routed_rank, self.routed_ranks
        real = topk_idx.clamp(min=0)
        real = real // per_rank * op_per_rank + real % per_rank
        j = (~valid).to(torch.int64).cumsum(1) - 1  # the j-th -1 entry of its row
        sink = (self.rank + j) % routed * op_per_rank + per_rank + j // routed
        return torch.where(valid, real, sink).to(torch.int32)

    def active_mask(self, topk_idx: torch.Tensor, num_tokens: int) -> torch.Tensor | None:
        """The x_active_mask for padded ``topk_idx`` ``[BS, K]`` whose first ``num_tokens`` rows are real."""
        if self.mask_rank == versions.MASK_ENTRIES:
            return topk_idx >= 0
        if self.mask_rank == versions.MASK_ROWS:
            return torch.arange(topk_idx.shape[0], device=topk_idx.device) < num_tokens
        return None


def recv_layout(
    ep_recv_counts: torch.Tensor, expert_token_nums: torch.Tensor, experts: OperatorExperts
) -> torch.Tensor:
    """int64 ``[L * R]``: inclusive prefix of received rows per (local expert e, source rank r) at ``e * R + r``.

    Read from the dispatch's ``ep_recv_counts`` (``[L' * R]`` prefix first, then product-specific
    entries). CANN documents its values as subject to change, so this checks them against
    ``expert_token_nums`` (counts, int64 ``[L']``) and raises a RuntimeError when they disagree.
    """
    size = experts.local * experts.num_ranks
    counts = expert_token_nums.to(torch.int64)
    ok = ep_recv_counts.dim() == 1 and ep_recv_counts.numel() >= size and counts.shape == (experts.local,)
    if ok:
        prefix = ep_recv_counts[:size].to(torch.int64)
        ends = prefix.view(experts.local, experts.num_ranks)[:, -1]  # rows up to and including expert e
        steps = torch.diff(prefix, prepend=prefix.new_zeros(1))
        ok = bool((ends == counts.cumsum(0)).all() & (steps >= 0).all())  # one host sync
    if not ok:
        raise RuntimeError(
            f"deep_ep: the MC2 dispatch's ep_recv_counts (shape {tuple(ep_recv_counts.shape)}) is not the inclusive "
            f"prefix of rows per (local expert, source rank) at [e * R + r] that agrees with expert_token_nums "
            f"{counts.tolist()}: this CANN changed its layout. deep_ep reads it for the low-latency handle's layout "
            "and fused_deep_moe's ep_recv_count; please report it with `python -m deep_ep.npu.env --report`."
        )
    return prefix[: experts.num_local_experts * experts.num_ranks]


@dataclasses.dataclass
class NpuLowLatencyHandle:
    """What ``NpuLowLatency.combine`` needs from a dispatch (the Buffer's low-latency handle).

    ``BS`` = padded batch (Nmax), ``K`` = top-k, ``A`` = rows of the operator's
    ``expand_x``. Operator outputs are kept as returned and passed back unchanged.
    """

    assist_info_for_combine: torch.Tensor  # int32 [A * 128] (v1: expand_idx [BS * K]); per-row source info
    ep_recv_counts: torch.Tensor  # int32, the combine's ep_send_counts
    tp_recv_counts: torch.Tensor  # int32, the combine's tp_send_counts
    expand_scales: torch.Tensor | None  # float32 [A]; the combine's expand_scales on A2, else None
    expert_ids: torch.Tensor  # int32 [BS, K], OperatorExperts.expert_ids
    x_active_mask: torch.Tensor | None  # bool [BS, K] or [BS], or None: as passed to the dispatch
    topk_weights: torch.Tensor | None  # float32 [BS, K] padded, 0 where masked; as given at dispatch
    recv_count: torch.Tensor  # int64 [L]
    recv_layout_prefix: torch.Tensor  # int64 [L * R], inclusive prefix of rows per (e, r) at [e * R + r]
    experts: OperatorExperts
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_tokens: int  # T, rows of this rank's x
    expand_rows: int  # A
    global_bs: int
    use_v2: bool

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def num_shared_ranks(self) -> int:  # shared_expert_rank_num of the operators (MOE_SHARED_EXPERT_RANK_NUM)
        return self.experts.num_shared_ranks


class NpuLowLatency:
    """Low-latency dispatch/combine and fused_deep_moe on CANN's MC2 operators.

    Tensors are used on the device they come on (NPU in production); this class never moves
    data between devices. The module doc says how deep_ep's routing maps onto the operators.
    """

    def __init__(
        self, group: dist.ProcessGroup, rank: int, num_ranks: int, num_experts_hint: int | None = None
    ) -> None:
        """Create the dedicated HCCL communicator. Collective: every rank of ``group`` must call.

        ``rank``/``num_ranks``: this process's rank in ``group`` and its size.
        ``num_experts_hint``: when given, ``E % R == 0`` is checked here already.
        """
        import torch_npu

        if num_experts_hint is not None and num_experts_hint % num_ranks != 0:
            raise ValueError(f"num_experts ({num_experts_hint}) must be a multiple of num_ranks ({num_ranks})")
        self._torch_npu = torch_npu
        self.rank = rank
        self.num_ranks = num_ranks
        self.num_experts_hint = num_experts_hint
        self.soc = detect_soc()
        self.release = detect_release()
        # The MC2 operators need a communicator no other operator uses (torch_npu's documentation):
        # a new group over the same global ranks, in group order so that the rank
        # in the new group equals `rank`. Collective over the ranks of `group` only.
        self.group = groups.group_over(group, "hccl")
        self.comm_name: str = self.group._get_backend(_npu_device()).get_hccl_comm_name(rank)
        self._use_v2 = hasattr(torch_npu, "npu_moe_distribute_dispatch_v2") and hasattr(
            torch_npu, "npu_moe_distribute_combine_v2"
        )
        # id(weight) -> (weight ref, weight version, scale ref, scale version, converted weight, scale)
        self._gate_up_cache: dict[int, tuple] = {}

    @property
    def mode(self) -> str | None:
        """ "A3", "A2-fullmesh" or "A2-hierarchy" (from the device and HCCL's environment), None elsewhere."""
        return versions.mc2_mode(self.soc)

    def operator_experts(self, num_experts: int, num_topk: int, num_shared_ranks: int = 0) -> OperatorExperts:
        """The expert mapping this rank's calls use for E routed experts, top-k K and S shared-expert ranks."""
        mask = versions.mask_rank(self.release, self.mode, self._use_v2)
        return OperatorExperts(
            rank=self.rank,
            num_ranks=self.num_ranks,
            num_experts=num_experts,
            mask_rank=mask,
            sinks=versions.sinks_per_rank(mask, self.num_ranks - num_shared_ranks, num_topk),
            num_shared_ranks=num_shared_ranks,
        )

    def check_limits(
        self, hidden: int, bs: int, num_topk: int, num_experts: int, has_weights: bool, num_shared_ranks: int = 0
    ) -> None:
        """ValueError naming the operator limit of this device, mode and release that the sizes break."""
        experts = self.operator_experts(num_experts, num_topk, num_shared_ranks)
        versions.check_limits(
            self.release,
            self.mode,
            self.num_ranks,
            hidden,
            bs,
            num_topk,
            experts.local_per_routed_rank,
            experts.total,
            has_weights,
        )

    def dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor | None,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        use_int8: bool,
        cumulative_local_expert_recv_stats: torch.Tensor | None,
        num_shared_ranks: int = 0,
    ) -> tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], torch.Tensor, NpuLowLatencyHandle]:
        """Low-latency dispatch with ``npu_moe_distribute_dispatch_v2`` (v1 if v2 is missing).

        Args:
            x: bf16/fp16 ``[T, H]``, ``T <= Nmax``.
            topk_idx: int64 ``[T, K]``, values in ``[-1, E)``.
            topk_weights: float32 ``[T, K]`` or None (required in A2 hierarchical mode).
            num_max_dispatch_tokens_per_rank: Nmax, the same on every rank.
            num_experts: E, the routed experts, a multiple of R - S.
            use_int8: per-token dynamic int8 quantization by the operator (quant_mode=2).
            cumulative_local_expert_recv_stats: int32 ``[L]`` or None; recv_count is added to it.
            num_shared_ranks: S, shared-expert ranks (shared_expert_rank_num, with one shared expert,
                shared_expert_num=1): ranks [0, S) hold it (L = 1), the others L = E / (R - S) routed
                experts (layout.SharedExperts).

        Returns:
            ``recv_x``: ``[M, H]`` in x's dtype, or with int8 the pair
            ``(int8 [M, H], float32 scales [M])``; ``M = Nmax * R * min(K, L)`` (``Nmax * ceil(R / S)``
            on a shared-expert rank), rows packed by local expert, only the first ``recv_count.sum()`` valid.
            ``recv_count``: int64 ``[L]`` rows per local expert.
            ``handle``: :class:`NpuLowLatencyHandle`.
        """
        num_tokens, hidden = x.shape
        num_topk = topk_idx.shape[1]
        nmax, num_ranks = num_max_dispatch_tokens_per_rank, self.num_ranks
        if x.dtype not in (torch.bfloat16, torch.float16):
            raise TypeError(f"x must be bfloat16 or float16 for the NPU operators; got {x.dtype}")
        if topk_idx.shape[0] != num_tokens:
            raise ValueError(f"topk_idx must be [T={num_tokens}, K]; got {tuple(topk_idx.shape)}")
        if nmax < 1 or num_tokens > nmax:
            raise ValueError(
                f"x has {num_tokens} tokens; expected at most "
                f"num_max_dispatch_tokens_per_rank={nmax} (which must be >= 1)"
            )
        roles = layout.SharedExperts.check(num_experts, num_ranks, num_shared_ranks)
        self.check_limits(hidden, nmax, num_topk, num_experts, topk_weights is not None, num_shared_ranks)
        experts = self.operator_experts(num_experts, num_topk, num_shared_ranks)
        on_a2 = self.soc == "A2"
        global_bs = nmax * num_ranks
        rows_out = roles.packed_rows(self.rank, nmax, num_topk)  # M

        # Pad to BS = Nmax rows, true rows first.
        x_pad = x.new_zeros(nmax, hidden)
        x_pad[:num_tokens] = x
        idx_pad = topk_idx.new_full((nmax, num_topk), -1)
        idx_pad[:num_tokens] = topk_idx
        mask = experts.active_mask(idx_pad, num_tokens)
        expert_ids = experts.expert_ids(idx_pad)
        weights_pad = None
        if topk_weights is not None:
            weights_pad = torch.zeros(nmax, num_topk, dtype=torch.float32, device=x.device)
            weights_pad[:num_tokens] = topk_weights
            weights_pad.masked_fill_(idx_pad < 0, 0.0)

        kwargs = dict(
            x_active_mask=mask,
            # On A2 the dispatch turns them into the expand_scales its combine takes; on A3 they
            # only serve comm_alg="hierarchy", which is not used.
            expert_scales=weights_pad if on_a2 else None,
            quant_mode=2 if use_int8 else 0,
            global_bs=global_bs,
            expert_token_nums_type=1,
            **_shared_expert_args(num_shared_ranks),
        )
        operator = (
            self._torch_npu.npu_moe_distribute_dispatch_v2
            if self._use_v2
            else self._torch_npu.npu_moe_distribute_dispatch
        )
        outputs = operator(x_pad, expert_ids, self.comm_name, num_ranks, self.rank, experts.total, **kwargs)
        (expand_x, dynamic_scales, assist_info, expert_token_nums, ep_recv_counts, tp_recv_counts, expand_scales) = (
            outputs[:7]
        )

        recv_count = expert_token_nums[: experts.num_local_experts].to(torch.int64)
        layout_prefix = recv_layout(ep_recv_counts, expert_token_nums, experts)
        if cumulative_local_expert_recv_stats is not None:
            cumulative_local_expert_recv_stats.add_(recv_count.to(cumulative_local_expert_recv_stats.dtype))
        # A >= global_bs * min(L + s, K) >= M; the real rows come first, recv_x is M rows.
        recv_x = expand_x[:rows_out]
        if use_int8:
            recv_x = (recv_x, dynamic_scales[:rows_out])
        handle = NpuLowLatencyHandle(
            assist_info_for_combine=assist_info,
            ep_recv_counts=ep_recv_counts,
            tp_recv_counts=tp_recv_counts,
            expand_scales=expand_scales if on_a2 else None,
            expert_ids=expert_ids,
            x_active_mask=mask,
            topk_weights=weights_pad,
            recv_count=recv_count,
            recv_layout_prefix=layout_prefix,
            experts=experts,
            num_max_dispatch_tokens_per_rank=nmax,
            hidden=hidden,
            num_tokens=num_tokens,
            expand_rows=expand_x.shape[0],
            global_bs=global_bs,
            use_v2=self._use_v2,
        )
        return recv_x, recv_count, handle

    def combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: NpuLowLatencyHandle,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Weighted combine with ``npu_moe_distribute_combine_v2`` (v1 with expand_idx if v2 is missing).

        Args:
            x: bf16/fp16 ``[M, H]`` expert outputs in the dispatch's packed layout
               (``[A, H]`` is accepted too; rows past the counts are ignored).
            topk_idx: int64 ``[T, K]`` as at dispatch, entries may be set to -1 since; the operator
               gets the dispatch's expert ids from the handle and weight 0 for -1 entries.
            topk_weights: float32 ``[T, K]``; entries of -1 experts count as 0.
            handle: from :meth:`dispatch`.
            out: optional ``[T, H]`` tensor the result is copied into.

        Returns:
            ``[T, H]`` in x's dtype: per token the weighted sum of its experts' rows.
        """
        nmax, hidden = handle.num_max_dispatch_tokens_per_rank, handle.hidden
        num_tokens, num_topk = handle.num_tokens, handle.expert_ids.shape[1]
        if x.dim() != 2 or x.shape[1] != hidden:
            raise ValueError(f"x must be [M, H={hidden}] as at dispatch; got {tuple(x.shape)}")
        if x.shape[0] > handle.expand_rows:
            raise ValueError(f"x has {x.shape[0]} rows; the dispatch produced {handle.expand_rows}")
        for name, t in (("topk_idx", topk_idx), ("topk_weights", topk_weights)):
            if tuple(t.shape) != (num_tokens, num_topk):
                raise ValueError(f"{name} must be [T={num_tokens}, K={num_topk}] as at dispatch; got {tuple(t.shape)}")
        if x.shape[0] < handle.expand_rows:  # dispatch returned only the first M of A rows
            x = torch.cat([x, x.new_zeros(handle.expand_rows - x.shape[0], hidden)])
        if handle.experts.sinks:
            # Sink rows are combined with weight 0; rows past the real ones may hold anything (torch.empty,
            # a grouped matmul's unwritten rows) and 0 * NaN is NaN: zero them, without a host sync.
            real = torch.arange(x.shape[0], device=x.device) < handle.recv_count.sum()
            x = torch.where(real.unsqueeze(1), x, x.new_zeros(()))
        weights = torch.zeros(nmax, num_topk, dtype=torch.float32, device=x.device)
        weights[:num_tokens] = torch.where(topk_idx >= 0, topk_weights, 0.0)  # sinks and padding stay 0

        kwargs = dict(
            tp_send_counts=handle.tp_recv_counts,
            x_active_mask=handle.x_active_mask,
            expand_scales=handle.expand_scales,
            global_bs=handle.global_bs,
            **_shared_expert_args(handle.num_shared_ranks),
        )
        if handle.use_v2:
            combined = self._torch_npu.npu_moe_distribute_combine_v2(
                x,
                handle.expert_ids,
                handle.assist_info_for_combine,
                handle.ep_recv_counts,
                weights,
                self.comm_name,
                self.num_ranks,
                self.rank,
                handle.experts.total,
                **kwargs,
            )
        else:
            combined = self._torch_npu.npu_moe_distribute_combine(
                x,
                handle.expert_ids,
                handle.assist_info_for_combine,
                handle.ep_recv_counts,
                weights,
                self.comm_name,
                self.num_ranks,
                self.rank,
                handle.experts.total,
                **kwargs,
            )
        result = combined[:num_tokens]
        if out is None:
            return result
        out.copy_(result)
        return out

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
        num_shared_ranks: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """W8A8 SwiGLU expert MLP between an MC2 dispatch and combine (Buffer.fused_deep_moe).

        dispatch (quant_mode=2) -> ``npu_grouped_matmul`` int8 x int8 -> int32 ``[A, 2I]``
        -> ``npu_dequant_swiglu_quant`` -> int8 ``[A, I]`` + scales -> ``npu_grouped_matmul``
        -> bf16 ``[A, H]`` -> combine.

        Args:
            x: bf16 ``[T, H]``; topk_idx int64 ``[T, K]``; topk_weights float32 ``[T, K]``.
            gmm1_permuted_weight: int8 ``[L, H, 2I]``, gate/up columns interleaved in
                64-wide tiles (``2I % 128 == 0`` as ``deep_ep.permute_gmm1_weight``
                makes it); gmm1_permuted_weight_scale: float32 ``[L, 2I]``, same order.
                Both are turned into ``[gate | up]`` once per weight tensor (cached),
                because ``npu_dequant_swiglu_quant(activate_left=True)`` takes gate and
                up as the two contiguous halves.
            gmm2_weight: int8 ``[L, H, I]``, each expert's down projection in ``[out, in]`` order
                as DeepEP-Ascend's callers pass it (``y = a @ W2[e].T``; transposed once per weight
                tensor, cached, for ``npu_grouped_matmul``); gmm2_weight_scale: float32 ``[L, H]``.
            num_shared_ranks: S shared-expert ranks (see :meth:`dispatch`); L = 1 on them.

        Returns:
            ``(output bf16 [T, H], ep_recv_count int32 [L * R])`` where
            ``ep_recv_count[e * R + r]`` = rows local expert e received from rank r,
            taken as differences of the dispatch's ``ep_recv_counts`` prefix (see module doc).
        """
        num_local_experts = layout.SharedExperts.check(num_experts, self.num_ranks, num_shared_ranks).local_experts(
            self.rank
        )
        hidden = x.shape[1]
        if gmm1_permuted_weight.dtype != torch.int8 or gmm2_weight.dtype != torch.int8:
            raise TypeError(
                f"gmm1_permuted_weight and gmm2_weight must be int8; got "
                f"{gmm1_permuted_weight.dtype} and {gmm2_weight.dtype}"
            )
        two_i = gmm1_permuted_weight.shape[-1]
        if two_i <= 0 or two_i % (2 * _GATE_UP_TILE):
            raise ValueError(
                f"gmm1_permuted_weight's last dimension (2I) must be a positive "
                f"multiple of {2 * _GATE_UP_TILE} (whole 64-column gate/up tiles); "
                f"got {two_i}"
            )
        intermediate = two_i // 2
        expected = {
            "gmm1_permuted_weight": (gmm1_permuted_weight, (num_local_experts, hidden, two_i)),
            "gmm1_permuted_weight_scale": (gmm1_permuted_weight_scale, (num_local_experts, two_i)),
            "gmm2_weight": (gmm2_weight, (num_local_experts, hidden, intermediate)),
            "gmm2_weight_scale": (gmm2_weight_scale, (num_local_experts, hidden)),
        }
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"{name} must be {list(shape)} (L={num_local_experts}, H={hidden}, "
                    f"I={intermediate}); got {list(tensor.shape)}"
                )

        w1, s1 = self._gate_up_weights(gmm1_permuted_weight, gmm1_permuted_weight_scale)
        w2, _ = self._converted(gmm2_weight, None, _in_out_weight)
        output, _, handle = self._swiglu_mlp_between(
            x,
            topk_idx,
            topk_weights,
            w1,
            s1,
            w2,
            gmm2_weight_scale,
            num_max_dispatch_tokens_per_rank,
            num_experts,
            num_shared_ranks,
        )
        prefix = handle.recv_layout_prefix  # checked against expert_token_nums (recv_layout)
        ep_recv_count = torch.diff(prefix, prepend=prefix.new_zeros(1)).to(torch.int32)
        return output, ep_recv_count

    def dispatch_ffn_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        weights: ExpertWeights,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """FuseMode.DISPATCH_FFN_COMBINE (Buffer.fused_deep_moe): the pipeline of fused_deep_moe with
        weights that fused.check_expert_weights has put in the operators' layout already (gmm1
        ``[gate | up]`` int8 ``[L, H, 2I]``, gmm2 int8 ``[L, I, H]``, float32 scales), no shared experts.
        Returns ``(output bf16 [T, H], expert_token_nums int32 [L])``: the rows each local expert received."""
        output, recv_count, _ = self._swiglu_mlp_between(
            x,
            topk_idx,
            topk_weights,
            weights.w1,
            weights.w1_scale,
            weights.w2,
            weights.w2_scale,
            num_max_dispatch_tokens_per_rank,
            num_experts,
            0,
        )
        return output, recv_count.to(torch.int32)

    def _swiglu_mlp_between(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        w1: torch.Tensor,
        s1: torch.Tensor,
        w2: torch.Tensor,
        s2: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        num_shared_ranks: int,
    ):
        """MC2 dispatch (int8) -> W8A8 SwiGLU MLP -> MC2 combine, with w1 int8 ``[L, H, 2I]`` in
        ``[gate | up]`` order, s1 float32 ``[L, 2I]``, w2 int8 ``[L, I, H]``, s2 ``[L, H]``.
        Returns (output bf16 [T, H], recv_count [L], the dispatch's handle)."""
        (recv_xq, recv_scale), recv_count, handle = self.dispatch(
            x,
            topk_idx,
            topk_weights,
            num_max_dispatch_tokens_per_rank,
            num_experts,
            use_int8=True,
            cumulative_local_expert_recv_stats=None,
            num_shared_ranks=num_shared_ranks,
        )
        torch_npu = self._torch_npu
        h_int32 = torch_npu.npu_grouped_matmul(
            [recv_xq],
            [w1],
            group_list=recv_count,
            group_type=0,
            split_item=2,
            group_list_type=1,
            output_dtype=torch.int32,
        )[0]
        # dequant with per-token x scales and per-column w1 scales, silu(gate) * up,
        # then per-token dynamic int8 requantization (quant_mode=1)
        a_int8, a_scale = torch_npu.npu_dequant_swiglu_quant(
            h_int32,
            weight_scale=s1,
            activation_scale=recv_scale,
            group_index=recv_count,
            activate_left=True,
            quant_mode=1,
        )
        # int8 x int8 with bf16 output takes its per-channel scale in bf16
        y = torch_npu.npu_grouped_matmul(
            [a_int8],
            [w2],
            scale=[s2.to(torch.bfloat16)],
            per_token_scale=[a_scale],
            group_list=recv_count,
            group_type=0,
            split_item=2,
            group_list_type=1,
            output_dtype=torch.bfloat16,
        )[0]
        return self.combine(y, topk_idx, topk_weights, handle), recv_count, handle

    def _gate_up_weights(self, weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[gate | up]`` copies of gmm1's tile-interleaved weight ``[L, H, 2I]`` and scale ``[L, 2I]``.

        ``npu_dequant_swiglu_quant(activate_left=True)`` wants gate and up as the
        two contiguous halves. The conversion runs once per (weight, scale) pair
        and is redone when either tensor is modified in place (``_version``).
        The scale becomes float32 as the operator expects.
        """
        return self._converted(weight, scale, _unpermute_gate_up)

    def _converted(
        self, weight: torch.Tensor, scale: torch.Tensor | None, convert
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``convert(weight, scale)``, cached per weight tensor and redone when the weight or the
        scale is replaced or modified in place (``_version``)."""
        key = id(weight)
        scale_version = None if scale is None else scale._version
        hit = self._gate_up_cache.get(key)
        if (
            hit is not None
            and hit[0]() is weight
            and hit[1] == weight._version
            and (hit[2] is None if scale is None else hit[2]() is scale)
            and hit[3] == scale_version
        ):
            return hit[4], hit[5]
        w, s = convert(weight, scale)
        if hit is None:  # drop the entry when the weight is freed (without keeping self alive)
            weakref.finalize(weight, NpuLowLatency._forget_weight, weakref.ref(self), key)
        self._gate_up_cache[key] = (
            weakref.ref(weight),
            weight._version,
            None if scale is None else weakref.ref(scale),
            scale_version,
            w,
            s,
        )
        return w, s

    @staticmethod
    def _forget_weight(owner_ref: weakref.ref, key: int) -> None:
        """Finalizer of a cached gmm1 weight: remove its converted copy."""
        owner = owner_ref()
        if owner is not None:
            owner._gate_up_cache.pop(key, None)
