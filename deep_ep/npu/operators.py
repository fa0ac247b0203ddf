"""Thin NPU (Atlas A2/A3) backend: CANN's fused MC2 MoE operators through torch_npu.

Used by ``deep_ep.Buffer`` for low-latency mode with strategy ``"ops"`` and for
``fused_deep_moe`` on NPU. Every operator call is written exactly against the
torch_npu signatures collected in ``/work/shared/NPU.md``; nothing here can be
run without an NPU, so the code only maps the SPEC's shapes onto the operators'
and back. ``torch_npu`` is imported lazily: importing this module works on any
machine.

Operator facts this module relies on beyond NPU.md (assumptions, see the
docstrings where they are used):

* ``ep_recv_counts`` of the dispatch: its first ``L * R`` entries are the
  inclusive prefix sum of received rows ordered ``[e * R + r]`` (local expert
  ``e``, source rank ``r``); on A2 further entries follow that only the combine
  reads. (CANN says the values may change between versions; only
  ``fused_deep_moe``'s ``ep_recv_count`` and the handle's
  ``recv_layout_prefix`` depend on it.)
* ``npu_dequant_swiglu_quant(activate_left=True)`` computes
  ``silu(left half) * right half``, so gmm1's output columns must be
  ``[gate | up]``.
* ``npu_grouped_matmul`` with int8 inputs and bf16 output wants ``scale`` in
  bf16 (as vLLM-Ascend passes it).
"""

from __future__ import annotations

import dataclasses
import math
import os
import weakref

import torch
import torch.distributed as dist

# A2 fullmesh rank counts for the v2 operators (NPU.md "Limits (v2)").
_A2_RANKS = frozenset(range(2, 9)) | {16, 32, 64, 128, 256}
# gmm1_permuted_weight interleaves gate/up columns in tiles of this width (SPEC).
_GATE_UP_TILE = 64
_MB = 1 << 20


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


def hccl_buffsize_mb(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                     num_experts: int, num_topk: int) -> int:
    """``HCCL_BUFFSIZE`` (MB) that the MC2 dispatch/combine operators need.

    NPU.md's A2 fullmesh requirement, with ``BS`` = Nmax (every rank pads to it),
    ``R`` = ranks, ``L = E // R`` local experts, ``K`` = top-k, ``H`` = hidden and
    2 bytes per bf16 element::

        2 * (BS * R * min(L, K) * H * 2 B + 2 MB)

    rounded up to whole MB and never below HCCL's default of 200 MB. Set the
    environment variable to at least this value before the HCCL group is created.
    (A3 and A2 "hierarchy" use other formulas; this one is the A2 fullmesh one.)
    """
    if num_ranks <= 0 or num_experts % num_ranks != 0:
        raise ValueError(f"num_experts ({num_experts}) must be a positive multiple of "
                         f"num_ranks ({num_ranks})")
    num_local_experts = num_experts // num_ranks
    window_bytes = (num_max_dispatch_tokens_per_rank * num_ranks
                    * min(num_local_experts, num_topk) * hidden * 2)
    need_bytes = 2 * (window_bytes + 2 * _MB)
    return max(200, math.ceil(need_bytes / _MB))


def _npu_device() -> torch.device:
    """The NPU device type (valid only once torch_npu is imported)."""
    return torch.device("npu")


def _hierarchy_env() -> bool:
    """A2 hierarchical mode as selected by HCCL's environment (NPU.md)."""
    return (os.environ.get("HCCL_INTRA_PCIE_ENABLE") == "1"
            and os.environ.get("HCCL_INTRA_ROCE_ENABLE") == "0")


