"""The native per-token int8 quantizer, bit for bit against its float32 definition: scale =
max|x| / 127 and q = round half to even of x / scale, both in float32 (the multi-rank tests compare
with the float64 reference and allow one step). Values whose quotient lies on or next to a
half-integer are built on purpose: there a multiply by 1 / scale in place of the division rounds
the other way (random rows hit such values about once in 16000; a kernel that multiplied fails
this file), and so can any change to the order of the operations."""

from __future__ import annotations

import pytest
import torch

from deep_ep import ops


def float32_definition(x: torch.Tensor):
    """(q int8 [T, H], scale float32 [T]) with IEEE float32 division, as the kernel defines them."""
    xf = x.float()
    scale = xf.abs().amax(1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / safe.unsqueeze(1)).clamp(-127, 127)
    return torch.where(scale.unsqueeze(1) > 0, q, torch.zeros_like(q)).to(torch.int8), scale


def near_half_rows(amax: float, hidden: int) -> torch.Tensor:
    """float32 rows of max |x| = amax whose other values sit on, and one float32 step either side of,
    (k + 0.5) * scale for k = -127..126, where a multiply by 1 / scale may round the other way."""
    scale = torch.tensor(amax, dtype=torch.float32) / 127.0
    halves = (torch.arange(-127, 127, dtype=torch.float32) + 0.5) * scale
    values = torch.cat([halves, torch.nextafter(halves, halves + 1), torch.nextafter(halves, halves - 1)])
    rows = []
    for start in range(0, values.numel(), hidden - 1):
        chunk = values[start : start + hidden - 1]
        row = torch.full((hidden,), 0.0, dtype=torch.float32)
        row[0] = amax
        row[1 : 1 + chunk.numel()] = chunk
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("amax", [1.0, 3.0, 0.1, 1e-30, 6e4])
def test_near_half_quotients_round_as_division(amax):
    x = near_half_rows(amax, 256)
    q, scale = ops.quantize_int8(x, 1)
    q_ref, scale_ref = float32_definition(x)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q, q_ref), (q.int() - q_ref.int()).abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("hidden", [2048, 7, 40])
def test_random_rows_match_the_definition(dtype, hidden):
    generator = torch.Generator().manual_seed(hidden)
    x = (torch.randn(300, hidden, generator=generator) * torch.rand(300, 1, generator=generator) * 10).to(dtype)
    x[3] = 0  # an all-zero row: scale 0, q 0
    q, scale = ops.quantize_int8(x, 1)
    q_ref, scale_ref = float32_definition(x)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q, q_ref)


@pytest.mark.parametrize("repeats", [1, 10])
def test_tiny_scale_divides(repeats):
    """A scale whose inverse overflows float32 (max |x| a float32 subnormal) still gives x / scale,
    in the loop (4 values) and in the vector blocks of 32 (40 values)."""
    x = torch.tensor([[1e-40, -5e-41, 2e-41, 0.0]], dtype=torch.float32).repeat(1, repeats)
    q, scale = ops.quantize_int8(x, 1)
    q_ref, scale_ref = float32_definition(x)
    assert torch.isinf(1.0 / scale).all()  # no multiply by the inverse could give these
    assert torch.equal(scale, scale_ref) and torch.equal(q, q_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("repeats", [1, 10])
def test_non_finite_rows_stay_visible(dtype, repeats):
    """A NaN gives the row scale NaN and an inf scale inf (torch's float32 division has no defined
    int8 for NaN, so q is pinned here): NaN quotients become -127, finite values over inf 0; in the
    loop (4 values) and in the vector blocks of 32 (40 values)."""
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[1.0, nan, -2.0, 3.0], [1.0, inf, -2.0, 0.0], [-inf, 1.0, -1.0, 0.5]]).to(dtype)
    q, scale = ops.quantize_int8(x.repeat(1, repeats), 1)
    assert torch.isnan(scale[0]) and scale[1:].tolist() == [inf, inf]
    assert q.tolist() == [row * repeats for row in [[-127, -127, -127, -127], [0, -127, 0, 0], [-127, 0, 0, 0]]]


def test_fp16_nan_payloads_widen_as_their_bits():
    """fp16 rows widen to float32 keeping a NaN's payload as it is (a signalling NaN stays signalling),
    so the largest magnitude bits, and the NaN scale, are the same with the hardware conversion (which
    quiets) as without. 16 columns: two blocks of the hardware path."""
    halves = torch.tensor(
        [
            [0x3C00, 0x7DFF, 0x7E00, 0x4000] * 4,  # signalling NaN, payload 0x1FF; quiet NaN 0x7E00
            [0x3C00, 0x7DFF, 0x7C01, 0xC000] * 4,  # two signalling NaNs
            [0x3C00, 0x7C00, 0x0001, 0x8001] * 4,  # inf and subnormals
        ],
        dtype=torch.int32,
    ).to(torch.int16)
    q, scale = ops.quantize_int8(halves.view(torch.float16), 1)
    # Widened, 0x7DFF is 0x7FBFE000 (quieted it would be 0x7FFFE000) and 0x7E00 is 0x7FC00000, which
    # wins; the division by 127 quiets the winner: 0x7FC00000 and 0x7FFFE000.
    assert [v & 0xFFFFFFFF for v in scale.view(torch.int32).tolist()] == [0x7FC00000, 0x7FFFE000, 0x7F800000]
    assert q.tolist() == [[-127] * 16, [-127] * 16, [0, -127, 0, 0] * 4]
