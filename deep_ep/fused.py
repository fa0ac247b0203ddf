"""``fused_deep_moe``: low-latency dispatch (int8) -> W8A8 SwiGLU expert MLP -> combine.

:func:`fused_deep_moe` (behind ``Buffer.fused_deep_moe``) runs the whole MoE layer of a
decode step in one call; :func:`grouped_swiglu_mlp_int8` is its compute half on its own,
for callers that do their own dispatch; :func:`permute_gmm1_weight` /
:func:`unpermute_gmm1_weight` prepare ``gmm1_permuted_weight`` (see SPEC.md, section
"fused_deep_moe").

Math, per received row with int8 ``xq`` and float32 scale ``s_x`` of local expert e::

    h  = (xq @ W1[e]) * s_x * s_w1[e]            float32, int32-exact accumulation
    a  = silu(gate) * up                          gate/up = first/last I columns (unpermuted)
    aq, s_a = quantize_per_token_int8(a)
    y  = (aq @ W2[e]) * s_a * s_w2[e]             -> bfloat16

Both entry points share :func:`_swiglu_mlp_rows`, so they give the same bits.  The fused
call saves what the unfused pipeline (``low_latency_dispatch`` -> ``grouped_swiglu_mlp_int8``
-> ``low_latency_combine``) repeats: it computes only the received rows (no zeroed padding)
straight into the ``[M, H]`` tensor combine reads, and checks the weights of a decode loop once,
not every step.
"""

from __future__ import annotations

import enum
import functools
import operator
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

import torch
from torch import Tensor

from .ops import quantize_int8
from .utils import FLOAT_DTYPES, check_tensor

if TYPE_CHECKING:
    from .buffer import Buffer

__all__ = [
    "FuseMode",
    "permute_gmm1_weight",
    "unpermute_gmm1_weight",
    "quantize_per_token_int8",
    "grouped_swiglu_mlp_int8",
    "fused_deep_moe",
]

#: Width of the gate/up column tiles in ``gmm1_permuted_weight`` (Ascend's GMM1 tiling).
GMM1_TILE = 64

# Largest |int8 * int8| product: (-128) * (-128).
_MAX_PRODUCT = 128 * 128
# Up to this many products, every partial sum is an integer of magnitude <= 2**24,
# which float32 represents exactly whatever the summation order (BLAS blocking, FMA).
_F32_EXACT_K = 2**24 // _MAX_PRODUCT  # 1024
# Up to this many products the int32 accumulator of torch._int_mm cannot overflow.
_I32_EXACT_K = 2**30 // _MAX_PRODUCT  # 65536


class FuseMode(enum.IntEnum):
    """Fused MoE modes, with DeepEP-Ascend's names *and values*.

    The values are DeepEP-Ascend's (sgl-kernel-npu ``deep_ep.buffer.FuseMode``):
    SGLang passes the plain integer from ``SGLANG_NPU_FUSED_MOE_MODE`` (default 1)
    as ``fuse_mode``, so the numbers have to match for that code to run unchanged.
    """

    #: dispatch + GMM1 + SwiGLU + GMM2 + combine (Ascend's ``FusedDeepMoe`` operator).
    FUSED_DEEP_MOE = 1
    #: Ascend's ``DispatchFFNCombine`` operator; listed so the value has a name in errors.
    DISPATCH_FFN_COMBINE = 2


# --------------------------------------------------------------------------- validation


def _fail(exc: type[Exception], name: str, expected: str, given: object) -> NoReturn:
    raise exc(f"{name}: expected {expected}, got {given}")


def _check_two_i(name: str, two_i: int) -> None:
    # Gate and up each need whole 64-column tiles.
    if two_i <= 0 or two_i % (2 * GMM1_TILE) != 0:
        _fail(ValueError, name, f"2I (gate+up columns) a positive multiple of {2 * GMM1_TILE}", two_i)


