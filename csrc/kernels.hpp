// Row kernels of the CPU transport: copies, int8 quantization and the weighted
// combine reduction. Tensors arrive as raw pointers plus sizes; the callers in
// module.cpp check every index against the sizes before any byte moves.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace deep_ep {

enum class Dtype : int { Float32 = 0, BFloat16 = 1, Float16 = 2, Float64 = 3 };

std::size_t dtype_size(Dtype dtype);

// dst[dst_row[i]] = src[src_rank[i]][src_row[i]] for i < n, row_bytes each.
void copy_rows(std::uint8_t* dst, std::size_t dst_stride, const std::vector<const std::uint8_t*>& srcs,
               std::size_t src_stride, const std::int32_t* src_rank, const std::int64_t* src_row,
               const std::int64_t* dst_row, std::size_t n, std::size_t row_bytes, int num_threads);

// dst[0, nbytes) = src[0, nbytes) on up to num_threads threads (the regions must not overlap).
void copy_bytes(std::uint8_t* dst, const std::uint8_t* src, std::size_t nbytes, int num_threads);

// Per-row int8: scale = max|x| / 127, q = round_half_even(x / scale); an all-zero
// row gets scale 0 and q 0 (dequantizes to zeros, no NaN).
void quantize_int8(const void* x, Dtype dtype, std::size_t rows, std::size_t hidden, std::int8_t* q,
                   float* scales, int num_threads);

// One row of quantize_int8: returns the scale, writes q [hidden]; scratch holds hidden floats.
float quantize_row(const std::uint8_t* row, Dtype dtype, std::size_t hidden, float* scratch, std::int8_t* q);

// out[t] = sum over c of weights[t, c] * srcs[src_rank[t, c]][src_row[t, c]] (c ascending,
// entries with src_rank < 0 skipped) + bias0[t] + bias1[t], accumulated in float64: every
// product of a float32 weight and a 16/32-bit value is exact there, so sums that are split
// differently (per node, in internode combine) round to the same output in all but
// vanishingly rare cases. Source s holds rows of src_dtypes[s] (Float64 for partial sums).
struct Bias {
    const void* data = nullptr;  // [tokens, hidden] or null
    Dtype dtype = Dtype::Float32;
};

// One term of a reduced row: weight * row, a row of `hidden` values of `dtype`.
struct RowTerm {
    const std::uint8_t* row;
    Dtype dtype;
    double weight;
};

// out [hidden] of out_dtype = sum over terms in order of weight * row, per element in float64 (no
// fused multiply-add), rounded once (16-bit types through float32); scratch holds hidden doubles.
// The one reduction of combine, in both modes. Whole rows at a time (the sums in scratch); on
// AVX-512 CPUs, rows that are all bf16 / fp16 / float32 go 32 columns at a time with the sums in
// registers, the same operations in the same order, and fp16 outputs are rounded by the hardware
// conversions (the same bits as the software ones).
void reduce_row(const RowTerm* terms, std::size_t count, std::size_t hidden, Dtype out_dtype, std::uint8_t* out,
                double* scratch);

void combine_reduce(void* out, Dtype out_dtype, std::size_t tokens, std::size_t columns, std::size_t hidden,
                    const std::vector<const std::uint8_t*>& srcs, const std::vector<Dtype>& src_dtypes,
                    const std::int32_t* src_rank, const std::int64_t* src_row, const float* weights,
                    const Bias& bias0, const Bias& bias1, int num_threads);

}  // namespace deep_ep
