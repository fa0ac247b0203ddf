"""Compute half of ``fused_deep_moe``: the W8A8 SwiGLU expert MLP, no communication.

``Buffer.fused_deep_moe`` = low-latency dispatch (int8) -> :func:`grouped_swiglu_mlp_int8`
-> low-latency combine.  This module holds everything between the two
communication steps, plus the weight-layout helpers users need to prepare
``gmm1_permuted_weight`` (see SPEC.md, section "fused_deep_moe").

Math, per received row with int8 ``xq`` and float32 scale ``s_x`` of local expert e::

    h  = (xq @ W1[e]) * s_x * s_w1[e]            float32, int32-exact accumulation
    a  = silu(gate) * up                          gate/up = first/last I columns (unpermuted)
    aq, s_a = quantize_per_token_int8(a)
    y  = (aq @ W2[e]) * s_a * s_w2[e]             -> bfloat16
"""

from __future__ import annotations

import enum
import functools
import operator
from collections.abc import Sequence
from typing import NoReturn

import torch
from torch import Tensor

__all__ = [
    "FuseMode",
    "permute_gmm1_weight",
    "unpermute_gmm1_weight",
    "quantize_per_token_int8",
    "grouped_swiglu_mlp_int8",
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


def _check_tensor(name: str, t: object, dtype: torch.dtype, ndim: int) -> Tensor:
    """Checks type, dtype and rank; returns ``t`` typed as a Tensor."""
    if not isinstance(t, Tensor):
        _fail(TypeError, name, "a torch.Tensor", type(t).__name__)
    if t.dtype != dtype:
        _fail(TypeError, name, f"dtype {dtype}", t.dtype)
    if t.dim() != ndim:
        _fail(ValueError, name, f"a {ndim}-D tensor", f"shape {tuple(t.shape)}")
    return t


def _check_shape(name: str, t: Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != shape:
        _fail(ValueError, name, f"shape {shape} ({what})", f"shape {tuple(t.shape)}")


def _check_two_i(name: str, two_i: int) -> None:
    # Gate and up each need whole 64-column tiles.
    if two_i <= 0 or two_i % (2 * GMM1_TILE) != 0:
        _fail(ValueError, name, f"2I (gate+up columns) a positive multiple of {2 * GMM1_TILE}", two_i)


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
    w13 = _check_tensor("w13", w13, torch.int8, 3)
    w13_scale = _check_tensor("w13_scale", w13_scale, torch.float32, 2)
    num_experts, two_i, hidden = w13.shape
    _check_two_i("w13.shape[1]", two_i)
    _check_shape("w13_scale", w13_scale, (num_experts, two_i), "[L, 2I] of w13")
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
    w1 = _check_tensor("w1", w1, torch.int8, 3)
    w1_scale = _check_tensor("w1_scale", w1_scale, torch.float32, 2)
    num_experts, hidden, two_i = w1.shape
    _check_two_i("w1.shape[2]", two_i)
    _check_shape("w1_scale", w1_scale, (num_experts, two_i), "[L, 2I] of w1")
    tiles = two_i // (2 * GMM1_TILE)
    w13 = w1.transpose(1, 2).reshape(num_experts, tiles, 2, GMM1_TILE, hidden).transpose(1, 2)
    w13_scale = w1_scale.reshape(num_experts, tiles, 2, GMM1_TILE).transpose(1, 2)
    return (
        w13.reshape(num_experts, two_i, hidden).contiguous(),
        w13_scale.reshape(num_experts, two_i).contiguous(),
    )


# --------------------------------------------------------------------------- quantization


_QUANT_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def quantize_per_token_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row dynamic symmetric int8 quantization (SPEC: ``quant_mode="int8"``).

    ``scale = max|x_row| / 127`` in float32 and ``q = round(x / scale)`` clamped to
    ``[-127, 127]``, with ``x / scale`` the correctly rounded float32 quotient and
    ``round`` half-to-even (``torch.round``), so ``|q * scale - x| <= scale / 2`` up to
    float32 rounding (relative 1e-5).

    A row of zeros keeps the formula's ``scale = 0`` (as vLLM's int8 kernels do) and
    quantizes to zeros; it is divided by 1 instead of 0, so no NaN appears and it
    dequantizes to exact zeros.  A row containing inf/NaN gets a non-finite scale, so
    the problem stays visible downstream instead of turning into plausible numbers.
    Pure torch; runs on ``x``'s device.

    Args:
        x: ``[T, H]`` bfloat16, float16 or float32, ``H >= 1`` (``T`` may be 0).

    Returns:
        ``(q, scale)``: int8 ``[T, H]`` and float32 ``[T]``.

    Raises:
        TypeError: ``x`` is not a tensor of a supported dtype.
        ValueError: ``x`` is not 2-D or has ``H == 0``.
    """
    if not isinstance(x, Tensor):
        _fail(TypeError, "x", "a torch.Tensor", type(x).__name__)
    if x.dtype not in _QUANT_INPUT_DTYPES:
        _fail(TypeError, "x", "dtype bfloat16, float16 or float32", x.dtype)
    if x.dim() != 2 or x.shape[1] == 0:
        _fail(ValueError, "x", "a 2-D tensor [T, H] with H >= 1", f"shape {tuple(x.shape)}")
    xf = x.float()
    scale = xf.abs().amax(dim=1) / 127.0
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(xf / divisor[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


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


def _int8_matmul_exact(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for int8 ``a [m, k]`` and ``b [k, n]`` as float32 ``[m, n]``.

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
    if a.device.type == "cpu" and _cpu_int_mm_is_exact():
        if k <= _I32_EXACT_K:
            return torch._int_mm(a, b).float()
        acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int64, device=a.device)
        for k0 in range(0, k, _I32_EXACT_K):
            acc += torch._int_mm(a[:, k0 : k0 + _I32_EXACT_K], b[k0 : k0 + _I32_EXACT_K])
        return acc.float()
    if k <= _F32_EXACT_K:
        return a.float() @ b.float()
    acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64, device=a.device)
    for k0 in range(0, k, _F32_EXACT_K):
        acc += a[:, k0 : k0 + _F32_EXACT_K].float() @ b[k0 : k0 + _F32_EXACT_K].float()
    return acc.float()


# --------------------------------------------------------------------------- grouped MLP


def _rows_per_expert_to_list(rows_per_expert: object, num_experts: int, num_rows: int) -> list[int]:
    name = "rows_per_expert"
    if isinstance(rows_per_expert, Tensor):
        if rows_per_expert.dtype not in (torch.int32, torch.int64):
            _fail(TypeError, name, "an int64 (or int32) tensor", f"dtype {rows_per_expert.dtype}")
        if rows_per_expert.dim() != 1:
            _fail(ValueError, name, "a 1-D tensor [L]", f"shape {tuple(rows_per_expert.shape)}")
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
    xq = _check_tensor("xq", xq, torch.int8, 2)
    x_scale = _check_tensor("x_scale", x_scale, torch.float32, 1)
    w1 = _check_tensor("w1", w1, torch.int8, 3)
    w1_scale = _check_tensor("w1_scale", w1_scale, torch.float32, 2)
    w2 = _check_tensor("w2", w2, torch.int8, 3)
    w2_scale = _check_tensor("w2_scale", w2_scale, torch.float32, 2)
    num_rows, hidden = xq.shape
    if hidden == 0:
        _fail(ValueError, "xq", "H >= 1 columns", f"shape {tuple(xq.shape)}")
    num_experts, two_i = w1.shape[0], w1.shape[2]
    if num_experts == 0:
        _fail(ValueError, "w1", "at least one local expert (L >= 1)", f"shape {tuple(w1.shape)}")
    _check_two_i("w1.shape[2]", two_i)
    inter = two_i // 2
    _check_shape("x_scale", x_scale, (num_rows,), "[M] of xq")
    _check_shape("w1", w1, (num_experts, hidden, two_i), "[L, H, 2I], H from xq")
    _check_shape("w1_scale", w1_scale, (num_experts, two_i), "[L, 2I] of w1")
    _check_shape("w2", w2, (num_experts, inter, hidden), "[L, I, H] of w1 and xq")
    _check_shape("w2_scale", w2_scale, (num_experts, hidden), "[L, H] of w2")
    for name, t in (("x_scale", x_scale), ("w1", w1), ("w1_scale", w1_scale), ("w2", w2), ("w2_scale", w2_scale)):
        if t.device != xq.device:
            _fail(ValueError, name, f"device {xq.device} (that of xq)", t.device)
    counts = _rows_per_expert_to_list(rows_per_expert, num_experts, num_rows)

    out = torch.empty(num_rows, hidden, dtype=torch.bfloat16, device=xq.device)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        h = _int8_matmul_exact(xq[start:end], w1[e])
        h.mul_(x_scale[start:end, None]).mul_(w1_scale[e])
        # Column tiles alternate gate/up: [m, tile j, (gate|up), 64]; tile j of gate and
        # of up cover the same intermediate columns, so pairing them keeps the order.
        h = h.view(count, inter // GMM1_TILE, 2, GMM1_TILE)
        a = torch.nn.functional.silu(h[:, :, 0, :]).mul_(h[:, :, 1, :]).reshape(count, inter)
        aq, a_scale = quantize_per_token_int8(a)
        y = _int8_matmul_exact(aq, w2[e])
        y.mul_(a_scale[:, None]).mul_(w2_scale[e])
        out[start:end] = y
        start = end
    out[start:] = 0
    return out
