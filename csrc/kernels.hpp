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
// entries with src_rank < 0 skipped) + bias0[t] + bias1[t], each product added into a sum of
// `sums` (Float64 or Float32), then rounded once to out_dtype (16-bit types through float32).
// Float64: every product of a float32 weight and a 16/32-bit value is exact there, so sums that
// are split differently (per node, in internode combine) round to the same output in all but
// vanishingly rare cases; source s holds rows of src_dtypes[s] (Float64 for partial sums, which
// only these sums take). Float32: each product and each add rounds to float32, as a float32 loop
// over c does; 16/32-bit sources and outputs only. Either way reruns give the same bits.
struct Bias {
    const void* data = nullptr;  // [tokens, hidden] or null
    Dtype dtype = Dtype::Float32;
};

void combine_reduce(void* out, Dtype out_dtype, std::size_t tokens, std::size_t columns, std::size_t hidden,
                    const std::vector<const std::uint8_t*>& srcs, const std::vector<Dtype>& src_dtypes,
                    const std::int32_t* src_rank, const std::int64_t* src_row, const float* weights,
                    const Bias& bias0, const Bias& bias1, Dtype sums, int num_threads);

}  // namespace deep_ep
