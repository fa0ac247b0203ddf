"""The combine reduction (deep_ep.ops.weighted_reduce over deep_ep_cpp.combine_reduce), bit for bit
against its definition: out[t] = sum over columns c in order of weights[t, c] * row(t, c), each product
and each sum an operation in the sums' dtype (float64 for normal mode, float32 for low-latency mode),
rounded once at the end (16-bit outputs through float32).

    python -m pytest tests/python/deepep/test_reduction.py

The native kernel has a blocked path for bf16, fp16 and float32 rows (32 float64 or 64 float32 columns
at a time on AVX-512 CPUs, 16 or 32 on AVX2 ones; float64 sums with a fused multiply-add, whose product
is exact there) and a whole-row path for the rest; the widths below take both on either instruction
set, their tails included (the CPU running the test picks the set). The reference is a
plain loop of torch ops in the sums' dtype, in column order; the cancelling values make a sum taken
in another order, or rounded differently (a fused multiply-add of float32 sums, say), come out
different.
"""

from __future__ import annotations

import platform

import pytest
import torch

import deep_ep_cpp
from deep_ep import ops

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def special_values(shape, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Random values with some zeros, negative zeros, tiny and huge magnitudes, infinities and NaNs."""
    x = torch.randn(shape, generator=generator) * torch.exp2(torch.randint(-20, 20, shape, generator=generator))
    pick = torch.randint(0, 40, shape, generator=generator)
    x = torch.where(pick == 0, torch.zeros(()), x)
    x = torch.where(pick == 1, torch.tensor(-0.0), x)
    x = torch.where(pick == 2, torch.tensor(float("inf")), x)
    x = torch.where(pick == 3, torch.tensor(float("nan")), x)
    x = torch.where(pick == 4, torch.tensor(1e-40), x)  # subnormal in float32, flushed in 16-bit types
    return x.to(dtype)


def cancelling_values(shape, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Huge values of both signs next to small ones, so that a sum in another order (or with another
    rounding) ends up with another value: (2^60 - 2^60) + 1 = 1 but (2^60 + 1) - 2^60 = 0 in float64."""
    choices = torch.tensor([2.0**60, -(2.0**60), 1.0, -1.0, 0.375, 3.0])
    return choices[torch.randint(0, len(choices), shape, generator=generator)].to(dtype)


def reference(sources, src_rank, src_row, weights, biases, out_dtype, sums=torch.float64) -> torch.Tensor:
    tokens, columns = src_rank.shape
    hidden = sources[0].shape[1]
    acc = torch.zeros(tokens, hidden, dtype=sums)
    for t in range(tokens):
        for c in range(columns):
            s = int(src_rank[t, c])
            if s >= 0:
                acc[t] = acc[t] + weights[t, c].to(sums) * sources[s][int(src_row[t, c])].to(sums)
    for bias in biases:
        acc = acc + bias.to(sums)
    return acc.float().to(out_dtype) if out_dtype != torch.float64 else acc


@pytest.mark.parametrize("sums", [torch.float64, torch.float32])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [2048, 72, 40, 32, 7])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("values", [special_values, cancelling_values])
def test_native_reduction_is_the_sum_in_order(
    sums: torch.dtype, dtype: torch.dtype, hidden: int, with_bias: bool, values
) -> None:
    generator = torch.Generator().manual_seed(hidden * 7 + len(str(dtype)))
    tokens, columns = 9, 8
    sources = [values((rows, hidden), dtype, generator) for rows in (13, 5, 20)]
    src_rank = torch.randint(0, len(sources), (tokens, columns), generator=generator, dtype=torch.int32)
    src_rank[torch.rand(tokens, columns, generator=generator) < 0.2] = -1  # selections without a row
    src_rank[0] = -1  # a token with no row at all: zeros (plus bias)
    limits = torch.tensor([s.shape[0] for s in sources])[src_rank.clamp_min(0).long()]
    src_row = (torch.rand(tokens, columns, generator=generator) * limits).long()
    weights = torch.tensor([1.0, -1.0, 0.5])[torch.randint(0, 3, (tokens, columns), generator=generator)]
    if values is special_values:
        weights = torch.rand(tokens, columns, generator=generator) * 2 - 1
    biases = [values((tokens, hidden), dtype, generator)] if with_bias else []
    expected = reference(sources, src_rank, src_row, weights, biases, dtype, sums)

    out = torch.empty(tokens, hidden, dtype=dtype)
    byte_rows = [s.view(torch.uint8).view(s.shape[0], -1) for s in sources]
    ops.weighted_reduce(out, byte_rows, dtype, src_rank, src_row, weights, biases, threads=1, sums=sums)
    # NaN where the definition gives NaN (its sign and payload are not specified), every other value
    # the same bits (-0.0 differs from 0.0).
    assert torch.equal(out.isnan(), expected.isnan())
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    real = ~expected.isnan()
    assert torch.equal(out.view(bits)[real], expected.view(bits)[real])


