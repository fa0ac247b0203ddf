"""``fused_deep_moe``: low-latency dispatch -> SwiGLU expert MLP -> combine.

:func:`fused_deep_moe` (behind ``Buffer.fused_deep_moe``) runs the whole MoE layer of a
decode step in one call; :func:`grouped_swiglu_mlp_int8` is its compute half on its own,
for callers that do their own dispatch; :func:`permute_gmm1_weight` /
:func:`unpermute_gmm1_weight` prepare ``gmm1_permuted_weight`` (docs/semantics.md,
"fused_deep_moe").

The weights' dtype decides the math (as DeepEP-Ascend's callers use it: its own fused test
passes ``quant_mode=0`` with int8 weights).  Int8 weights, per received row with int8 ``xq``
and float32 scale ``s_x`` of local expert e (W8A8)::

    h  = (xq @ W1[e]) * s_x * s_w1[e]            float32, int32-exact accumulation
    a  = silu(gate) * up                          gate/up = first/last I columns (unpermuted)
    aq, s_a = quantize_per_token_int8(a)
    y  = (aq @ W2[e]) * s_a * s_w2[e]             -> bfloat16

Floating (bf16) weights: the rows travel in bf16 and ``h = x @ W1[e]`` (times ``s_w1`` when
scales are given), ``a`` as above rounded to the weights' dtype, ``y = a @ W2[e]`` (times
``s_w2``).  Here ``W2[e]`` is ``[I, H]``; ``fused_deep_moe`` takes it as upstream passes it,
``gmm2_weight [L, H, I]`` (each expert's down projection in ``[out, in]`` order), and
``FuseMode.DISPATCH_FFN_COMBINE`` as ``[L, I, H]`` with gmm1 in the plain ``[gate | up]``
column order and scales as int64 bit patterns of float32.

The fused call saves what the unfused pipeline (``low_latency_dispatch`` ->
``grouped_swiglu_mlp_int8`` -> ``low_latency_combine``) repeats: it computes only the
received rows (no zeroed padding) straight into the ``[M, H]`` tensor combine reads, and
checks (and lays out) the weights of a decode loop once, not every step.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import operator
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn, Optional

import torch
from torch import Tensor

from . import env, layout
from .ops import quantize_int8
from .utils import FLOAT_DTYPES, check_tensor, topk_idx_t

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
    #: Ascend's ``DispatchFFNCombine`` operator: gmm1 in the plain ``[gate | up]`` layout, gmm2
    #: ``[L, I, H]``, scales as int64 bit patterns of float32, int8 weights, no shared experts;
    #: returns per-local-expert counts.
    DISPATCH_FFN_COMBINE = 2


# --------------------------------------------------------------------------- validation


def _fail(exc: type[Exception], name: str, expected: str, given: object) -> NoReturn:
    raise exc(f"{name}: expected {expected}, got {given}")


def _check_two_i(name: str, two_i: int, tiled: bool = True) -> None:
    # Tiled: gate and up each need whole 64-column tiles; plain: two equal halves.
    step = 2 * GMM1_TILE if tiled else 2
    if two_i <= 0 or two_i % step != 0:
        _fail(ValueError, name, f"2I (gate+up columns) a positive multiple of {step}", two_i)


@dataclasses.dataclass(frozen=True)
class WeightLayout:
    """How a caller lays out the expert weights.

    tiled_gmm1: gmm1's 2I columns are gate/up interleaved in 64-column tiles (else ``[gate | up]``).
    gmm2_out_in: gmm2 is ``[L, H, I]``, each expert's down projection in ``[out, in]`` order
        (``y = a @ W2[e].T``); else ``[L, I, H]`` (``y = a @ W2[e]``, npu_grouped_matmul's order).
    """

    tiled_gmm1: bool
    gmm2_out_in: bool


#: ``fused_deep_moe`` with ``FuseMode.FUSED_DEEP_MOE``, as DeepEP-Ascend's callers pass the weights.
FUSED_DEEP_MOE_LAYOUT = WeightLayout(tiled_gmm1=True, gmm2_out_in=True)
#: ``FuseMode.DISPATCH_FFN_COMBINE`` (DeepEP-Ascend's test transposes both ``[L, out, in]`` weights).
DISPATCH_FFN_COMBINE_LAYOUT = WeightLayout(tiled_gmm1=False, gmm2_out_in=False)
#: :func:`grouped_swiglu_mlp_int8`: the layout of a hand-written grouped-matmul pipeline.
GROUPED_MLP_LAYOUT = WeightLayout(tiled_gmm1=True, gmm2_out_in=False)


@dataclasses.dataclass(frozen=True)
class ExpertWeights:
    """Checked expert weights in the compute layout.

    w1: ``[L, H, 2I]`` (tiled as ``tiled_gmm1`` says); w2: ``[L, I, H]`` contiguous. Both int8
    (W8A8) or both floating (a floating MLP). Scales float32 ``[L, 2I]`` / ``[L, H]``, or None
    for floating weights given without scales.
    """

    w1: Tensor
    w1_scale: Optional[Tensor]
    w2: Tensor
    w2_scale: Optional[Tensor]
    tiled_gmm1: bool

    @property
    def quantized(self) -> bool:
        return self.w1.dtype == torch.int8


def _float_scale(
    name: str, scale: object, shape: tuple[int, ...], what: str, dtypes: tuple[torch.dtype, ...], optional: bool
) -> Optional[Tensor]:
    """A weight scale as float32: floating dtypes converted, int64 read as float32 bit patterns
    (DeepEP-Ascend's DISPATCH_FFN_COMBINE convention); None when optional and absent or empty."""
    if optional and (scale is None or (isinstance(scale, Tensor) and scale.numel() == 0)):
        return None
    scale = check_tensor(name, scale, dtypes=dtypes + (torch.int64,), shape=shape, what=what)
    if scale.dtype != torch.int64:
        return scale.float().contiguous()
    if scale.numel() and (int(scale.min()) < -(2**31) or int(scale.max()) >= 2**32):
        _fail(ValueError, name, "int64 values holding the 32 bits of float32 scales", "values outside 32 bits")
    return scale.to(torch.int32).view(torch.float32).contiguous()  # int64 -> int32 keeps the low 32 bits


def check_expert_weights(
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
    layout: WeightLayout = GROUPED_MLP_LAYOUT,
    weight_dtypes: tuple[torch.dtype, ...] = (torch.int8,),
) -> ExpertWeights:
    """Checks the expert weights of the SwiGLU MLP; returns them in the compute layout.

    Shapes: ``w1`` ``[L, H, 2I]`` (2I a multiple of 128 when tiled, else even), ``w1_scale``
    ``[L, 2I]``, ``w2`` ``[L, H, I]`` or ``[L, I, H]`` as ``layout.gmm2_out_in`` says, ``w2_scale``
    ``[L, H]``.  ``w1`` and ``w2`` share one dtype of ``weight_dtypes``; int8 weights need both
    scales, floating weights take them or not.  ``H`` must equal ``hidden`` (taken from
    ``hidden_from``); ``L`` must equal ``num_experts`` when given (from ``experts_from``).
    ``names`` are the argument names the errors use.
    """
    n1, n1s, n2, n2s = names
    w1 = check_tensor(n1, w1, dtypes=weight_dtypes, shape=(None, None, None))
    if num_experts is None:
        num_experts = w1.shape[0]
        if num_experts == 0:
            _fail(ValueError, n1, "at least one local expert (L >= 1)", f"shape {list(w1.shape)}")
    two_i = w1.shape[2]
    _check_two_i(f"{n1}.shape[2]", two_i, layout.tiled_gmm1)
    inter = two_i // 2
    check_tensor(
        n1,
        w1,
        dtypes=weight_dtypes,
        shape=(num_experts, hidden, two_i),
        what=f"[L, H, 2I]: {experts_from + ', ' if experts_from else ''}H from {hidden_from}",
    )
    w2_shape, w2_what = (
        ((num_experts, hidden, inter), "[L, H, I]")
        if layout.gmm2_out_in
        else ((num_experts, inter, hidden), "[L, I, H]")
    )
    check_tensor(n2, w2, dtypes=(w1.dtype,), shape=w2_shape, what=f"{w2_what} of {n1} and {hidden_from}")
    optional = w1.dtype != torch.int8
    s1 = _float_scale(n1s, w1_scale, (num_experts, two_i), f"[L, 2I] of {n1}", scale_dtypes, optional)
    s2 = _float_scale(n2s, w2_scale, (num_experts, hidden), f"[L, H] of {n2}", scale_dtypes, optional)
    for name, t in zip(names, (w1, w1_scale, w2, w2_scale)):
        if isinstance(t, Tensor) and t.numel() and t.device != device:
            _fail(ValueError, name, f"device {device} (that of {hidden_from})", t.device)
    # [L, H, I] -> [L, I, H] once: every GEMM below is then rows @ [in, out].
    w2 = w2.transpose(1, 2) if layout.gmm2_out_in else w2
    return ExpertWeights(w1=w1.contiguous(), w1_scale=s1, w2=w2.contiguous(), w2_scale=s2, tiled_gmm1=layout.tiled_gmm1)


# --------------------------------------------------------------------------- weight layout


def permute_gmm1_weight(w13: Tensor, w13_scale: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """Converts gate-then-up GMM1 weights to the ``gmm1_permuted_weight`` layout.

    Only GMM1 is permuted: ``fused_deep_moe`` takes ``gmm2_weight`` as a model stores its down
    projection, ``[L, H, I]`` (``[out, in]`` per expert), with ``gmm2_weight_scale [L, H]``.

    Args:
        w13: int8 or bfloat16 ``[L, 2I, H]``; rows ``[0, I)`` are the gate projection, rows
            ``[I, 2I)`` the up projection (the usual ``w13_weight`` of MoE layers).
        w13_scale: float32 ``[L, 2I]``, per-output-channel scales in the same row order; None
            for weights without scales (bfloat16).

    Returns:
        ``(w1, w1_scale)``: ``[L, H, 2I]`` in w13's dtype (contiguous) whose columns are
        gate/up interleaved in tiles of 64 — tile ``2j`` holds gate columns ``[64j, 64j+64)``,
        tile ``2j+1`` up columns ``[64j, 64j+64)`` — and float32 ``[L, 2I]`` in the same column
        order (None when w13_scale is None).

    Raises:
        TypeError / ValueError: wrong types, dtypes or shapes, or ``2I % 128 != 0``.
    """
    check_tensor("w13", w13, dtypes=(torch.int8,) + FLOAT_DTYPES, shape=(None, None, None))
    num_experts, two_i, hidden = w13.shape
    _check_two_i("w13.shape[1]", two_i)
    tiles = two_i // (2 * GMM1_TILE)
    # [L, (gate|up), tile j, 64, H] -> [L, tile j, (gate|up), 64, H]: tile pairs side by side.
    w1 = w13.reshape(num_experts, 2, tiles, GMM1_TILE, hidden).transpose(1, 2)
    w1 = w1.reshape(num_experts, two_i, hidden).transpose(1, 2).contiguous()
    if w13_scale is None:
        return w1, None
    check_tensor("w13_scale", w13_scale, dtypes=(torch.float32,), shape=(num_experts, two_i), what="[L, 2I] of w13")
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
    """Per-row dynamic symmetric int8 quantization (``quant_mode="int8"``, docs/semantics.md), checked.

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
def cpu_int_mm_is_exact() -> bool:
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


def int8_matmul_exact(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
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
    if a.device.type == "cpu" and cpu_int_mm_is_exact():
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


def _expert_blocks(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of every non-empty expert-major block."""
    blocks, start = [], 0
    for e, count in enumerate(counts):
        if count:
            blocks.append((e, start, start + count))
        start += count
    return blocks


def _swiglu(h: Tensor, tiled: bool) -> Tensor:
    """float32 ``[n, I]`` = silu(gate) * up of ``h [n, 2I]`` (columns tiled or ``[gate | up]``)."""
    total, two_i = h.shape
    inter = two_i // 2
    if tiled:  # [rows, tile j, (gate|up), 64]: tile j of gate and of up cover the same columns
        tiles = h.view(total, inter // GMM1_TILE, 2, GMM1_TILE)
        return torch.nn.functional.silu(tiles[:, :, 0, :]).mul_(tiles[:, :, 1, :]).view(total, inter)
    return torch.nn.functional.silu(h[:, :inter]).mul_(h[:, inter:])


def _grouped_matmul(rows: Tensor, weight: Tensor, blocks: list[tuple[int, int, int]]) -> Tensor:
    """float32 ``[total, N]``: each block's rows times its expert's ``weight[e]`` ``[K, N]``; int8
    operands exactly (int32 accumulation), floating ones in float32."""
    out = torch.empty(blocks[-1][2], weight.shape[2], dtype=torch.float32, device=rows.device)
    for e, begin, end in blocks:
        if weight.dtype == torch.int8:
            int8_matmul_exact(rows[begin:end], weight[e], out=out[begin:end])
        else:
            torch.matmul(rows[begin:end].float(), weight[e].float(), out=out[begin:end])
    return out


def swiglu_mlp_rows(xq: Tensor, x_scale: Tensor, counts: list[int], weights: ExpertWeights, out: Tensor) -> None:
    """Writes the W8A8 SwiGLU MLP of rows ``[0, sum(counts))`` into the same rows of ``out``.

    No checks (callers validate).  Row block ``e`` (``counts[e]`` rows, expert-major) goes
    through expert ``e``; rows of ``out`` past the total are left as they are.  The int8
    GEMMs run once per expert block (``torch._int_mm``, int32 accumulation); everything
    elementwise (scales, SwiGLU, requantization) runs once over all rows, so the Python
    work per call is a few operations per local expert, none per row.
    """
    blocks = _expert_blocks(counts)
    if not blocks:
        return
    # GMM1 + dequant: h = (xq @ W1) * s_x * s_w1, in this order of roundings.
    h = _grouped_matmul(xq, weights.w1, blocks)
    h.mul_(x_scale[: h.shape[0], None])
    for e, begin, end in blocks:
        h[begin:end].mul_(weights.w1_scale[e])
    aq, a_scale = quantize_int8(_swiglu(h, weights.tiled_gmm1))
    # GMM2 + dequant: y = (aq @ W2) * s_a * s_w2, rounded once to out's dtype.
    y = _grouped_matmul(aq, weights.w2, blocks)
    y.mul_(a_scale[:, None])
    for e, begin, end in blocks:
        torch.mul(y[begin:end], weights.w2_scale[e], out=out[begin:end])


def _float_mlp_rows(x: Tensor, counts: list[int], weights: ExpertWeights, out: Tensor) -> None:
    """The floating-weight SwiGLU MLP of rows ``[0, sum(counts))`` of ``x`` into ``out``.

    Products accumulate in float32; the optional scales multiply per output column; ``a`` is
    rounded to the weights' dtype before GMM2 (the device feeds GMM2 in that dtype).
    """
    blocks = _expert_blocks(counts)
    if not blocks:
        return
    h = _grouped_matmul(x, weights.w1, blocks)
    for e, begin, end in blocks:
        if weights.w1_scale is not None:
            h[begin:end].mul_(weights.w1_scale[e])
    y = _grouped_matmul(_swiglu(h, weights.tiled_gmm1).to(weights.w1.dtype), weights.w2, blocks)
    for e, begin, end in blocks:
        if weights.w2_scale is not None:
            y[begin:end].mul_(weights.w2_scale[e])
    out[: y.shape[0]] = y


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
        w2: int8 ``[L, I, H]`` (npu_grouped_matmul's order, as in a hand-written pipeline;
            ``fused_deep_moe`` instead takes ``[L, H, I]`` as DeepEP-Ascend's callers pass it).
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
    weights = check_expert_weights(w1, w1_scale, w2, w2_scale, hidden, "xq", xq.device)
    check_tensor("x_scale", x_scale, dtypes=(torch.float32,), shape=(num_rows,), what="[M] of xq", device=xq.device)
    counts = _rows_per_expert_to_list(rows_per_expert, weights.w1.shape[0], num_rows)
    out = torch.empty(num_rows, hidden, dtype=torch.bfloat16, device=xq.device)
    swiglu_mlp_rows(xq, x_scale, counts, weights, out)
    out[sum(counts) :] = 0
    return out


# --------------------------------------------------------------------------- fused pipeline


#: ``quant_mode`` values of ``fused_deep_moe`` (DeepEP-Ascend's numbering). The weights' dtype
#: decides the math, as DeepEP-Ascend's own callers rely on (its fused test passes 0 with int8 weights).
QUANT_MODES = {0: "no quantization requested", 1: "W8A8: per-token dynamic int8 activations, int8 weights"}


def check_modes(quant_mode: object, fuse_mode: object) -> FuseMode:
    """The FuseMode of ``fuse_mode`` (a FuseMode or its int value); ValueError unless quant_mode is
    0 or 1 and fuse_mode names a FuseMode."""
    if isinstance(quant_mode, bool) or not isinstance(quant_mode, int) or quant_mode not in QUANT_MODES:
        supported = ", ".join(f"{k} ({v})" for k, v in QUANT_MODES.items())
        raise ValueError(f"quant_mode must be one of: {supported}; got {quant_mode!r}")
    if not isinstance(fuse_mode, bool) and isinstance(fuse_mode, int) and fuse_mode in FuseMode.__members__.values():
        return FuseMode(fuse_mode)
    modes = ", ".join(f"FuseMode.{m.name} ({int(m)})" for m in FuseMode)
    raise ValueError(f"fuse_mode must be one of {modes}; got {fuse_mode!r}")


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
    dispatch does) -> ``low_latency_dispatch`` (int8 with int8 weights: x quantized once, on
    the way into the peers' buffers; bf16 with floating weights) -> the expert MLP straight
    on the received rows, only the ``recv_count.sum()`` real ones, into the ``[M, H]`` tensor
    -> ``low_latency_combine`` of that tensor with ``topk_weights``.
    """
    what = "fused_deep_moe"
    calls = buffer.runtime.low_latency  # the low-latency call protocol (deep_ep/low_latency.py)
    calls.ready(what)
    try:
        mode = check_modes(quant_mode, fuse_mode)
        check_tensor("x", x, dtypes=FLOAT_DTYPES, shape=(None, None), what="[T, H]")
        check_tensor("topk_idx", topk_idx, dtypes=(topk_idx_t, torch.int32), shape=(x.shape[0], None))
        ranks = buffer.group_size
        shared = env.shared_expert_rank_num()
        roles = layout.SharedExperts.check(num_experts, ranks, shared)
        ffn_combine = mode is FuseMode.DISPATCH_FFN_COMBINE
        num_max = num_max_dispatch_tokens_per_rank
        if ffn_combine:
            num_max = ffn_combine_tokens_per_rank(num_max, topk_idx.shape[1], ranks, shared)
        num_local = roles.local_experts(buffer.rank)
        weights = fused_weights(
            gmm1_permuted_weight,
            gmm1_permuted_weight_scale,
            gmm2_weight,
            gmm2_weight_scale,
            x,
            num_local,
            roles.describe_local(buffer.rank),
            mode,
        )
    except (TypeError, ValueError):
        # Consume the low-latency dispatch call on every rank with a "rejected" header, so the peers
        # fail fast (ValueError naming this rank) instead of waiting for rows that never come, and
        # every rank's call numbers stay in step.
        transport = buffer.low_latency_strategy.transport
        calls.reject_dispatch(calls.begin(0, what), x, num_max_dispatch_tokens_per_rank, what, transport)
        raise
    topk_idx = topk_idx.to(topk_idx_t)
    out_dtype = torch.bfloat16 if x.dtype == torch.float32 else x.dtype
    # low_latency_dispatch checks the rest (topk_idx values, topk_weights float32 [T, K], T <= Nmax,
    # the buffer size) the same way: on this rank before any data moves, with the peers told.
    try:
        recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(
            x if weights.quantized else x.to(out_dtype),
            topk_idx,
            num_max,
            num_experts,
            topk_weights=topk_weights,
            quant_mode="int8" if weights.quantized else "bf16",
        )
        rows = recv_x[0] if weights.quantized else recv_x
        expert_out = torch.empty((rows.shape[0], x.shape[1]), dtype=out_dtype)  # combine reads rows < total only
        counts = recv_count.tolist()
        if weights.quantized:
            swiglu_mlp_rows(recv_x[0], recv_x[1], counts, weights, expert_out)
        else:
            _float_mlp_rows(recv_x, counts, weights, expert_out)
        output, _, _ = buffer.low_latency_combine(expert_out, topk_idx, topk_weights, handle)
    except RuntimeError as error:  # a peer missing or dead: say which call the waiting step belongs to
        raise RuntimeError(f"deep_ep {what}: {error}") from None
    if ffn_combine:
        return output, recv_count.to(torch.int32)
    prefix = handle[1].tolist()  # inclusive prefix of the (local expert, source rank) blocks -> counts
    return output, torch.tensor([b - a for a, b in zip([0] + prefix, prefix)], dtype=torch.int32)


def ffn_combine_tokens_per_rank(max_output_size: object, num_topk: int, ranks: int, shared_ranks: int) -> int:
    """The Nmax of FuseMode.DISPATCH_FFN_COMBINE's low-latency calls, on CPU and NPU alike: the mode
    takes the most rows one rank may receive (max_bs * R * K, as DeepEP-Ascend's callers compute it)
    and sizes the buffers by max_bs = that / (R * K). ValueError for a bad size, or with shared-expert
    ranks, which the mode does not have (as upstream)."""
    if shared_ranks:
        raise ValueError(
            f"fuse_mode FuseMode.DISPATCH_FFN_COMBINE has no shared experts (as DeepEP-Ascend); "
            f"got MOE_SHARED_EXPERT_RANK_NUM={shared_ranks}"
        )
    if isinstance(max_output_size, bool) or not isinstance(max_output_size, int) or max_output_size <= 0:
        raise ValueError(
            f"num_max_dispatch_tokens_per_rank (with FuseMode.DISPATCH_FFN_COMBINE: the most rows a "
            f"rank receives, max_bs * ranks * topk) must be a positive int, got {max_output_size!r}"
        )
    return max(1, max_output_size // (ranks * num_topk))


# Weights fused_deep_moe has checked, by id(gmm1_permuted_weight) (a decode loop passes the same
# weights of each layer every step): (weakref to it, fingerprint, the compute-layout w1 unless it is
# gmm1_permuted_weight itself, the ExpertWeights without w1). The
# fingerprint changes when any of the four tensors is replaced or modified in place, or the
# expected shapes change; the entry goes when gmm1_permuted_weight is freed.
_CHECKED_WEIGHTS: dict = {}


def fused_weights(
    w1: object,
    w1_scale: object,
    w2: object,
    w2_scale: object,
    x: Tensor,
    num_local: int,
    experts_from: str,
    mode: FuseMode,
) -> ExpertWeights:
    """check_expert_weights for fused_deep_moe in `mode`'s weight layout (DISPATCH_FFN_COMBINE: int8
    only, as DeepEP-Ascend), on CPU and NPU alike; cached per weight tensor (_CHECKED_WEIGHTS)."""
    ffn_combine = mode is FuseMode.DISPATCH_FFN_COMBINE
    if ffn_combine and isinstance(w1, Tensor) and w1.dtype in FLOAT_DTYPES:
        raise ValueError(
            f"fuse_mode FuseMode.DISPATCH_FFN_COMBINE needs int8 weights (as DeepEP-Ascend); got {w1.dtype}"
        )
    weight_layout = DISPATCH_FFN_COMBINE_LAYOUT if ffn_combine else FUSED_DEEP_MOE_LAYOUT
    tensors = (w1, w1_scale, w2, w2_scale)
    key = None
    if all(type(t) is Tensor for t in tensors):
        key = (
            # Where the data lies catches a `.data = ...` swap, which leaves _version alone (the
            # storage's address: read the same way for host and device tensors).
            *(
                (id(t), t._version, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.dtype)
                for t in tensors
            ),
            x.shape[1],
            num_local,
            x.device,
            weight_layout,
        )
        entry = _CHECKED_WEIGHTS.get(id(w1))
        if entry is not None and entry[0]() is w1 and entry[1] == key:
            return dataclasses.replace(entry[3], w1=w1 if entry[2] is None else entry[2])
    checked = check_expert_weights(
        w1,
        w1_scale,
        w2,
        w2_scale,
        hidden=x.shape[1],
        hidden_from="x",
        device=x.device,
        num_experts=num_local,
        experts_from=experts_from,
        names=("gmm1_permuted_weight", "gmm1_permuted_weight_scale", "gmm2_weight", "gmm2_weight_scale"),
        scale_dtypes=FLOAT_DTYPES,
        layout=weight_layout,
        weight_dtypes=(torch.int8,) + FLOAT_DTYPES,
    )
    if key is not None:
        # The entry must not hold w1 itself (it would never be freed): when the compute layout is
        # w1 as given, the entry keeps None in its place and the lookup puts w1 back.
        ident = id(w1)
        ref = weakref.ref(w1, lambda _, ident=ident: _CHECKED_WEIGHTS.pop(ident, None))
        own_w1 = None if checked.w1 is w1 else checked.w1
        _CHECKED_WEIGHTS[ident] = (ref, key, own_w1, dataclasses.replace(checked, w1=None))
    return checked
