"""The independent per-token reference of fused_deep_moe's math, shared by the fused tests.

It is deliberately naive and independent of the library: one row
(or one token and its top-k experts) at a time, gate-then-up (unpermuted) weights,
float64 math, rounding only where the library's contract rounds (int8 quantization, float32
scales, bfloat16 output).

How results are compared (why the tolerances are what they are):
  * Integer products are exact on both sides, so the only float differences before
    requantization are float32 vs float64 roundings of ``h`` and ``a`` (relative
    ~1e-6, i.e. at most ~1e-4 in units of ``a / s_a`` whose magnitude is <= 127).
  * Requantization ``round(a / s_a)`` is discontinuous: an element whose reference
    ``a / s_a`` lies within ``_AMBIGUOUS`` (1e-3, 10x that error) of a half-integer may
    legitimately round to the neighbouring integer in float32.  For those elements
    only, the reference allows a change of 1 in ``aq``, i.e. an extra
    ``s_a * s_w2[n] * |W2[j, n]|`` in output column n.  Every other element must round
    identically, so a wrong pairing, scale or rounding rule still fails.
  * Then ``y`` differs from the float64 value by float32 rounding (relative
    ``_REL`` = 1e-5 covers it) and by the final bfloat16 rounding, bounded by half a
    bfloat16 ulp of the value, which is computed exactly per element.
"""

from __future__ import annotations

import torch

_AMBIGUOUS = 1e-3
_REL = 1e-5


# ----------------------------------------------------------------------------- reference


def _dist_to_half_integer(r: torch.Tensor) -> torch.Tensor:
    frac = r.abs() - r.abs().floor()
    return (frac - 0.5).abs()


def _to_f32(v: float) -> float:
    """Rounds a Python float to the nearest float32 (scales are float32)."""
    return torch.tensor(v, dtype=torch.float64).to(torch.float32).item()


def ref_quantize_row(
    x_row: torch.Tensor, ambiguous: float, quotient_in_float32: bool = False
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """int8 quantization (docs/semantics.md) of one row: (q as float64, float32 scale, ambiguous mask).

    ``x / scale`` is exact (float64) unless ``quotient_in_float32``: then it is the
    correctly rounded float32 quotient of the float32 operands, which pins down the
    rounding of near-ties exactly and leaves no ambiguous elements.
    """
    v = x_row.double()
    scale = _to_f32(v.abs().max().item() / 127)
    no_ambiguity = torch.zeros_like(v, dtype=torch.bool)
    if scale == 0:
        return torch.zeros_like(v), 0.0, no_ambiguity
    if quotient_in_float32:
        r = (x_row.float() / torch.tensor(scale, dtype=torch.float32)).double()
    else:
        r = v / scale
    q = torch.round(r).clamp(-127, 127)
    return q, scale, no_ambiguity if quotient_in_float32 else _dist_to_half_integer(r) < ambiguous


def ref_expert_row(
    xq_row: torch.Tensor,
    s_x: float,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row through one expert (unpermuted w13 [2I, H]); returns (y float64 [H], tolerance [H])."""
    inter = w2.shape[0]
    h = (w13.double() @ xq_row.double()) * s_x * w13_scale.double()  # [2I]
    gate, up = h[:inter], h[inter:]
    a = gate * torch.sigmoid(gate) * up  # silu(gate) * up
    aq, s_a, amb = ref_quantize_row(a, _AMBIGUOUS)
    y = (aq @ w2.double()) * s_a * w2_scale.double()
    flip = s_a * w2_scale.double() * (w2.double().abs() * amb[:, None]).sum(0)
    return y, _REL * y.abs() + flip


def ref_moe_token(
    x_row: torch.Tensor,
    topk_idx_row: torch.Tensor,
    topk_weights_row: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-rank fused_deep_moe for one token: quantize, each top-k expert, weighted sum.

    Returns (output float64 [H], tolerance [H]) before the final bfloat16 rounding.
    """
    # x is bfloat16, so x = max|x| / 2 and similar near-ties of x / s_x are common; the
    # float32 quotient decides them exactly as any float32 implementation must.
    xq, s_x, _ = ref_quantize_row(x_row, 0.0, quotient_in_float32=True)
    out = torch.zeros(x_row.shape[0], dtype=torch.float64)
    tol = torch.zeros_like(out)
    for k in range(topk_idx_row.shape[0]):
        e = int(topk_idx_row[k])
        if e < 0:
            continue
        w = float(topk_weights_row[k])
        y, y_tol = ref_expert_row(xq, s_x, w13[e], w13_scale[e], w2[e], w2_scale[e])
        # The library rounds each expert row to bfloat16 before the combine.
        y_err = y_tol + _bf16_half_ulp(y.abs() + y_tol)
        out += w * y
        tol += abs(w) * y_err + _REL * abs(w * y)  # float32 accumulation of the combine
    return out, tol


def ref_moe_token_float(
    x_row: torch.Tensor,
    topk_idx_row: torch.Tensor,
    topk_weights_row: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """fused_deep_moe with floating (bf16) weights for one token, float64: per top-k expert
    h = W13[e] x, a = silu(gate) * up rounded to bf16, y = a W2[e] rounded to bf16; weighted sum.
    w13 [E, 2I, H] gate-then-up, w2 [E, I, H]."""
    out = torch.zeros(x_row.shape[0], dtype=torch.float64)
    for k in range(topk_idx_row.shape[0]):
        e = int(topk_idx_row[k])
        if e < 0:
            continue
        h = w13[e].double() @ x_row.double()
        gate, up = h[: w2.shape[1]], h[w2.shape[1] :]
        a = (gate * torch.sigmoid(gate) * up).to(torch.bfloat16).double()
        y = (a @ w2[e].double()).to(torch.bfloat16).double()
        out += float(topk_weights_row[k]) * y
    return out


def _bf16_half_ulp(mag: torch.Tensor) -> torch.Tensor:
    """Half a bfloat16 ulp at magnitude ``mag`` (float64): the worst rounding error there."""
    _, exp = torch.frexp(mag)  # mag = m * 2**exp, m in [0.5, 1): ulp = 2**(exp - 8)
    half = torch.ldexp(torch.ones_like(mag), exp - 9)
    return torch.where(mag == 0, torch.zeros_like(mag), half)


def assert_bf16_matches(got: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    assert got.dtype == torch.bfloat16
    err = (got.double() - ref).abs()
    bound = tol + _bf16_half_ulp(ref.abs() + tol)
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} elements off, first at {bad.nonzero()[0].tolist()}: "
        f"got {got.double()[bad][0].item()}, ref {ref[bad][0].item()}, bound {bound[bad][0].item()}"
    )


# ----------------------------------------------------------------------------- data


def make_weights(gen: torch.Generator, num_experts: int, hidden: int, inter: int):
    """Random W8A8 expert weights (unpermuted) with scales giving h and y of order 1."""
    w13 = torch.randint(-128, 128, (num_experts, 2 * inter, hidden), generator=gen, dtype=torch.int8)
    w2 = torch.randint(-128, 128, (num_experts, inter, hidden), generator=gen, dtype=torch.int8)
    # |int8| has rms ~74 and xq rms ~40, so these scales make h and y roughly unit-sized.
    w13_scale = (0.5 + torch.rand(num_experts, 2 * inter, generator=gen)) * 2 / (74 * 40 * 0.01 * hidden**0.5)
    w2_scale = (0.5 + torch.rand(num_experts, hidden, generator=gen)) / (74 * 40 * inter**0.5)
    return w13, w13_scale.float(), w2, w2_scale.float()
