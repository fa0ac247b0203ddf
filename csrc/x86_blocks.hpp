// The vector paths of the row kernels on x86-64 CPUs with AVX-512 or AVX2 (+FMA, F16C), written with
// intrinsics: the combine reduction sums a token's rows a block of columns at a time, with the
// block's sums in registers across the rows, and the int8 quantizer rounds 32 values at a time. Each
// gives the same bits as the portable loops of kernels.cpp, which do the rest of a row (and all of it
// on other CPUs): tests/python/deepep/test_reduction.py and test_quantize.py check them.
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

// q[h] = round half to even of value h / scale, clamped to [-127, 127], for h < n: as quantize_row's
// loops compute it (the quotient correctly rounded to float32, then to an integer), for the leading
// n = hidden rounded down to 32 values of a bf16, fp16 or float32 row (any alignment); returns n (0
// for other dtypes or without AVX2). scale > 0; a NaN or inf one (of a non-finite row) gives what the
// loops give.
std::size_t quantize_blocks(const std::uint8_t* row, Dtype dtype, std::size_t hidden, float scale, std::int8_t* q);

// The widest instruction set these vector paths use on this CPU: "avx512" (the reduction; the rest
// takes AVX2), "avx2", or "portable" (the loops of kernels.cpp alone: another CPU or compiler).
const char* vector_isa();

}  // namespace deep_ep