@pytest.mark.parametrize("sums", [torch.float64, torch.float32])
@pytest.mark.parametrize("hidden", [40, 7])
def test_fp16_nan_sums_are_stored_canonical(hidden: int, sums: torch.dtype) -> None:
    """A NaN sum is stored in fp16 as sign | 0x7E00, whether the hardware conversion writes it (8
    columns at a time, CPUs with AVX2 and F16C) or float_to_f16 (the tail, other CPUs): the same bits on every
    path, so one host and several hosts agree on them, too."""
    payloads = torch.tensor([0x7C01, 0x7DFF, 0x7E00, 0x7FFF, 0xFC01, 0xFE01, 0x3C00], dtype=torch.int32)
    pattern = payloads[torch.arange(hidden) % payloads.numel()]
    row = pattern.to(torch.int16).view(torch.float16)
    out = torch.empty(1, hidden, dtype=torch.float16)
    source = row.view(1, hidden).view(torch.uint8)
    src_rank, src_row = torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int64)
    ops.weighted_reduce(out, [source], torch.float16, src_rank, src_row, torch.ones(1, 1), threads=1, sums=sums)
    bits = out.view(torch.int16).int() & 0xFFFF
    expected = torch.where(row.isnan(), (pattern & 0x8000) | 0x7E00, 0x3C00)
    assert torch.equal(bits[0], expected)


def test_float32_sums_take_no_float64() -> None:
    """float64 rows or outputs would lose bits in float32 sums: refused before anything is written."""
    src_rank, src_row = torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int64)
    rows64 = torch.ones(1, 8, dtype=torch.float64).view(torch.uint8)
    with pytest.raises(ValueError, match="float32 of 16/32-bit rows and outputs"):
        ops.weighted_reduce(
            torch.empty(1, 8), [rows64], torch.float64, src_rank, src_row, torch.ones(1, 1), sums=torch.float32
        )
    out64 = torch.full((1, 8), 7.0, dtype=torch.float64)
    rows32 = torch.ones(1, 8).view(torch.uint8)
    with pytest.raises(ValueError, match="float32 of 16/32-bit rows and outputs"):
        ops.weighted_reduce(out64, [rows32], torch.float32, src_rank, src_row, torch.ones(1, 1), sums=torch.float32)
    assert bool((out64 == 7.0).all())


def cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo (Linux on x86-64), or None elsewhere."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def test_vector_isa_follows_the_cpu() -> None:
    """The vector path the kernels report (and the bench prints) is the widest the CPU has: these
    tests then ran that path. (GCC builds on x86-64, as pip's and CI's are.)"""
    flags = cpu_flags()
    if flags is None or platform.machine() != "x86_64":
        pytest.skip("needs /proc/cpuinfo of an x86-64 CPU")
    if {"avx512f", "avx512bw", "avx512vl", "fma", "f16c"} <= flags:
        expected = "avx512"
    elif {"avx2", "fma", "f16c"} <= flags:
        expected = "avx2"
    else:
        expected = "portable"
    assert deep_ep_cpp.vector_isa() == expected