def _unpermute_gate_up(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile-interleaved gmm1 columns -> ``[gate | up]`` halves.

    SPEC layout of ``weight`` int8 ``[L, H, 2I]`` and ``scale`` ``[L, 2I]``: tile 2j
    holds gate columns ``[64j, 64j+64)``, tile 2j+1 the up columns ``[64j, 64j+64)``.
    Returns contiguous ``[L, H, 2I]`` and float32 ``[L, 2I]`` with gate columns
    ``[0, I)`` then up columns ``[I, 2I)``.
    """
    num_local_experts, hidden, two_i = weight.shape
    tiles = two_i // (2 * _GATE_UP_TILE)
    # [.., tile j, (gate|up), 64] -> [.., (gate|up), tile j, 64]
    w = weight.reshape(num_local_experts, hidden, tiles, 2, _GATE_UP_TILE).transpose(2, 3)
    s = scale.reshape(num_local_experts, tiles, 2, _GATE_UP_TILE).transpose(1, 2)
    return (w.reshape(num_local_experts, hidden, two_i).contiguous(),
            s.reshape(num_local_experts, two_i).to(torch.float32).contiguous())


def _fill_masked_expert_ids(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Replace ``-1`` in ``topk_idx`` (int64 ``[BS, K]``) by valid ids; returns int32 ``[BS, K]``.

    The operators reject -1 and require the K ids of a row to be distinct (also
    for masked entries, as far as the documentation says), so the j-th ``-1`` of
    a row gets the j-th smallest expert id the row does not use. Rows that are all
    -1 (padding) get ``0..K-1``. The entries stay masked out by ``x_active_mask``.
    """
    valid = topk_idx >= 0
    rows = topk_idx.shape[0]
    used = torch.zeros(rows, num_experts + 1, dtype=torch.int32, device=topk_idx.device)
    # column num_experts is a sink for the -1 entries
    used.scatter_(1, torch.where(valid, topk_idx, num_experts), 1)
    free_ids = torch.sort(used[:, :num_experts], dim=1, stable=True).indices  # unused ids first
    slot = ((~valid).to(torch.int64).cumsum(1) - 1).clamp(min=0)
    return torch.where(valid, topk_idx, free_ids.gather(1, slot)).to(torch.int32)


@dataclasses.dataclass
class NpuLowLatencyHandle:
    """What ``NpuLowLatency.combine`` needs from a dispatch (SPEC low-latency handle).

    ``BS`` = padded batch (Nmax), ``K`` = top-k, ``A`` = rows of the operator's
    ``expand_x``. Operator outputs are kept as returned and passed back unchanged.
    """

    assist_info_for_combine: torch.Tensor  # int32 [A * 128] (v1: expand_idx [BS * K]); per-row source info
    ep_recv_counts: torch.Tensor  # int32, the combine's ep_send_counts
    tp_recv_counts: torch.Tensor  # int32, the combine's tp_send_counts
    expand_scales: torch.Tensor | None  # float32 [A]; only kept for comm_alg="hierarchy"
    expert_ids: torch.Tensor  # int32 [BS, K], -1 replaced (see _fill_masked_expert_ids)
    x_active_mask: torch.Tensor  # bool [BS, K]: real token and real expert
    topk_weights: torch.Tensor | None  # float32 [BS, K] padded, 0 where masked; as given at dispatch
    recv_count: torch.Tensor  # int64 [L]
    recv_layout_prefix: torch.Tensor  # int32 [L * R], inclusive prefix of rows per (e, r) at [e * R + r]
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    num_tokens: int  # T, rows of this rank's x
    padded_bs: int  # BS passed to the operators (= Nmax)
    expand_rows: int  # A
    global_bs: int
    comm_alg: str
    use_v2: bool


class NpuLowLatency:
    """Low-latency dispatch/combine and fused_deep_moe on CANN's MC2 operators.

    Tensors are used on the device they come on (NPU in production); this class
    never moves data between devices.

    Choices the operators leave to the caller:

    * Every call pads ``x`` to ``BS = Nmax`` rows, masks the padding with
      ``x_active_mask`` and passes ``global_bs = Nmax * R``. All ranks then call
      with the same BS (which the operators need for ``x_active_mask`` to be
      allowed and for ``global_bs``), ``T = 0`` works (the operators need
      ``BS > 0``), and shapes are static (graph capture friendly).
    * ``x_active_mask`` is always the 2-D ``[BS, K]`` form, covering both padding
      rows and ``-1`` entries.
    * A2 hierarchical mode (``HCCL_INTRA_PCIE_ENABLE=1``, ``HCCL_INTRA_ROCE_ENABLE=0``)
      passes ``comm_alg="hierarchy"`` and needs ``topk_weights`` at dispatch
      (``expert_scales``; the combine gets the resulting ``expand_scales``).
    """

    def __init__(self, group: dist.ProcessGroup, rank: int, num_ranks: int,
                 num_experts_hint: int | None = None) -> None:
        """Create the dedicated HCCL communicator. Collective: every rank of ``group`` must call.

        ``rank``/``num_ranks``: this process's rank in ``group`` and its size.
        ``num_experts_hint``: when given, ``E % R == 0`` is checked here already.
        """
        import torch_npu

        if num_experts_hint is not None and num_experts_hint % num_ranks != 0:
            raise ValueError(f"num_experts ({num_experts_hint}) must be a multiple of "
                             f"num_ranks ({num_ranks})")
        self._torch_npu = torch_npu
        self.rank = rank
        self.num_ranks = num_ranks
        self.num_experts_hint = num_experts_hint
        self.soc = detect_soc()
        # The MC2 operators need a communicator no other operator uses (NPU.md):
        # a new group over the same global ranks, in group order so that the rank
        # in the new group equals `rank`. new_group is collective.
        global_ranks = dist.get_process_group_ranks(group)
        self.group = dist.new_group(ranks=global_ranks, backend="hccl")
        self.comm_name: str = self.group._get_backend(_npu_device()).get_hccl_comm_name(rank)
        self._use_v2 = (hasattr(torch_npu, "npu_moe_distribute_dispatch_v2")
                        and hasattr(torch_npu, "npu_moe_distribute_combine_v2"))
        # id(gmm1 weight) -> (weight ref, weight version, scale ref, scale version, [gate|up] weight, scale)
        self._gate_up_cache: dict[int, tuple] = {}

    @staticmethod
    def check_limits(soc: str | None, num_ranks: int, hidden: int, bs: int, num_topk: int) -> None:
        """Raise ``ValueError`` naming the violated v2 operator limit (NPU.md).

        A2: R in 2..8, 16, 32, 64, 128, 256; H <= 7168; BS <= 256.
        A3: R in 2..768; H in 1024..8192; BS <= 512; K <= 16.
        ``soc=None`` (unknown device) checks nothing. ``bs`` is the per-rank batch
        passed to the operators, i.e. Nmax here.
        """
        if soc == "A2":
            if num_ranks not in _A2_RANKS:
                raise ValueError(f"NPU A2 MC2 operators support num_ranks in 2..8, 16, 32, 64, "
                                 f"128, 256; got num_ranks={num_ranks}")
            if hidden > 7168:
                raise ValueError(f"NPU A2 MC2 operators support hidden <= 7168; got hidden={hidden}")
            if bs > 256:
                raise ValueError(f"NPU A2 MC2 operators support at most 256 tokens per rank "
                                 f"(num_max_dispatch_tokens_per_rank); got {bs}")
        elif soc == "A3":
            if not 2 <= num_ranks <= 768:
                raise ValueError(f"NPU A3 MC2 operators support num_ranks in 2..768; "
                                 f"got num_ranks={num_ranks}")
            if not 1024 <= hidden <= 8192:
                raise ValueError(f"NPU A3 MC2 operators support hidden in 1024..8192; "
                                 f"got hidden={hidden}")
            if bs > 512:
                raise ValueError(f"NPU A3 MC2 operators support at most 512 tokens per rank "
                                 f"(num_max_dispatch_tokens_per_rank); got {bs}")
            if num_topk > 16:
                raise ValueError(f"NPU A3 MC2 operators support num_topk <= 16; got num_topk={num_topk}")

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor | None,
                 num_max_dispatch_tokens_per_rank: int, num_experts: int, use_int8: bool,
                 cumulative_local_expert_recv_stats: torch.Tensor | None
                 ) -> tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], torch.Tensor,
                            NpuLowLatencyHandle]:
        """Low-latency dispatch with ``npu_moe_distribute_dispatch_v2`` (v1 if v2 is missing).

        Args:
            x: bf16/fp16 ``[T, H]``, ``T <= Nmax``.
            topk_idx: int64 ``[T, K]``, values in ``[-1, E)``.
            topk_weights: float32 ``[T, K]`` or None (required in hierarchical mode).
            num_max_dispatch_tokens_per_rank: Nmax, the same on every rank.
            num_experts: E, a multiple of R.
            use_int8: per-token dynamic int8 quantization by the operator (quant_mode=2).
            cumulative_local_expert_recv_stats: int32 ``[L]`` or None; recv_count is added to it.

        Returns:
            ``recv_x``: ``[M, H]`` in x's dtype, or with int8 the pair
            ``(int8 [M, H], float32 scales [M])``; ``M = Nmax * R * min(K, L)``, rows
            packed by local expert, only the first ``recv_count.sum()`` valid.
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
            raise ValueError(f"x has {num_tokens} tokens; expected at most "
                             f"num_max_dispatch_tokens_per_rank={nmax} (which must be >= 1)")
        if num_experts % num_ranks != 0:
            raise ValueError(f"num_experts ({num_experts}) must be a multiple of num_ranks ({num_ranks})")
        hierarchy = _hierarchy_env()
        if hierarchy and topk_weights is None:
            raise ValueError("topk_weights is required in A2 hierarchical mode "
                             "(HCCL_INTRA_PCIE_ENABLE=1, HCCL_INTRA_ROCE_ENABLE=0): the "
                             "operators take them at dispatch (expert_scales)")
        self.check_limits(self.soc, num_ranks, hidden, nmax, num_topk)
        num_local_experts = num_experts // num_ranks
        global_bs = nmax * num_ranks
        rows_out = global_bs * min(num_local_experts, num_topk)  # M

        # Pad to BS = Nmax rows; padding rows are masked out entirely.
        x_pad = x.new_zeros(nmax, hidden)
        x_pad[:num_tokens] = x
        idx_pad = topk_idx.new_full((nmax, num_topk), -1)
        idx_pad[:num_tokens] = topk_idx
        active = idx_pad >= 0
        expert_ids = _fill_masked_expert_ids(idx_pad, num_experts)
        weights_pad = None
        if topk_weights is not None:
            weights_pad = torch.zeros(nmax, num_topk, dtype=torch.float32, device=x.device)
            weights_pad[:num_tokens] = topk_weights
            weights_pad.masked_fill_(~active, 0.0)

        comm_alg = "hierarchy" if hierarchy else ""
        kwargs = dict(
            x_active_mask=active,
            # A3 uses expert_scales only with "hierarchy"; A2 turns them into the
            # expand_scales that its hierarchical combine needs.
            expert_scales=weights_pad if hierarchy else None,
            quant_mode=2 if use_int8 else 0, global_bs=global_bs, expert_token_nums_type=1)
        if self._use_v2:
            # comm_alg only when set: "" is its default, and torch_npu builds older than CANN 8.3
            # may not take the argument at all
            outputs = self._torch_npu.npu_moe_distribute_dispatch_v2(
                x_pad, expert_ids, self.comm_name, num_ranks, self.rank, num_experts,
                **(dict(comm_alg=comm_alg) if comm_alg else {}), **kwargs)
        else:  # v1 has no comm_alg: HCCL's environment selects the algorithm
            outputs = self._torch_npu.npu_moe_distribute_dispatch(
                x_pad, expert_ids, self.comm_name, num_ranks, self.rank, num_experts, **kwargs)
            comm_alg = ""
        (expand_x, dynamic_scales, assist_info, expert_token_nums, ep_recv_counts,
         tp_recv_counts, expand_scales) = outputs[:7]

        recv_count = expert_token_nums.to(torch.int64)
        if cumulative_local_expert_recv_stats is not None:
            cumulative_local_expert_recv_stats.add_(recv_count.to(cumulative_local_expert_recv_stats.dtype))
        # A >= global_bs * min(L, K) = M; the SPEC shape is exactly M rows.
        recv_x = expand_x[:rows_out]
        if use_int8:
            recv_x = (recv_x, dynamic_scales[:rows_out])
        handle = NpuLowLatencyHandle(
            assist_info_for_combine=assist_info, ep_recv_counts=ep_recv_counts,
            tp_recv_counts=tp_recv_counts, expand_scales=expand_scales if hierarchy else None,
            expert_ids=expert_ids, x_active_mask=active, topk_weights=weights_pad,
            recv_count=recv_count, recv_layout_prefix=ep_recv_counts[:num_local_experts * num_ranks],
            num_max_dispatch_tokens_per_rank=nmax, hidden=hidden, num_experts=num_experts,
            num_tokens=num_tokens, padded_bs=nmax, expand_rows=expand_x.shape[0],
            global_bs=global_bs, comm_alg=comm_alg, use_v2=self._use_v2)
        return recv_x, recv_count, handle

    def combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                handle: NpuLowLatencyHandle, out: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted combine with ``npu_moe_distribute_combine_v2`` (v1 with expand_idx if v2 is missing).

        Args:
            x: bf16/fp16 ``[M, H]`` expert outputs in the dispatch's packed layout
               (``[A, H]`` is accepted too; rows past the counts are ignored).
            topk_idx: int64 ``[T, K]`` as at dispatch; only its shape is checked,
               the operator gets the dispatch's (masked) expert ids from the handle.
            topk_weights: float32 ``[T, K]``; entries of -1 experts count as 0.
            handle: from :meth:`dispatch`.
            out: optional ``[T, H]`` tensor the result is copied into.

        Returns:
            ``[T, H]`` in x's dtype: per token the weighted sum of its experts' rows.
        """
        nmax, hidden = handle.padded_bs, handle.hidden
        num_tokens, num_topk = handle.num_tokens, handle.expert_ids.shape[1]
        if x.dim() != 2 or x.shape[1] != hidden:
            raise ValueError(f"x must be [M, H={hidden}] as at dispatch; got {tuple(x.shape)}")
        if x.shape[0] > handle.expand_rows:
            raise ValueError(f"x has {x.shape[0]} rows; the dispatch produced {handle.expand_rows}")
        for name, t in (("topk_idx", topk_idx), ("topk_weights", topk_weights)):
            if tuple(t.shape) != (num_tokens, num_topk):
                raise ValueError(f"{name} must be [T={num_tokens}, K={num_topk}] as at dispatch; "
                                 f"got {tuple(t.shape)}")
        if x.shape[0] < handle.expand_rows:  # dispatch returned only the first M of A rows
            x = torch.cat([x, x.new_zeros(handle.expand_rows - x.shape[0], hidden)])
        weights = torch.zeros(nmax, num_topk, dtype=torch.float32, device=x.device)
        weights[:num_tokens] = topk_weights
        weights.masked_fill_(~handle.x_active_mask, 0.0)

        kwargs = dict(
            tp_send_counts=handle.tp_recv_counts, x_active_mask=handle.x_active_mask,
            expand_scales=handle.expand_scales, global_bs=handle.global_bs)
        if handle.use_v2:
            combined = self._torch_npu.npu_moe_distribute_combine_v2(
                x, handle.expert_ids, handle.assist_info_for_combine, handle.ep_recv_counts, weights,
                self.comm_name, self.num_ranks, self.rank, handle.num_experts,
                **(dict(comm_alg=handle.comm_alg) if handle.comm_alg else {}), **kwargs)
        else:
            combined = self._torch_npu.npu_moe_distribute_combine(
                x, handle.expert_ids, handle.assist_info_for_combine, handle.ep_recv_counts, weights,
                self.comm_name, self.num_ranks, self.rank, handle.num_experts, **kwargs)
        result = combined[:num_tokens]
        if out is None:
            return result
        out.copy_(result)
        return out

    def fused_deep_moe(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                       gmm1_permuted_weight: torch.Tensor, gmm1_permuted_weight_scale: torch.Tensor,
                       gmm2_weight: torch.Tensor, gmm2_weight_scale: torch.Tensor,
                       num_max_dispatch_tokens_per_rank: int, num_experts: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """W8A8 SwiGLU expert MLP between an MC2 dispatch and combine (SPEC fused_deep_moe).

        dispatch (quant_mode=2) -> ``npu_grouped_matmul`` int8 x int8 -> int32 ``[A, 2I]``
        -> ``npu_dequant_swiglu_quant`` -> int8 ``[A, I]`` + scales -> ``npu_grouped_matmul``
        -> bf16 ``[A, H]`` -> combine.

        Args:
            x: bf16 ``[T, H]``; topk_idx int64 ``[T, K]``; topk_weights float32 ``[T, K]``.
            gmm1_permuted_weight: int8 ``[L, H, 2I]``, gate/up columns interleaved in
                64-wide tiles (SPEC; ``2I % 128 == 0`` as ``deep_ep.permute_gmm1_weight``
                makes it); gmm1_permuted_weight_scale: float32 ``[L, 2I]``, same order.
                Both are turned into ``[gate | up]`` once per weight tensor (cached),
                because ``npu_dequant_swiglu_quant(activate_left=True)`` takes gate and
                up as the two contiguous halves.
            gmm2_weight: int8 ``[L, I, H]``; gmm2_weight_scale: float32 ``[L, H]``.

        Returns:
            ``(output bf16 [T, H], ep_recv_count int32 [L * R])`` where
            ``ep_recv_count[e * R + r]`` = rows local expert e received from rank r,
            taken as differences of the dispatch's ``ep_recv_counts`` prefix (see module doc).
        """
        num_local_experts = num_experts // self.num_ranks
        hidden = x.shape[1]
        if gmm1_permuted_weight.dtype != torch.int8 or gmm2_weight.dtype != torch.int8:
            raise TypeError(f"gmm1_permuted_weight and gmm2_weight must be int8; got "
                            f"{gmm1_permuted_weight.dtype} and {gmm2_weight.dtype}")
        two_i = gmm1_permuted_weight.shape[-1]
        if two_i <= 0 or two_i % (2 * _GATE_UP_TILE):
            raise ValueError(f"gmm1_permuted_weight's last dimension (2I) must be a positive "
                             f"multiple of {2 * _GATE_UP_TILE} (whole 64-column gate/up tiles); "
                             f"got {two_i}")
        intermediate = two_i // 2
        expected = {
            "gmm1_permuted_weight": (gmm1_permuted_weight, (num_local_experts, hidden, two_i)),
            "gmm1_permuted_weight_scale": (gmm1_permuted_weight_scale, (num_local_experts, two_i)),
            "gmm2_weight": (gmm2_weight, (num_local_experts, intermediate, hidden)),
            "gmm2_weight_scale": (gmm2_weight_scale, (num_local_experts, hidden)),
        }
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} must be {list(shape)} (L={num_local_experts}, H={hidden}, "
                                 f"I={intermediate}); got {list(tensor.shape)}")

        (recv_xq, recv_scale), recv_count, handle = self.dispatch(
            x, topk_idx, topk_weights, num_max_dispatch_tokens_per_rank, num_experts,
            use_int8=True, cumulative_local_expert_recv_stats=None)
        w1, s1 = self._gate_up_weights(gmm1_permuted_weight, gmm1_permuted_weight_scale)
        torch_npu = self._torch_npu
        h_int32 = torch_npu.npu_grouped_matmul(
            [recv_xq], [w1], group_list=recv_count, group_type=0, split_item=2,
            group_list_type=1, output_dtype=torch.int32)[0]
        # dequant with per-token x scales and per-column w1 scales, silu(gate) * up,
        # then per-token dynamic int8 requantization (quant_mode=1)
        a_int8, a_scale = torch_npu.npu_dequant_swiglu_quant(
            h_int32, weight_scale=s1, activation_scale=recv_scale, group_index=recv_count,
            activate_left=True, quant_mode=1)
        # int8 x int8 with bf16 output takes its per-channel scale in bf16
        y = torch_npu.npu_grouped_matmul(
            [a_int8], [gmm2_weight], scale=[gmm2_weight_scale.to(torch.bfloat16)],
            per_token_scale=[a_scale], group_list=recv_count, group_type=0, split_item=2,
            group_list_type=1, output_dtype=torch.bfloat16)[0]
        output = self.combine(y, topk_idx, topk_weights, handle)
        prefix = handle.recv_layout_prefix
        ep_recv_count = torch.diff(prefix, prepend=prefix.new_zeros(1)).to(torch.int32)
        return output, ep_recv_count

    def _gate_up_weights(self, weight: torch.Tensor, scale: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[gate | up]`` copies of gmm1's tile-interleaved weight ``[L, H, 2I]`` and scale ``[L, 2I]``.

        ``npu_dequant_swiglu_quant(activate_left=True)`` wants gate and up as the
        two contiguous halves. The conversion runs once per (weight, scale) pair
        and is redone when either tensor is modified in place (``_version``).
        The scale becomes float32 as the operator expects.
        """
        key = id(weight)
        hit = self._gate_up_cache.get(key)
        if (hit is not None and hit[0]() is weight and hit[1] == weight._version
                and hit[2]() is scale and hit[3] == scale._version):
            return hit[4], hit[5]
        w, s = _unpermute_gate_up(weight, scale)
        if hit is None:  # drop the entry when the weight is freed (without keeping self alive)
            weakref.finalize(weight, NpuLowLatency._forget_weight, weakref.ref(self), key)
        self._gate_up_cache[key] = (weakref.ref(weight), weight._version,
                                    weakref.ref(scale), scale._version, w, s)
        return w, s

    @staticmethod
    def _forget_weight(owner_ref: weakref.ref, key: int) -> None:
        """Finalizer of a cached gmm1 weight: remove its converted copy."""
        owner = owner_ref()
        if owner is not None:
            owner._gate_up_cache.pop(key, None)
