"""Tests of deep_ep.fused: the compute half of fused_deep_moe (no communication).

Results are compared with the per-token reference of fused_reference.py (its docstring
explains the tolerances).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fused_reference import assert_bf16_matches, make_weights, ref_expert_row, ref_moe_token, ref_quantize_row  # noqa: E402

from deep_ep import fused  # noqa: E402
from deep_ep.fused import (  # noqa: E402
    FuseMode,
    grouped_swiglu_mlp_int8,
    permute_gmm1_weight,
    quantize_per_token_int8,
    unpermute_gmm1_weight,
)

# ----------------------------------------------------------------------------- FuseMode


def test_fuse_mode_values_match_deepep_ascend():
    assert FuseMode.FUSED_DEEP_MOE == 1
    assert FuseMode(2) is FuseMode.DISPATCH_FFN_COMBINE
    assert isinstance(FuseMode.FUSED_DEEP_MOE, int)


# ----------------------------------------------------------------------------- weight layout


def test_permute_tile_order_hand_checked():
    # I = 128: gate rows 0..127, up rows 128..255; scale r identifies original row r.
    two_i, hidden = 256, 2
    rows = torch.arange(two_i)
    w13 = torch.stack([rows - 128, 127 - rows], dim=1).to(torch.int8)[None]  # [1, 256, 2]
    w13_scale = rows.float()[None]
    w1, w1_scale = permute_gmm1_weight(w13, w13_scale)
    expected_order = (
        list(range(0, 64))  # tile 0: gate columns 0..63
        + list(range(128, 192))  # tile 1: up columns 0..63
        + list(range(64, 128))  # tile 2: gate columns 64..127
        + list(range(192, 256))  # tile 3: up columns 64..127
    )
    assert w1.shape == (1, hidden, two_i) and w1.dtype == torch.int8 and w1.is_contiguous()
    assert w1_scale.tolist() == [[float(r) for r in expected_order]]
    assert w1[0, 0].tolist() == [r - 128 for r in expected_order]
    assert w1[0, 1].tolist() == [127 - r for r in expected_order]


@pytest.mark.parametrize("num_experts,inter,hidden", [(1, 64, 8), (3, 192, 5), (2, 256, 130)])
def test_permute_unpermute_round_trip(num_experts, inter, hidden):
    gen = torch.Generator().manual_seed(1)
    w13 = torch.randint(-128, 128, (num_experts, 2 * inter, hidden), generator=gen, dtype=torch.int8)
    w13_scale = torch.rand(num_experts, 2 * inter, generator=gen)
    w1, w1_scale = permute_gmm1_weight(w13, w13_scale)
    assert w1.shape == (num_experts, hidden, 2 * inter) and w1_scale.shape == (num_experts, 2 * inter)
    back, back_scale = unpermute_gmm1_weight(w1, w1_scale)
    assert torch.equal(back, w13) and torch.equal(back_scale, w13_scale)
    # Columns are a permutation of the rows of w13 (weights move together with their scales).
    for c in range(0, 2 * inter, 37):
        r = int((w13_scale[0] == w1_scale[0, c]).nonzero()[0])
        assert torch.equal(w1[0, :, c], w13[0, r])


def test_permute_errors():
    w13 = torch.zeros(2, 256, 4, dtype=torch.int8)
    scale = torch.zeros(2, 256)
    with pytest.raises(ValueError, match=r"w13\.shape\[1\].*multiple of 128.*192"):
        permute_gmm1_weight(torch.zeros(2, 192, 4, dtype=torch.int8), torch.zeros(2, 192))
    with pytest.raises(TypeError, match="w13.*int8.*int32"):
        permute_gmm1_weight(w13.int(), scale)
    with pytest.raises(TypeError, match="w13_scale.*float32.*bfloat16"):
        permute_gmm1_weight(w13, scale.bfloat16())
    with pytest.raises(ValueError, match=r"w13_scale.*\[2, 256\].*\[3, 256\]"):
        permute_gmm1_weight(w13, torch.zeros(3, 256))
    with pytest.raises(ValueError, match="w13.*3-D"):
        permute_gmm1_weight(w13[0], scale)
    with pytest.raises(ValueError, match=r"w1\.shape\[2\].*multiple of 128"):
        unpermute_gmm1_weight(torch.zeros(2, 4, 64, dtype=torch.int8), torch.zeros(2, 64))
    with pytest.raises(ValueError, match="w1_scale"):
        unpermute_gmm1_weight(torch.zeros(2, 4, 256, dtype=torch.int8), torch.zeros(2, 128))


def test_permute_bf16_weights_without_scales():
    """bf16 weights (the bf16 MLP of fused_deep_moe) permute the same way; no scales, none back."""
    w13 = torch.randn(2, 256, 8).bfloat16()
    w1, w1_scale = permute_gmm1_weight(w13, None)
    assert w1_scale is None and w1.dtype == torch.bfloat16
    assert torch.equal(w1, permute_gmm1_weight(w13.float(), None)[0].bfloat16())


def test_modes_accept_upstream_values():
    """quant_mode 0 and 1 (the weights decide the math), both FuseModes, as ints or members."""
    for quant_mode in (0, 1):
        assert fused.check_modes(quant_mode, 1) is FuseMode.FUSED_DEEP_MOE
        assert fused.check_modes(quant_mode, FuseMode.DISPATCH_FFN_COMBINE) is FuseMode.DISPATCH_FFN_COMBINE
    for quant_mode, fuse_mode, pattern in (
        (2, 1, "quant_mode.*got 2"),
        (True, 1, "quant_mode.*got True"),
        (1, 3, "fuse_mode.*got 3"),
        (1, True, "fuse_mode.*got True"),
    ):
        with pytest.raises(ValueError, match=pattern):
            fused.check_modes(quant_mode, fuse_mode)


def test_weight_layouts_and_scale_bits():
    """FUSED_DEEP_MOE takes gmm2 [L, H, I] (a @ W2[e].T), DISPATCH_FFN_COMBINE [L, I, H] with gmm1 in
    [gate | up] order and int64 bit patterns of float32 scales; all end in one compute layout."""
    gen = torch.Generator().manual_seed(3)
    w13, w13_scale, w2, w2_scale = make_weights(gen, 2, 128, 128)  # I == H: only the values tell
    w1, w1_scale = permute_gmm1_weight(w13, w13_scale)
    names = ("w1", "w1_scale", "w2", "w2_scale")
    fused_layout = fused.check_expert_weights(
        w1,
        w1_scale,
        w2.transpose(1, 2).contiguous(),
        w2_scale,
        128,
        "x",
        w1.device,
        layout=fused.FUSED_DEEP_MOE_LAYOUT,
        names=names,
    )
    bits = (w13_scale.view(torch.int32).to(torch.int64), w2_scale.view(torch.int32).to(torch.int64))
    ffn = fused.check_expert_weights(
        w13.transpose(1, 2).contiguous(),
        bits[0],
        w2,
        bits[1],
        128,
        "x",
        w1.device,
        layout=fused.DISPATCH_FFN_COMBINE_LAYOUT,
        names=names,
    )
    assert torch.equal(fused_layout.w2, w2) and torch.equal(ffn.w2, w2)
    assert torch.equal(ffn.w1_scale, w13_scale) and torch.equal(ffn.w2_scale, w2_scale)
    # Both give the same MLP, and it is the reference's (gmm2 used as [out, in]).
    xq = torch.randint(-127, 128, (5, 128), generator=gen, dtype=torch.int8)
    x_scale = torch.rand(5, generator=gen) / 100
    outs = []
    for weights in (fused_layout, ffn):
        out = torch.zeros(5, 128, dtype=torch.bfloat16)
        fused.swiglu_mlp_rows(xq, x_scale, [3, 2], weights, out)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    for row in range(5):
        e = 0 if row < 3 else 1
        y, tol = ref_expert_row(xq[row], x_scale[row].item(), w13[e], w13_scale[e], w2[e], w2_scale[e])
        assert_bf16_matches(outs[0][row], y, tol, f"row {row}")
    with pytest.raises(ValueError, match="32 bits"):
        fused.check_expert_weights(
            w13.transpose(1, 2).contiguous(),
            bits[0] + 2**33,
            w2,
            bits[1],
            128,
            "x",
            w1.device,
            layout=fused.DISPATCH_FFN_COMBINE_LAYOUT,
            names=names,
        )


# ----------------------------------------------------------------------------- quantization


def test_fused_weights_cache_follows_the_weights():
    """fused_weights checks each weight set once; an in-place change, a `.data` swap or another mode
    redoes it, and DISPATCH_FFN_COMBINE takes int8 weights only."""
    generator = torch.Generator().manual_seed(0)
    num_local, hidden, inter = 2, 32, 64
    w1 = torch.randint(-127, 128, (num_local, hidden, 2 * inter), generator=generator, dtype=torch.int8)
    w2 = torch.randint(-127, 128, (num_local, hidden, inter), generator=generator, dtype=torch.int8)
    s1, s2 = torch.rand(num_local, 2 * inter, generator=generator), torch.rand(num_local, hidden, generator=generator)
    x = torch.zeros(1, hidden, dtype=torch.bfloat16)

    def check(mode=FuseMode.FUSED_DEEP_MOE, gmm2=w2):
        return fused.fused_weights(w1, s1, gmm2, s2, x, num_local, "a test", mode)

    first = check()
    assert torch.equal(first.w2, w2.transpose(1, 2)) and check().w2 is first.w2  # checked once
    w2.data = torch.randint(-127, 128, w2.shape, generator=generator, dtype=torch.int8)
    swapped = check()
    assert swapped.w2 is not first.w2 and torch.equal(swapped.w2, w2.transpose(1, 2))
    w2.add_(1)
    assert torch.equal(check().w2, w2.transpose(1, 2))
    plain = check(FuseMode.DISPATCH_FFN_COMBINE, w2.transpose(1, 2).contiguous())  # [L, I, H] as given
    assert torch.equal(plain.w2, w2.transpose(1, 2)) and not plain.tiled_gmm1
    with pytest.raises(ValueError, match="DISPATCH_FFN_COMBINE needs int8 weights"):
        fused.fused_weights(w1.bfloat16(), s1, w2.bfloat16(), s2, x, num_local, "a test", FuseMode.DISPATCH_FFN_COMBINE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_properties_and_reference(dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 333, generator=gen) * torch.logspace(-3, 3, 9)[:, None]
    x[3] = 0  # zero row
    x[4] = 0
    x[4, 17] = -2.5  # single non-zero element -> q = -127 there
    x = x.to(dtype)
    q, scale = quantize_per_token_int8(x)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (9,)
    assert int(q.abs().max()) <= 127

    deq = q.double() * scale.double()[:, None]
    assert torch.isfinite(deq).all()
    # Spec bound |deq - x| <= scale/2; the relative 2e-5 slack covers float32 rounding
    # of x / scale (<= 127 * 2^-24) and of scale itself.
    assert ((deq - x.double()).abs() <= scale.double()[:, None] * (0.5 + 2e-5)).all()

    assert scale[3] == 0 and not q[3].any() and not deq[3].any()
    assert q[4, 17] == -127 and q[4].abs().sum() == 127

    for t in range(x.shape[0]):
        # Against the exact quotient: equal except within float32 rounding of a tie.
        ref_q, ref_scale, amb = ref_quantize_row(x[t], 1e-5)
        assert scale[t].item() == ref_scale
        diff = (q[t].double() - ref_q).abs()
        assert (diff[~amb] == 0).all() and (diff[amb] <= 1).all()
        # Against the float32 quotient: bit-exact.
        ref_q32, _, _ = ref_quantize_row(x[t], 0.0, quotient_in_float32=True)
        assert torch.equal(q[t].double(), ref_q32)
        # Each row's largest element maps to +-127.
        if ref_scale > 0:
            assert int(q[t].abs().max()) == 127


def test_quantize_empty_nonfinite_and_meta():
    q, scale = quantize_per_token_int8(torch.zeros(0, 16, dtype=torch.bfloat16))
    assert q.shape == (0, 16) and scale.shape == (0,)
    x = torch.ones(3, 4)
    x[1, 2] = float("inf")
    x[2, 0] = float("nan")
    _, scale = quantize_per_token_int8(x)
    assert scale[0] == 1 / 127 and scale[1] == float("inf") and scale[2].isnan()
    q, scale = quantize_per_token_int8(torch.empty(5, 7, dtype=torch.float16, device="meta"))
    assert q.device.type == "meta" and q.dtype == torch.int8 and scale.shape == (5,)


def test_quantize_errors():
    with pytest.raises(TypeError, match="x.*float32 or torch.bfloat16 or torch.float16.*float64"):
        quantize_per_token_int8(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="x.*int8"):
        quantize_per_token_int8(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"x.*2-D.*\[6\]"):
        quantize_per_token_int8(torch.zeros(6))
    with pytest.raises(ValueError, match=r"x.*H >= 1.*\(2, 0\)"):
        quantize_per_token_int8(torch.zeros(2, 0))
    with pytest.raises(TypeError, match="x.*Tensor.*list"):
        quantize_per_token_int8([[1.0]])


# ----------------------------------------------------------------------------- grouped MLP


def _run_grouped_case(gen, num_experts, inter, hidden, counts, padding, as_tensor):
    w13, w13_scale, w2, w2_scale = make_weights(gen, num_experts, hidden, inter)
    w1, w1_scale = permute_gmm1_weight(w13, w13_scale)
    num_rows = sum(counts) + padding
    xq = torch.randint(-127, 128, (num_rows, hidden), generator=gen, dtype=torch.int8)
    xq[0, :3] = -128  # the int8 minimum is a legal input even though our quantizer never emits it
    x_scale = (0.5 + torch.rand(num_rows, generator=gen)) * 0.01
    if num_rows > 1:
        xq[1] = 0  # an all-zero row, as quantize_per_token_int8 emits it
        x_scale[1] = 0
    rows = torch.tensor(counts, dtype=torch.int64) if as_tensor else counts
    out = grouped_swiglu_mlp_int8(xq, x_scale, rows, w1, w1_scale, w2, w2_scale)
    assert out.shape == (num_rows, hidden) and out.dtype == torch.bfloat16

    expert_of_row = [e for e, c in enumerate(counts) for _ in range(c)]
    for row, e in enumerate(expert_of_row):
        y, tol = ref_expert_row(xq[row], x_scale[row].item(), w13[e], w13_scale[e], w2[e], w2_scale[e])
        assert_bf16_matches(out[row], y, tol, f"row {row} (expert {e})")
    assert not out[len(expert_of_row) :].any(), "padding rows past the counts must be zero"
    if num_rows > 1 and counts[0] > 1:
        assert not out[1].any()


@pytest.mark.parametrize("hidden", [128, 200])
@pytest.mark.parametrize("inter", [64, 192])
@pytest.mark.parametrize("num_experts", [1, 3])
def test_grouped_mlp_matches_reference(num_experts, inter, hidden):
    gen = torch.Generator().manual_seed(1000 * num_experts + 10 * inter + hidden)
    counts = [11] if num_experts == 1 else [5, 0, 9]  # uneven, one expert without rows
    _run_grouped_case(gen, num_experts, inter, hidden, counts, padding=3, as_tensor=(hidden == 200))


@pytest.mark.parametrize("path", ["int_mm", "float32"])
def test_grouped_mlp_large_hidden_exact_accumulation(monkeypatch, path):
    # H = 2100 > 1024: a plain float32 GEMM over int8 values could round partial sums.
    if path == "float32":
        monkeypatch.setattr(fused, "cpu_int_mm_is_exact", lambda: False)
    elif not fused.cpu_int_mm_is_exact():
        pytest.skip("torch._int_mm is not exact on this CPU; the float32 path is used")
    gen = torch.Generator().manual_seed(7)
    _run_grouped_case(gen, 2, 128, 2100, [4, 3], padding=1, as_tensor=False)


@pytest.mark.parametrize("k", [2100, 140_000])
def test_int8_matmul_paths_are_exact(monkeypatch, k):
    gen = torch.Generator().manual_seed(k)
    a = torch.randint(-128, 128, (3, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (k, 5), generator=gen, dtype=torch.int8)
    a[0], b[:, 0] = 127, 127  # partial sums 16129 * j: odd, past 2^24 (float32) for j > 1040
    a[1], b[:, 1] = -128, -128  # 16384 * 140000 > 2^31: past int32 for the larger k
    exact = (a.double() @ b.double()).float()  # float64 holds these sums exactly
    results = {"float32": None}
    if fused.cpu_int_mm_is_exact():
        results["int_mm"] = fused.int8_matmul_exact(a, b)
    monkeypatch.setattr(fused, "cpu_int_mm_is_exact", lambda: False)
    results["float32"] = fused.int8_matmul_exact(a, b)
    for name, got in results.items():
        assert torch.equal(got, exact), name


def test_grouped_mlp_paths_agree_bitwise(monkeypatch):
    if not fused.cpu_int_mm_is_exact():
        pytest.skip("torch._int_mm is not exact on this CPU")
    gen = torch.Generator().manual_seed(11)
    w13, w13_scale, w2, w2_scale = make_weights(gen, 2, 1500, 64)
    w1, w1_scale = permute_gmm1_weight(w13, w13_scale)
    xq = torch.randint(-127, 128, (9, 1500), generator=gen, dtype=torch.int8)
    x_scale = torch.rand(9, generator=gen) * 0.01
    args = (xq, x_scale, [5, 3], w1, w1_scale, w2, w2_scale)
    via_int_mm = grouped_swiglu_mlp_int8(*args)
    monkeypatch.setattr(fused, "cpu_int_mm_is_exact", lambda: False)
    assert torch.equal(grouped_swiglu_mlp_int8(*args), via_int_mm)


def test_single_rank_moe_matches_per_token_reference():
    """quantize -> expert-major expansion (what dispatch does) -> grouped MLP -> combine."""
    gen = torch.Generator().manual_seed(5)
    num_tokens, topk, num_experts, hidden, inter = 13, 3, 4, 136, 128
    w13, w13_scale, w2, w2_scale = make_weights(gen, num_experts, hidden, inter)
    w1, w1_scale = permute_gmm1_weight(w13, w13_scale)
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
    x[2] = 0
    topk_idx = torch.stack([torch.randperm(num_experts, generator=gen)[:topk] for _ in range(num_tokens)])
    topk_idx[0, 1] = -1
    topk_idx[4] = -1  # a token with no expert gets zeros
    topk_weights = torch.rand(num_tokens, topk, generator=gen)

    xq, x_scale = quantize_per_token_int8(x)
    src = [(t, k) for e in range(num_experts) for t in range(num_tokens) for k in range(topk) if topk_idx[t, k] == e]
    counts = [int((topk_idx == e).sum()) for e in range(num_experts)]
    tok = torch.tensor([t for t, _ in src] + [0, 0])  # two padding rows with real data in them
    y = grouped_swiglu_mlp_int8(xq[tok], x_scale[tok], counts, w1, w1_scale, w2, w2_scale)
    combined = torch.zeros(num_tokens, hidden, dtype=torch.float32)
    for row, (t, k) in enumerate(src):
        combined[t] += topk_weights[t, k] * y[row].float()
    out = combined.to(torch.bfloat16)

    for t in range(num_tokens):
        ref, tol = ref_moe_token(x[t], topk_idx[t], topk_weights[t], w13, w13_scale, w2, w2_scale)
        assert_bf16_matches(out[t], ref, tol, f"token {t}")
    assert not out[4].any() and not out[2].any()


def test_grouped_mlp_empty_and_all_padding():
    w1 = torch.zeros(2, 16, 128, dtype=torch.int8)
    args = (torch.ones(2, 128), w1.new_zeros(2, 64, 16), torch.ones(2, 16))
    out = grouped_swiglu_mlp_int8(torch.zeros(0, 16, dtype=torch.int8), torch.zeros(0), [0, 0], w1, *args)
    assert out.shape == (0, 16)
    out = grouped_swiglu_mlp_int8(torch.ones(4, 16, dtype=torch.int8), torch.ones(4), [0, 0], w1, *args)
    assert out.dtype == torch.bfloat16 and not out.any()


def _valid_args():
    num_experts, hidden, inter, rows = 2, 8, 64, 5
    return dict(
        xq=torch.zeros(rows, hidden, dtype=torch.int8),
        x_scale=torch.zeros(rows),
        rows_per_expert=[2, 3],
        w1=torch.zeros(num_experts, hidden, 2 * inter, dtype=torch.int8),
        w1_scale=torch.zeros(num_experts, 2 * inter),
        w2=torch.zeros(num_experts, inter, hidden, dtype=torch.int8),
        w2_scale=torch.zeros(num_experts, hidden),
    )


@pytest.mark.parametrize(
    "name,value,exc,pattern",
    [
        ("xq", torch.zeros(5, 8), TypeError, r"xq.*int8.*float32"),
        ("xq", torch.zeros(5, 9, dtype=torch.int8), ValueError, r"w1.*\[2, 9, 128\].*\[2, 8, 128\]"),
        ("xq", torch.zeros(5, 0, dtype=torch.int8), ValueError, r"xq.*H >= 1"),
        ("xq", [[0]], TypeError, r"xq.*Tensor.*list"),
        ("x_scale", torch.zeros(4), ValueError, r"x_scale.*\[5\].*\[4\]"),
        ("x_scale", torch.zeros(5, dtype=torch.bfloat16), TypeError, r"x_scale.*float32.*bfloat16"),
        ("w1", torch.zeros(2, 8, 192, dtype=torch.int8), ValueError, r"w1\.shape\[2\].*multiple of 128.*192"),
        ("w1", torch.zeros(2, 8, 128, dtype=torch.uint8), TypeError, r"w1.*int8.*uint8"),
        ("w1", torch.zeros(0, 8, 128, dtype=torch.int8), ValueError, r"w1.*L >= 1"),
        ("w1", torch.zeros(8, 128, dtype=torch.int8), ValueError, r"w1.*3-D"),
        ("w1_scale", torch.zeros(3, 128), ValueError, r"w1_scale.*\[2, 128\].*\[3, 128\]"),
        ("w2", torch.zeros(3, 64, 8, dtype=torch.int8), ValueError, r"w2.*\[2, 64, 8\].*\[3, 64, 8\]"),
        ("w2", torch.zeros(2, 128, 8, dtype=torch.int8), ValueError, r"w2.*\[2, 64, 8\]"),
        ("w2_scale", torch.zeros(2, 9), ValueError, r"w2_scale.*\[2, 8\].*\[2, 9\]"),
        ("rows_per_expert", [5], ValueError, r"rows_per_expert.*2 entries.*1 entries"),
        ("rows_per_expert", [3, 3], ValueError, r"rows_per_expert.*at most 5.*sum 6"),
        ("rows_per_expert", [-1, 3], ValueError, r"rows_per_expert.*non-negative"),
        ("rows_per_expert", [1.0, 3], TypeError, r"rows_per_expert.*ints.*float"),
        ("rows_per_expert", [True, 3], TypeError, r"rows_per_expert.*ints"),
        ("rows_per_expert", torch.tensor([2.0, 3.0]), TypeError, r"rows_per_expert.*int64.*float32"),
        ("rows_per_expert", torch.tensor([[2, 3]]), ValueError, r"rows_per_expert.*1-D"),
        ("rows_per_expert", 5, TypeError, r"rows_per_expert.*list of ints.*int"),
        ("w2_scale", torch.zeros(2, 8, device="meta"), ValueError, r"w2_scale.*device cpu.*meta"),
    ],
)
def test_grouped_mlp_errors(name, value, exc, pattern):
    args = _valid_args()
    args[name] = value
    with pytest.raises(exc, match=pattern):
        grouped_swiglu_mlp_int8(**args)


def test_grouped_mlp_valid_args_pass():
    out = grouped_swiglu_mlp_int8(**_valid_args())
    assert out.shape == (5, 8) and not out.any()