def _check_expert_weights(
    w1: object,
    w1_scale: object,
    w2: object,
    w2_scale: object,
    hidden: int,
    hidden_from: str,
    device: torch.device,
    num_experts: int | None = None,
    experts_from: str = "",
    names: tuple[str, str, str, str] = ("w1", "w1_scale", "w2", "w2_scale"),
    scale_dtypes: tuple[torch.dtype, ...] = (torch.float32,),
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Checks the expert weights of the W8A8 SwiGLU MLP; returns them contiguous, scales float32.

    Shapes: ``w1`` int8 ``[L, H, 2I]`` (2I a multiple of 128), ``w1_scale`` ``[L, 2I]``,
    ``w2`` int8 ``[L, I, H]``, ``w2_scale`` ``[L, H]``.  ``H`` must equal ``hidden`` (taken
    from ``hidden_from``); ``L`` must equal ``num_experts`` when given (from ``experts_from``).
    ``names`` are the argument names the errors use.
    """
    n1, n1s, n2, n2s = names
    w1 = check_tensor(n1, w1, dtypes=(torch.int8,), shape=(None, None, None))
    if num_experts is None:
        num_experts = w1.shape[0]
        if num_experts == 0:
            _fail(ValueError, n1, "at least one local expert (L >= 1)", f"shape {list(w1.shape)}")
    two_i = w1.shape[2]
    _check_two_i(f"{n1}.shape[2]", two_i)
    inter = two_i // 2
    check_tensor(n1, w1, dtypes=(torch.int8,), shape=(num_experts, hidden, two_i),
                 what=f"[L, H, 2I]: {experts_from + ', ' if experts_from else ''}H from {hidden_from}")
    check_tensor(n1s, w1_scale, dtypes=scale_dtypes, shape=(num_experts, two_i), what=f"[L, 2I] of {n1}")
    check_tensor(n2, w2, dtypes=(torch.int8,), shape=(num_experts, inter, hidden),
                 what=f"[L, I, H] of {n1} and {hidden_from}")
    check_tensor(n2s, w2_scale, dtypes=scale_dtypes, shape=(num_experts, hidden), what=f"[L, H] of {n2}")
    tensors = (w1, w1_scale, w2, w2_scale)
    for name, t in zip(names, tensors):
        if t.device != device:
            _fail(ValueError, name, f"device {device} (that of {hidden_from})", t.device)
    return w1.contiguous(), w1_scale.float().contiguous(), w2.contiguous(), w2_scale.float().contiguous()


# --------------------------------------------------------------------------- weight layout


def permute_gmm1_weight(w13: Tensor, w13_scale: Tensor) -> tuple[Tensor, Tensor]:
    """Converts gate-then-up GMM1 weights to the ``gmm1_permuted_weight`` layout.

    Args:
        w13: int8 ``[L, 2I, H]``; rows ``[0, I)`` are the gate projection, rows
            ``[I, 2I)`` the up projection (the usual ``w13_weight`` of MoE layers).
        w13_scale: float32 ``[L, 2I]``, per-output-channel scales in the same row order.

    Returns:
        ``(w1, w1_scale)``: int8 ``[L, H, 2I]`` (contiguous) whose columns are gate/up
        interleaved in tiles of 64 — tile ``2j`` holds gate columns ``[64j, 64j+64)``,
        tile ``2j+1`` up columns ``[64j, 64j+64)`` — and float32 ``[L, 2I]`` in the
        same column order.

    Raises:
        TypeError / ValueError: wrong types, dtypes or shapes, or ``2I % 128 != 0``.
    """
    check_tensor("w13", w13, dtypes=(torch.int8,), shape=(None, None, None))
    num_experts, two_i, hidden = w13.shape
    _check_two_i("w13.shape[1]", two_i)
    check_tensor("w13_scale", w13_scale, dtypes=(torch.float32,), shape=(num_experts, two_i), what="[L, 2I] of w13")
    tiles = two_i // (2 * GMM1_TILE)
    # [L, (gate|up), tile j, 64, H] -> [L, tile j, (gate|up), 64, H]: tile pairs side by side.
    w1 = w13.reshape(num_experts, 2, tiles, GMM1_TILE, hidden).transpose(1, 2)
    w1 = w1.reshape(num_experts, two_i, hidden).transpose(1, 2).contiguous()
    w1_scale = w13_scale.reshape(num_experts, 2, tiles, GMM1_TILE).transpose(1, 2)
    return w1, w1_scale.reshape(num_experts, two_i).contiguous()


def unpermute_gmm1_weight(w1: Tensor, w1_scale: Tensor) -> tuple[Tensor, Tensor]:
    """Exact inverse of :func:`permute_gmm1_weight`.

    Args:
        w1: int8 ``[L, H, 2I]`` in the tiled gate/up column order.
        w1_scale: float32 ``[L, 2I]`` in the same column order.

    Returns:
        ``(w13, w13_scale)``: int8 ``[L, 2I, H]`` gate-then-up rows and float32 ``[L, 2I]``,
        both contiguous.

    Raises:
        TypeError / ValueError: wrong types, dtypes or shapes, or ``2I % 128 != 0``.
    """
    check_tensor("w1", w1, dtypes=(torch.int8,), shape=(None, None, None))
    num_experts, hidden, two_i = w1.shape
    _check_two_i("w1.shape[2]", two_i)
    check_tensor("w1_scale", w1_scale, dtypes=(torch.float32,), shape=(num_experts, two_i), what="[L, 2I] of w1")
    tiles = two_i // (2 * GMM1_TILE)
    w13 = w1.transpose(1, 2).reshape(num_experts, tiles, 2, GMM1_TILE, hidden).transpose(1, 2)
    w13_scale = w1_scale.reshape(num_experts, tiles, 2, GMM1_TILE).transpose(1, 2)
    return (
        w13.reshape(num_experts, two_i, hidden).contiguous(),
        w13_scale.reshape(num_experts, two_i).contiguous(),
    )


# --------------------------------------------------------------------------- quantization


def quantize_per_token_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row dynamic symmetric int8 quantization (SPEC: ``quant_mode="int8"``), checked.

    The public, argument-checking face of :func:`deep_ep.ops.quantize_int8`, the one
    quantizer of the package (dispatch, low-latency dispatch and the expert MLP use it):
    native on CPU, torch ops with the same definition on other devices (NPU, meta).

    ``scale = max|x_row| / 127`` in float32 and ``q = round(x / scale)`` clamped to
    ``[-127, 127]``, with ``x / scale`` the correctly rounded float32 quotient and
    ``round`` half-to-even, so ``|q * scale - x| <= scale / 2`` up to float32 rounding
    (relative 1e-5).

    A row of zeros keeps the formula's ``scale = 0`` (as vLLM's int8 kernels do) and
    quantizes to zeros, so it dequantizes to exact zeros (no NaN).  A row containing
    inf/NaN gets a non-finite scale, so the problem stays visible downstream instead of
    turning into plausible numbers.

    Args:
        x: ``[T, H]`` bfloat16, float16 or float32, ``H >= 1`` (``T`` may be 0).

    Returns:
        ``(q, scale)``: int8 ``[T, H]`` and float32 ``[T]``.

    Raises:
        TypeError: ``x`` is not a tensor of a supported dtype.
        ValueError: ``x`` is not 2-D or has ``H == 0``.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, shape=(None, None), what="[T, H]")
    if x.shape[1] == 0:
        _fail(ValueError, "x", "a 2-D tensor [T, H] with H >= 1", f"shape {tuple(x.shape)}")
    return quantize_int8(x)


# --------------------------------------------------------------------------- exact int8 GEMM


@functools.lru_cache(maxsize=None)
def _cpu_int_mm_is_exact() -> bool:
    """Whether ``torch._int_mm`` on this CPU returns exact int32 dot products.

    Why a probe: the int8 GEMM backend may use instructions that saturate 16-bit
    intermediate sums (e.g. AVX2 without VNNI), or may not exist in this torch
    build.  The inputs pair extreme values so that any 16-bit saturation shows.
    """
    if not hasattr(torch, "_int_mm"):
        return False
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (37, 256), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (256, 72), generator=gen, dtype=torch.int8)
    a[:8] = 127
    a[8:16] = -128
    b[:, :8] = -128
    b[:, 8:16] = 127
    try:
        got = torch._int_mm(a, b)
    except (RuntimeError, NotImplementedError):
        return False
    return torch.equal(got.double(), a.double() @ b.double())


def _int8_matmul_exact(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """``a @ b`` for int8 ``a [m, k]`` and ``b [k, n]`` as float32 ``[m, n]`` (into ``out`` if given).

    Every entry is the exact integer dot product rounded once to float32 — the same
    value an int32-accumulating Ascend GMM produces before its float32 dequant.

    Path choice, measured on an AMD EPYC (AVX512-VNNI), 2 threads, for a whole
    ``grouped_swiglu_mlp_int8`` call with M=1024, L=8, H=1024, I=512 (best of 30):
    ``torch._int_mm`` 3.3 ms, float32 matmuls over k-chunks 21 ms, float64 matmuls
    34 ms; all three give bit-identical results.  So the int32 path is used where the
    probe proves it exact; elsewhere float32 matmuls over k-chunks of <= 1024 (exact,
    see ``_F32_EXACT_K``) summed in float64.
    """
    k = a.shape[1]
    if out is None:
        out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    if a.device.type == "cpu" and _cpu_int_mm_is_exact():
        if k <= _I32_EXACT_K:
            return out.copy_(torch._int_mm(a, b))
        acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int64, device=a.device)
        for k0 in range(0, k, _I32_EXACT_K):
            acc += torch._int_mm(a[:, k0 : k0 + _I32_EXACT_K], b[k0 : k0 + _I32_EXACT_K])
        return out.copy_(acc)
    if k <= _F32_EXACT_K:
        return torch.matmul(a.float(), b.float(), out=out)
    acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64, device=a.device)
    for k0 in range(0, k, _F32_EXACT_K):
        acc += a[:, k0 : k0 + _F32_EXACT_K].float() @ b[k0 : k0 + _F32_EXACT_K].float()
    return out.copy_(acc)


# --------------------------------------------------------------------------- grouped MLP


def _rows_per_expert_to_list(rows_per_expert: object, num_experts: int, num_rows: int) -> list[int]:
    name = "rows_per_expert"
    if isinstance(rows_per_expert, Tensor):
        check_tensor(name, rows_per_expert, dtypes=(torch.int64, torch.int32), shape=(None,), what="[L]")
        counts = rows_per_expert.tolist()
    elif isinstance(rows_per_expert, Sequence) and not isinstance(rows_per_expert, (str, bytes)):
        counts = []
        for c in rows_per_expert:
            if isinstance(c, bool):
                _fail(TypeError, name, "a sequence of ints", f"an element {c!r}")
            try:
                counts.append(operator.index(c))
            except TypeError:
                _fail(TypeError, name, "a sequence of ints", f"an element of type {type(c).__name__}")
    else:
        _fail(TypeError, name, "a list of ints or an int64 tensor [L]", type(rows_per_expert).__name__)
    if len(counts) != num_experts:
        _fail(ValueError, name, f"{num_experts} entries (L, from w1.shape[0])", f"{len(counts)} entries")
    if any(c < 0 for c in counts):
        _fail(ValueError, name, "non-negative counts", counts)
    if sum(counts) > num_rows:
        _fail(ValueError, name, f"counts summing to at most {num_rows} (rows of xq)", f"sum {sum(counts)}")
    return counts


def _swiglu_mlp_rows(
    xq: Tensor,
    x_scale: Tensor,
    counts: list[int],
    w1: Tensor,
    w1_scale: Tensor,
    w2: Tensor,
    w2_scale: Tensor,
    out: Tensor,
) -> None:
    """Writes the W8A8 SwiGLU MLP of rows ``[0, sum(counts))`` into the same rows of ``out``.

    No checks (callers validate).  Row block ``e`` (``counts[e]`` rows, expert-major) goes
    through expert ``e``; rows of ``out`` past the total are left as they are.  The int8
    GEMMs run once per expert block (``torch._int_mm``, int32 accumulation); everything
    elementwise (scales, SwiGLU, requantization) runs once over all rows, so the Python
    work per call is a few operations per local expert, none per row.
    """
    total = sum(counts)
    if total == 0:
        return
    inter, hidden = w2.shape[1], w2.shape[2]
    blocks = []
    start = 0
    for e, count in enumerate(counts):
        if count:
            blocks.append((e, start, start + count))
        start += count
    # GMM1 + dequant: h = (xq @ W1) * s_x * s_w1, in this order of roundings.
    h = torch.empty(total, 2 * inter, dtype=torch.float32, device=xq.device)
    for e, begin, end in blocks:
        _int8_matmul_exact(xq[begin:end], w1[e], out=h[begin:end])
    h.mul_(x_scale[:total, None])
    for e, begin, end in blocks:
        h[begin:end].mul_(w1_scale[e])
    # Column tiles alternate gate/up: [rows, tile j, (gate|up), 64]; tile j of gate and of
    # up cover the same intermediate columns, so pairing them keeps the order.
    tiles = h.view(total, inter // GMM1_TILE, 2, GMM1_TILE)
    a = torch.nn.functional.silu(tiles[:, :, 0, :]).mul_(tiles[:, :, 1, :]).view(total, inter)
    aq, a_scale = quantize_int8(a)
    # GMM2 + dequant: y = (aq @ W2) * s_a * s_w2, rounded once to out's dtype.
    y = torch.empty(total, hidden, dtype=torch.float32, device=xq.device)
    for e, begin, end in blocks:
        _int8_matmul_exact(aq[begin:end], w2[e], out=y[begin:end])
    y.mul_(a_scale[:, None])
    for e, begin, end in blocks:
        torch.mul(y[begin:end], w2_scale[e], out=out[begin:end])


def grouped_swiglu_mlp_int8(
    xq: Tensor,
    x_scale: Tensor,
    rows_per_expert: Sequence[int] | Tensor,
    w1: Tensor,
    w1_scale: Tensor,
    w2: Tensor,
    w2_scale: Tensor,
) -> Tensor:
    """W8A8 SwiGLU MLP of each local expert over its contiguous block of rows.

    Rows ``[sum(rows_per_expert[:e]), sum(rows_per_expert[:e+1]))`` belong to local
    expert ``e`` (the expert-major received layout of dispatch); rows past the total
    are padding and come out as zeros.  Per expert block (one GEMM each)::

        h = (xq @ W1) * s_x * s_w1          float32; xq @ W1 accumulated exactly
        a = silu(gate) * up                 gate/up un-interleaved from the 64-column tiles
        aq, s_a = quantize_per_token_int8(a)
        y = (aq @ W2) * s_a * s_w2          float32, returned as bfloat16

    Args:
        xq: int8 ``[M, H]`` quantized activations.
        x_scale: float32 ``[M]`` per-row scales of ``xq``.
        rows_per_expert: ``L`` row counts (not prefix sums), a list of ints or an
            int64/int32 tensor ``[L]``; their sum must not exceed ``M``.
        w1: int8 ``[L, H, 2I]`` in the tiled layout of :func:`permute_gmm1_weight`;
            ``2I`` must be a multiple of 128.
        w1_scale: float32 ``[L, 2I]`` in the same column order.
        w2: int8 ``[L, I, H]``.
        w2_scale: float32 ``[L, H]``.

    Returns:
        bfloat16 ``[M, H]`` on ``xq``'s device.

    Raises:
        TypeError: an argument has the wrong type or dtype.
        ValueError: inconsistent shapes, ``2I % 128 != 0``, bad counts, or tensors on
            different devices.
    """
    check_tensor("xq", xq, dtypes=(torch.int8,), shape=(None, None), what="[M, H]")
    check_tensor("x_scale", x_scale, dtypes=(torch.float32,), shape=(None,), what="[M]")
    num_rows, hidden = xq.shape
    if hidden == 0:
        _fail(ValueError, "xq", "H >= 1 columns", f"shape {tuple(xq.shape)}")
    w1, w1_scale, w2, w2_scale = _check_expert_weights(w1, w1_scale, w2, w2_scale, hidden, "xq", xq.device)
    check_tensor("x_scale", x_scale, dtypes=(torch.float32,), shape=(num_rows,), what="[M] of xq",
                 device=xq.device)
    counts = _rows_per_expert_to_list(rows_per_expert, w1.shape[0], num_rows)
    out = torch.empty(num_rows, hidden, dtype=torch.bfloat16, device=xq.device)
    _swiglu_mlp_rows(xq, x_scale, counts, w1, w1_scale, w2, w2_scale, out)
    out[sum(counts) :] = 0
    return out


# --------------------------------------------------------------------------- fused pipeline


#: ``quant_mode`` values of ``fused_deep_moe`` (DeepEP-Ascend's numbering).
QUANT_MODES = {1: "W8A8: per-token dynamic int8 activations, per-channel int8 weights"}


def check_modes(quant_mode: object, fuse_mode: object) -> None:
    """ValueError unless quant_mode is 1 and fuse_mode is FuseMode.FUSED_DEEP_MOE (or 1)."""
    if type(quant_mode) is int and quant_mode == 1 and (fuse_mode is FuseMode.FUSED_DEEP_MOE or (
            type(fuse_mode) is int and fuse_mode == 1)):
        return
    if isinstance(quant_mode, bool) or not isinstance(quant_mode, int) or quant_mode not in QUANT_MODES:
        supported = ", ".join(f"{k} ({v})" for k, v in QUANT_MODES.items())
        raise ValueError(f"quant_mode must be one of: {supported}; got {quant_mode!r}")
    mode = None
    if not isinstance(fuse_mode, bool) and isinstance(fuse_mode, int):
        try:
            mode = FuseMode(fuse_mode)
        except ValueError:
            pass
    if mode is not FuseMode.FUSED_DEEP_MOE:
        named = f"FuseMode.{mode.name} ({int(mode)})" if mode is not None else repr(fuse_mode)
        why = " (Ascend's DispatchFFNCombine operator, which this backend does not implement)" if mode else ""
        raise ValueError(f"fuse_mode must be FuseMode.FUSED_DEEP_MOE (1); got {named}{why}")


def fused_deep_moe(
    buffer: Buffer,
    x: Tensor,
    topk_idx: Tensor,
    topk_weights: Tensor,
    gmm1_permuted_weight: Tensor,
    gmm1_permuted_weight_scale: Tensor,
    gmm2_weight: Tensor,
    gmm2_weight_scale: Tensor,
    num_max_dispatch_tokens_per_rank: int,
    num_experts: int,
    quant_mode: int = 1,
    fuse_mode: int = FuseMode.FUSED_DEEP_MOE,
    profile_enable: bool = False,
) -> tuple[Tensor, Tensor]:
    """The body of ``Buffer.fused_deep_moe`` (see its docstring for the arguments).

    Steps: checks (a rank that rejects its arguments tells its peers, as low-latency
    dispatch does) -> ``low_latency_dispatch`` with int8 (x quantized once, on the way
    into the peers' buffers) -> :func:`_swiglu_mlp_rows` straight on the received int8
    rows and scales, only the ``recv_count.sum()`` real ones, into the ``[M, H]``
    tensor -> ``low_latency_combine`` of that tensor with ``topk_weights``.
    """
    what = "fused_deep_moe"
    buffer._ll_ready(what)
    try:
        check_modes(quant_mode, fuse_mode)
        check_tensor("x", x, dtypes=FLOAT_DTYPES, shape=(None, None), what="[T, H]")
        ranks = buffer.group_size
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0 \
                or num_experts % ranks:
            raise ValueError(f"num_experts must be a positive multiple of the {ranks} ranks, got {num_experts!r}")
        weights = _fused_weights(gmm1_permuted_weight, gmm1_permuted_weight_scale, gmm2_weight, gmm2_weight_scale,
                                 x, num_experts // ranks, num_experts, ranks)
    except (TypeError, ValueError):
        # Consume the low-latency dispatch call on every rank with a "rejected" header, so the peers
        # fail fast (ValueError naming this rank) instead of waiting for rows that never come, and
        # every rank's call numbers stay in step.
        buffer._ll_reject_dispatch(buffer._ll_begin(0, what), x, num_max_dispatch_tokens_per_rank, what)
        raise
    # low_latency_dispatch checks the rest (topk_idx, topk_weights float32 [T, K], T <= Nmax, the
    # buffer size) the same way: on this rank before any data moves, with the peers told.
    try:
        recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(
            x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, topk_weights=topk_weights, quant_mode="int8")
        (xq, x_scale), state = recv_x, handle[7]  # handle[7]: LowLatencyState
        prefix = handle[1].tolist()  # inclusive prefix of the (local expert, source rank) blocks -> counts
        ep_recv_count = torch.tensor([b - a for a, b in zip([0] + prefix, prefix)], dtype=torch.int32)
        expert_out = torch.empty((xq.shape[0], x.shape[1]), dtype=state.dtype)  # combine reads rows < total only
        _swiglu_mlp_rows(xq, x_scale, recv_count.tolist(), *weights, out=expert_out)
        output, _, _ = buffer.low_latency_combine(expert_out, topk_idx, topk_weights, handle)
    except RuntimeError as error:  # a peer missing or dead: say which call the waiting step belongs to
        raise RuntimeError(f"deep_ep {what}: {error}") from None
    return output, ep_recv_count


# Weights fused_deep_moe has checked, by id(gmm1_permuted_weight) (a decode loop passes the same
# weights of each layer every step): (weakref to it, fingerprint, the checked tensors but it). The
# fingerprint changes when any of the four tensors is replaced or modified in place, or the
# expected shapes change; the entry goes when gmm1_permuted_weight is freed.
_CHECKED_WEIGHTS: dict = {}


def _fused_weights(w1: object, w1_scale: object, w2: object, w2_scale: object, x: Tensor, num_local: int,
                   num_experts: int, ranks: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """_check_expert_weights for fused_deep_moe, skipped when the same weights were checked before."""
    tensors = (w1, w1_scale, w2, w2_scale)
    key = None
    if all(type(t) is Tensor for t in tensors):
        key = (*((id(t), t._version, t.data_ptr(), t.shape) for t in tensors), x.shape[1], num_local, x.device)
        entry = _CHECKED_WEIGHTS.get(id(w1))
        if entry is not None and entry[0]() is w1 and entry[1] == key:
            first, rest = entry[2]
            return (w1 if first is None else first, *rest)
    checked = _check_expert_weights(
        w1, w1_scale, w2, w2_scale, hidden=x.shape[1], hidden_from="x", device=x.device, num_experts=num_local,
        experts_from=f"L = num_experts / ranks = {num_experts} / {ranks}",
        names=("gmm1_permuted_weight", "gmm1_permuted_weight_scale", "gmm2_weight", "gmm2_weight_scale"),
        scale_dtypes=FLOAT_DTYPES)
    if key is not None:
        # The entry must not hold w1 itself: it would never be freed.
        ident = id(w1)
        ref = weakref.ref(w1, lambda _, ident=ident: _CHECKED_WEIGHTS.pop(ident, None))
        _CHECKED_WEIGHTS[ident] = (ref, key, (None if checked[0] is w1 else checked[0], checked[1:]))
    return checked
