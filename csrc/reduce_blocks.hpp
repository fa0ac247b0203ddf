// The combine reduction's vector path: a token's rows summed a block of columns at a time, with
// the block's sums in registers across the rows, on x86-64 CPUs with AVX-512 or AVX2 (+FMA, F16C).
// Per column it runs the same operations in the same order as the whole-row loop of kernels.cpp,
// so the results are the same bits on every CPU (tests/python/deepep/test_reduction.py).
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels.hpp"

namespace deep_ep {

// One term of a reduced row: weight * row, a row of `hidden` values of `dtype`.
struct RowTerm {
    const std::uint8_t* row;
    Dtype dtype;
    double weight;
};

// scratch[0, n) = sum over terms in order of weight * row, in the sums' type (float64: each
// product exact, only the adds round; float32: each product and each add rounded), for the
// leading n columns of whole blocks; returns n (0 when a term is float64, there are no terms, or
// the CPU has neither instruction set). The caller sums columns [n, hidden) itself.
std::size_t accumulate_blocks(const RowTerm* terms, std::size_t count, std::size_t hidden, double* scratch);
std::size_t accumulate_blocks(const RowTerm* terms, std::size_t count, std::size_t hidden, float* scratch);

// out[0, n) = sums [hidden] stored as fp16: rounded to float32, then to fp16 (both to nearest even,
// as store_row does), by the hardware conversions; a NaN becomes sign | 0x7E00, as in float_to_f16
// (the hardware would keep part of its payload). Returns n, a multiple of the vector width (0
// without AVX2 / F16C); the caller stores columns [n, hidden).
std::size_t store_f16_blocks(const double* sums, std::size_t hidden, std::uint8_t* out);
std::size_t store_f16_blocks(const float* sums, std::size_t hidden, std::uint8_t* out);

}  // namespace deep_ep
