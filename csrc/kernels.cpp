#include "kernels.hpp"

#include "bfloat16.hpp"
#include "cpu.hpp"
#include "x86_blocks.hpp"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <thread>

namespace deep_ep {

namespace {

// The fp16 <-> float32 conversions, exact and rounding to nearest even, written without branches:
// every case is computed and the right one picked by masks, so that loops over rows vectorize on
// every x86-64 level (with branches they stayed scalar: 128 x 2048 values took 307 us to widen and
// 425 us to narrow, 48 and 148 us without). Checked against the branching versions on all 2^16 and
// all 2^32 inputs. No float32 subnormal is ever an operand, so flush-to-zero modes change nothing.
inline std::uint32_t all_bits_if(bool condition) { return 0u - static_cast<std::uint32_t>(condition); }

float f16_to_float(std::uint16_t h) {
    const std::uint32_t magnitude = h & 0x7FFFu;
    const std::uint32_t exponent = magnitude >> 10;
    // exponent 0: mantissa * 2^-24, a normal float32 (or zero)
    const float small = static_cast<float>(magnitude) * 0x1p-24f;
    std::uint32_t subnormal;
    std::memcpy(&subnormal, &small, sizeof(subnormal));
    const std::uint32_t normal = (magnitude << 13) + (112u << 23);  // rebias exponent 15 -> 127
    const std::uint32_t special = 0x7F800000u | ((magnitude & 0x3FFu) << 13);  // inf, NaN (payload kept)
    const std::uint32_t is_subnormal = all_bits_if(exponent == 0), is_special = all_bits_if(exponent == 0x1F);
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    const std::uint32_t bits =
        (subnormal & is_subnormal) | (special & is_special) | (normal & ~(is_subnormal | is_special)) | sign;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}

std::uint16_t float_to_f16(float f) {
    std::uint32_t bits;
    std::memcpy(&bits, &f, sizeof(bits));
    const std::uint32_t abs = bits & 0x7FFFFFFFu;
    // Normal results: rebias exponent 127 -> 15 and round the 13 dropped bits to nearest even.
    std::uint32_t normal = abs - 0x38000000u;
    normal = (normal + 0xFFFu + ((normal >> 13) & 1u)) >> 13;
    // Subnormal results (|f| in [2^-25, 2^-14)): the mantissa with its implicit bit shifted right by
    // 14..24 bits, rounded to nearest even (the shift is clamped to [1, 31] where it is not used).
    const std::int32_t exponent = static_cast<std::int32_t>(abs >> 23);
    const std::uint32_t shift = static_cast<std::uint32_t>(std::min(31, std::max(1, 126 - exponent)));
    const std::uint32_t mantissa = (abs & 0x7FFFFFu) | 0x800000u;
    const std::uint32_t truncated = mantissa >> shift;
    const std::uint32_t rest = mantissa & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    const std::uint32_t above_half = static_cast<std::uint32_t>(rest > half);
    const std::uint32_t tie_to_even = static_cast<std::uint32_t>(rest == half) & truncated;
    const std::uint32_t subnormal = truncated + ((above_half | tie_to_even) & 1u);
    const std::uint32_t is_inf_nan = all_bits_if(abs >= 0x7F800000u);
    const std::uint32_t is_overflow = all_bits_if(abs >= 0x477FF000u) & ~is_inf_nan;  // rounds to inf
    const std::uint32_t is_zero = all_bits_if(abs < 0x33000000u);                     // rounds to 0
    const std::uint32_t is_subnormal = all_bits_if(abs < 0x38800000u) & ~is_zero;
    const std::uint32_t is_normal = ~(is_inf_nan | is_overflow | is_zero | is_subnormal);
    const std::uint32_t inf_nan = abs > 0x7F800000u ? 0x7E00u : 0x7C00u;  // NaN: the canonical quiet NaN
    const std::uint32_t value = (inf_nan & is_inf_nan) | (0x7C00u & is_overflow) | (subnormal & is_subnormal) |
                                (normal & is_normal);
    return static_cast<std::uint16_t>(((bits >> 16) & 0x8000u) | value);
}

DEEP_EP_VECTORIZED
void load_row(const std::uint8_t* row, Dtype dtype, std::size_t hidden, float* out) {
    switch (dtype) {
        case Dtype::Float64: {
            const auto* v = reinterpret_cast<const double*>(row);
            for (std::size_t h = 0; h < hidden; ++h) out[h] = static_cast<float>(v[h]);
            break;
        }
        case Dtype::Float32:
            std::memcpy(out, row, hidden * sizeof(float));
            break;
        case Dtype::BFloat16: {
            const auto* v = reinterpret_cast<const std::uint16_t*>(row);
            for (std::size_t h = 0; h < hidden; ++h) out[h] = bf16_to_float(v[h]);
            break;
        }
        case Dtype::Float16: {
            const auto* v = reinterpret_cast<const std::uint16_t*>(row);
            for (std::size_t h = 0; h < hidden; ++h) out[h] = f16_to_float(v[h]);
            break;
        }
    }
}

// out[h] = fp16 of float32 of acc[h]. A function of its own: inside store_row's switch over a byte
// pointer GCC 12 does not vectorize this loop.
template <typename Sum>
DEEP_EP_VECTORIZED void store_f16_row(const Sum* acc, std::size_t hidden, std::uint16_t* out) {
    for (std::size_t h = 0; h < hidden; ++h) out[h] = float_to_f16(static_cast<float>(acc[h]));
}

// Writes a row of sums (float64 or float32) as `dtype`: 16-bit types through float32, always the
// same bits. Float64 rows are written from float64 sums only (combine_reduce checks).
template <typename Sum>
DEEP_EP_VECTORIZED void store_row(const Sum* acc, Dtype dtype, std::size_t hidden, std::uint8_t* row) {
    switch (dtype) {
        case Dtype::Float64: {
            auto* v = reinterpret_cast<double*>(row);
            for (std::size_t h = 0; h < hidden; ++h) v[h] = static_cast<double>(acc[h]);
            break;
        }
        case Dtype::Float32: {
            auto* v = reinterpret_cast<float*>(row);
            for (std::size_t h = 0; h < hidden; ++h) v[h] = static_cast<float>(acc[h]);
            break;
        }
        case Dtype::BFloat16: {
            auto* v = reinterpret_cast<std::uint16_t*>(row);
            for (std::size_t h = 0; h < hidden; ++h) v[h] = float_to_bf16(static_cast<float>(acc[h]));
            break;
        }
        case Dtype::Float16:
            store_f16_row(acc, hidden, reinterpret_cast<std::uint16_t*>(row));
            break;
    }
}

// acc += weight * row, one element at a time in a fixed order, in the sums' type (no FMA: see the
// build flags; the vector path of x86_blocks.cpp fuses them only where that gives the same bits).
// Values widen exactly; float64 values come only with float64 sums (combine_reduce checks).
template <typename Sum>
DEEP_EP_VECTORIZED void accumulate_row(Sum* acc, const std::uint8_t* row, Dtype dtype, std::size_t hidden,
                                       Sum weight) {
    switch (dtype) {
        case Dtype::Float64: {
            const auto* v = reinterpret_cast<const double*>(row);
            for (std::size_t h = 0; h < hidden; ++h) acc[h] += weight * static_cast<Sum>(v[h]);
            break;
        }
        case Dtype::Float32: {
            const auto* v = reinterpret_cast<const float*>(row);
            for (std::size_t h = 0; h < hidden; ++h) acc[h] += weight * static_cast<Sum>(v[h]);
            break;
        }
        case Dtype::BFloat16: {
            const auto* v = reinterpret_cast<const std::uint16_t*>(row);
            for (std::size_t h = 0; h < hidden; ++h) acc[h] += weight * static_cast<Sum>(bf16_to_float(v[h]));
            break;
        }
        case Dtype::Float16: {
            const auto* v = reinterpret_cast<const std::uint16_t*>(row);
            for (std::size_t h = 0; h < hidden; ++h) acc[h] += weight * static_cast<Sum>(f16_to_float(v[h]));
            break;
        }
    }
}

}  // namespace

std::size_t dtype_size(Dtype dtype) {
    switch (dtype) {
        case Dtype::Float64:
            return 8;
        case Dtype::Float32:
            return 4;
        default:
            return 2;
    }
}

namespace {

// The largest |x| of `count` floating-point values, as the bit pattern of their width (Int) with the
// sign cleared: ordered like the magnitudes, NaN above inf. Signed compares vectorize on every
// x86-64 level.
template <typename Int>
inline Int max_magnitude_bits(const void* values, std::size_t count) {
    const auto* bytes = static_cast<const std::uint8_t*>(values);
    Int best = 0;
    for (std::size_t h = 0; h < count; ++h) {
        Int bits;
        std::memcpy(&bits, bytes + h * sizeof(Int), sizeof(Int));
        bits &= std::numeric_limits<Int>::max();
        best = bits > best ? bits : best;
    }
    return best;
}

// (v + 1.5 * 2^23) - 1.5 * 2^23 rounds |v| <= 2^22 to nearest even: std::nearbyint, vectorizable.
inline std::int8_t round_to_int8(float quotient) {
    constexpr float kRound = 12582912.0f;
    const float v = (quotient + kRound) - kRound;
    return static_cast<std::int8_t>(std::min(127.0f, std::max(-127.0f, v)));
}

}  // namespace

DEEP_EP_VECTORIZED
float quantize_row(const std::uint8_t* row, Dtype dtype, std::size_t hidden, float* scratch, std::int8_t* q) {
    // max |x| over the bits of |x| (ordered like the values, NaN above inf): a row holding a NaN gets
    // scale NaN and one holding an inf scale inf, so non-finite input stays visible after
    // dequantization instead of turning into plausible numbers (as torch's amax does on NPU).
    // bf16 and fp16 rows are read as their 16-bit patterns, without a float32 copy: the same order
    // gives the same max, and each value widens as load_row would widen it (bf16, 128 x 2048 on one
    // core, back to back: 57.5-58.1 us with the copy, 50.7-51.4 us without; fp16:
    // docs/low_latency_data_path.md).
    // Aligned float32 rows are read in place, too (128 x 2048: 61-66 us with the copy, 52-53 without).
    const bool bits16 = dtype == Dtype::BFloat16 || dtype == Dtype::Float16;
    const auto* bits = reinterpret_cast<const std::uint16_t*>(row);
    const float* values = scratch;  // the row as float32 (unless 16-bit)
    float amax;
    if (bits16) {
        const auto top = static_cast<std::uint16_t>(max_magnitude_bits<std::int16_t>(row, hidden));
        amax = dtype == Dtype::BFloat16 ? bf16_to_float(top) : f16_to_float(top);
    } else {
        if (dtype == Dtype::Float32 && reinterpret_cast<std::uintptr_t>(row) % alignof(float) == 0)
            values = reinterpret_cast<const float*>(row);
        else
            load_row(row, dtype, hidden, scratch);
        const auto top = max_magnitude_bits<std::int32_t>(values, hidden);
        std::memcpy(&amax, &top, sizeof(amax));
    }
    const float scale = amax / 127.0f;
    if (scale == 0.0f) {
        std::memset(q, 0, hidden);
        return scale;
    }
    // The vector path rounds the leading blocks (x86_blocks.cpp), these loops the rest: the same bits.
    const std::size_t done = quantize_blocks(row, dtype, hidden, scale, q);
    if (dtype == Dtype::BFloat16) {
        for (std::size_t h = done; h < hidden; ++h) q[h] = round_to_int8(bf16_to_float(bits[h]) / scale);
    } else if (dtype == Dtype::Float16) {
        for (std::size_t h = done; h < hidden; ++h) q[h] = round_to_int8(f16_to_float(bits[h]) / scale);
    } else {
        for (std::size_t h = done; h < hidden; ++h) q[h] = round_to_int8(values[h] / scale);
    }
    return scale;
}

namespace {

// Copies larger than this write with streaming stores: the destination is not read again
// soon, and skipping the read-for-ownership of every line saves a third of the memory
// traffic when ranks share the memory bandwidth (as a large memcpy does).
constexpr std::size_t kStreamingBytes = 8 << 20;

void stream_row(std::uint8_t* dst, const std::uint8_t* src, std::size_t bytes) {
#if defined(__SSE2__)
    for (std::size_t offset = 0; offset < bytes; offset += 64) {
        const auto* from = reinterpret_cast<const __m128i*>(src + offset);
        auto* to = reinterpret_cast<__m128i*>(dst + offset);
        const __m128i a = _mm_loadu_si128(from), b = _mm_loadu_si128(from + 1);
        const __m128i c = _mm_loadu_si128(from + 2), d = _mm_loadu_si128(from + 3);
        _mm_stream_si128(to, a);
        _mm_stream_si128(to + 1, b);
        _mm_stream_si128(to + 2, c);
        _mm_stream_si128(to + 3, d);
    }
#else
    std::memcpy(dst, src, bytes);
#endif
}

}  // namespace

void copy_rows(std::uint8_t* dst, std::size_t dst_stride, const std::vector<const std::uint8_t*>& srcs,
               std::size_t src_stride, const std::int32_t* src_rank, const std::int64_t* src_row,
               const std::int64_t* dst_row, std::size_t n, std::size_t row_bytes, int num_threads) {
    // Streaming needs 16-byte aligned destination rows made of whole cache lines.
    const bool streaming = n * row_bytes >= kStreamingBytes && row_bytes % 64 == 0 && dst_stride % 16 == 0 &&
                           reinterpret_cast<std::uintptr_t>(dst) % 16 == 0;
    parallel_for(n, n * row_bytes, num_threads, [&](std::size_t begin, std::size_t end) {
        for (std::size_t i = begin; i < end; ++i) {
            std::uint8_t* to = dst + static_cast<std::size_t>(dst_row[i]) * dst_stride;
            const std::uint8_t* from = srcs[src_rank[i]] + static_cast<std::size_t>(src_row[i]) * src_stride;
            if (streaming) {
                stream_row(to, from, row_bytes);
            } else {
                std::memcpy(to, from, row_bytes);
            }
        }
#if defined(__SSE2__)
        if (streaming) _mm_sfence();  // the rows are visible before the caller's barrier
#endif
    });
}

void copy_bytes(std::uint8_t* dst, const std::uint8_t* src, std::size_t nbytes, int num_threads) {
    // Whole 4 KiB pages per thread: no two threads write the same cache line.
    constexpr std::size_t kPage = 4096;
    const std::size_t pages = (nbytes + kPage - 1) / kPage;
    parallel_for(pages, nbytes, num_threads, [&](std::size_t begin, std::size_t end) {
        const std::size_t from = begin * kPage, to = std::min(nbytes, end * kPage);
        if (to > from) std::memcpy(dst + from, src + from, to - from);
    });
}

void quantize_int8(const void* x, Dtype dtype, std::size_t rows, std::size_t hidden, std::int8_t* q,
                   float* scales, int num_threads) {
    const auto* base = static_cast<const std::uint8_t*>(x);
    const std::size_t stride = hidden * dtype_size(dtype);
    parallel_for(rows, rows * stride, num_threads, [&](std::size_t begin, std::size_t end) {
        std::vector<float> row(hidden);
        for (std::size_t r = begin; r < end; ++r)
            scales[r] = quantize_row(base + r * stride, dtype, hidden, row.data(), q + r * hidden);
    });
}

namespace {

// out [hidden] of out_dtype = sum over terms in order of weight * row, per element in Sum (float64
// or float32; no fused multiply-add where it would change the bits), rounded once (16-bit types
// through float32); scratch holds hidden sums. The vector path (x86_blocks.cpp) sums the leading
// whole blocks of columns with the sums in registers and rounds fp16 outputs by the hardware
// conversions; the whole-row loop here does the rest, the same operations in the same order, so
// every CPU gets the same bits.
template <typename Sum>
void reduce_row(const RowTerm* terms, std::size_t count, std::size_t hidden, Dtype out_dtype, std::uint8_t* out,
                Sum* scratch) {
    const std::size_t done = accumulate_blocks(terms, count, hidden, scratch);  // leading columns summed
    std::fill(scratch + done, scratch + hidden, Sum{0});
    for (std::size_t k = 0; k < count; ++k)
        accumulate_row(scratch + done, terms[k].row + done * dtype_size(terms[k].dtype), terms[k].dtype,
                       hidden - done, static_cast<Sum>(terms[k].weight));
    const std::size_t stored = out_dtype == Dtype::Float16 ? store_f16_blocks(scratch, hidden, out) : 0;
    store_row(scratch + stored, out_dtype, hidden - stored, out + stored * dtype_size(out_dtype));
}

template <typename Sum>
void reduce_rows(void* out, Dtype out_dtype, std::size_t tokens, std::size_t columns, std::size_t hidden,
                 const std::vector<const std::uint8_t*>& srcs, const std::vector<Dtype>& src_dtypes,
                 const std::int32_t* src_rank, const std::int64_t* src_row, const float* weights, const Bias& bias0,
                 const Bias& bias1, int num_threads) {
    auto* out_base = static_cast<std::uint8_t*>(out);
    const std::size_t out_stride = hidden * dtype_size(out_dtype);
    parallel_for(tokens, tokens * columns * hidden * 2, num_threads, [&](std::size_t begin, std::size_t end) {
        std::vector<Sum> acc(hidden);
        std::vector<RowTerm> terms;
        terms.reserve(columns + 2);
        for (std::size_t t = begin; t < end; ++t) {
            terms.clear();
            for (std::size_t c = 0; c < columns; ++c) {
                const std::size_t e = t * columns + c;
                const std::int32_t s = src_rank[e];
                if (s < 0) continue;
                const Dtype dtype = src_dtypes[s];
                terms.push_back({srcs[s] + static_cast<std::size_t>(src_row[e]) * hidden * dtype_size(dtype), dtype,
                                 static_cast<double>(weights[e])});
            }
            // A bias is a term of weight 1.0: 1.0 * value is exact, so the sum gains exactly the bias.
            for (const Bias* b : {&bias0, &bias1}) {
                if (b->data == nullptr) continue;
                terms.push_back({static_cast<const std::uint8_t*>(b->data) + t * hidden * dtype_size(b->dtype),
                                 b->dtype, 1.0});
            }
            reduce_row(terms.data(), terms.size(), hidden, out_dtype, out_base + t * out_stride, acc.data());
        }
    });
}

}  // namespace

void combine_reduce(void* out, Dtype out_dtype, std::size_t tokens, std::size_t columns, std::size_t hidden,
                    const std::vector<const std::uint8_t*>& srcs, const std::vector<Dtype>& src_dtypes,
                    const std::int32_t* src_rank, const std::int64_t* src_row, const float* weights,
                    const Bias& bias0, const Bias& bias1, Dtype sums, int num_threads) {
    if (sums == Dtype::Float64) {
        reduce_rows<double>(out, out_dtype, tokens, columns, hidden, srcs, src_dtypes, src_rank, src_row, weights,
                            bias0, bias1, num_threads);
        return;
    }
    // Float64 values or outputs would lose bits in float32 sums.
    const auto is_float64 = [](Dtype dtype) { return dtype == Dtype::Float64; };
    if (sums != Dtype::Float32 || is_float64(out_dtype) ||
        std::any_of(src_dtypes.begin(), src_dtypes.end(), is_float64) ||
        (bias0.data != nullptr && is_float64(bias0.dtype)) || (bias1.data != nullptr && is_float64(bias1.dtype)))
        throw std::invalid_argument("combine_reduce: sums are float64, or float32 of 16/32-bit rows and outputs");
    reduce_rows<float>(out, out_dtype, tokens, columns, hidden, srcs, src_dtypes, src_rank, src_row, weights, bias0,
                       bias1, num_threads);
}

}  // namespace deep_ep
