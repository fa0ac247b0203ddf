#include "x86_blocks.hpp"

#include <algorithm>
#include <type_traits>

// GCC only: the instruction sets are chosen per region with `#pragma GCC target`. Other compilers
// build the portable loops of kernels.cpp alone, which give the same bits. Inside a region the code
// uses intrinsics, the language and types only, no inline function or template of another header:
// such code would be compiled for that set and could be linked into callers on every CPU (a
// constant such as std::is_same_v generates none), and every function in a region has internal linkage.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DEEP_EP_X86_BLOCKS 1
#include <immintrin.h>
#endif

namespace deep_ep {

#if DEEP_EP_X86_BLOCKS
namespace {

// In the reduction, float64 sums take a fused multiply-add: a float32 weight times a bf16 / fp16 /
// float32 value has at most 24 + 24 significant bits, so the float64 product is exact and rounding it
// first changes nothing; only the add rounds, as in the whole-row loop's multiply, then add. Float32
// sums multiply, then add (there a fused multiply-add would round once instead of twice).

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,fma,f16c")
namespace avx512 {

using Float32Sums = __m512;
using Float64Sums = __m512d;
// Four registers (32 float64 or 64 float32 columns); eight were 4% faster for float64 sums and left.
constexpr std::size_t kRegisters = 4;

// The all-lanes zero-masked conversions: GCC 12 flags the unmasked ones' undefined pass-through.
template <Dtype D, typename Sum>
inline auto widen(const std::uint8_t* values) {
    if constexpr (std::is_same_v<Sum, double>) {
        __m256 floats;
        if constexpr (D == Dtype::Float32) {
            floats = _mm256_loadu_ps(reinterpret_cast<const float*>(values));
        } else {
            const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(values));
            if constexpr (D == Dtype::BFloat16)
                floats = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
            else
                floats = _mm256_cvtph_ps(bits);
        }
        return _mm512_maskz_cvtps_pd(0xFF, floats);
    } else {
        constexpr __mmask16 kAll = 0xFFFF;
        if constexpr (D == Dtype::Float32) return _mm512_loadu_ps(reinterpret_cast<const float*>(values));
        const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values));
        if constexpr (D == Dtype::BFloat16)
            return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll, _mm512_maskz_cvtepu16_epi32(kAll, bits), 16));
        return _mm512_maskz_cvtph_ps(kAll, bits);
    }
}

inline __m512d broadcast(double value) { return _mm512_set1_pd(value); }
inline __m512 broadcast(float value) { return _mm512_set1_ps(value); }
inline __m512d multiply_add(__m512d w, __m512d v, __m512d sum) { return _mm512_fmadd_pd(w, v, sum); }
inline __m512 multiply_add(__m512 w, __m512 v, __m512 sum) { return _mm512_add_ps(sum, _mm512_mul_ps(w, v)); }
inline void store(double* out, __m512d sums) { _mm512_storeu_pd(out, sums); }
inline void store(float* out, __m512 sums) { _mm512_storeu_ps(out, sums); }

#include "reduce_blocks.inc"

}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {

using Float32Sums = __m256;
using Float64Sums = __m256d;
constexpr std::size_t kRegisters = 4;

template <Dtype D, typename Sum>
inline auto widen(const std::uint8_t* values) {
    const auto* floats = reinterpret_cast<const float*>(values);
    const auto* bits = reinterpret_cast<const __m128i*>(values);
    if constexpr (std::is_same_v<Sum, double>) {
        if constexpr (D == Dtype::Float32) return _mm256_cvtps_pd(_mm_loadu_ps(floats));
        if constexpr (D == Dtype::BFloat16)
            return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), _mm_loadl_epi64(bits))));
        return _mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64(bits)));
    } else {
        if constexpr (D == Dtype::Float32) return _mm256_loadu_ps(floats);
        if constexpr (D == Dtype::BFloat16) {
            const __m128i values16 = _mm_loadu_si128(bits);
            const __m128i low = _mm_unpacklo_epi16(_mm_setzero_si128(), values16);
            const __m128i high = _mm_unpackhi_epi16(_mm_setzero_si128(), values16);
            return _mm256_castsi256_ps(_mm256_set_m128i(high, low));
        }
        return _mm256_cvtph_ps(_mm_loadu_si128(bits));
    }
}

inline __m256d broadcast(double value) { return _mm256_set1_pd(value); }
inline __m256 broadcast(float value) { return _mm256_set1_ps(value); }
inline __m256d multiply_add(__m256d w, __m256d v, __m256d sum) { return _mm256_fmadd_pd(w, v, sum); }
inline __m256 multiply_add(__m256 w, __m256 v, __m256 sum) { return _mm256_add_ps(sum, _mm256_mul_ps(w, v)); }
inline void store(double* out, __m256d sums) { _mm256_storeu_pd(out, sums); }
inline void store(float* out, __m256 sums) { _mm256_storeu_ps(out, sums); }

#include "reduce_blocks.inc"

// 8 fp16 values rounded to nearest even from 8 float32 ones, a NaN as sign | 0x7E00.
inline __m128i to_f16(__m256 floats) {
    const __m128i halves = _mm256_cvtps_ph(floats, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m128i sign = _mm_set1_epi16(static_cast<short>(0x8000));
    // Magnitudes are below 0x8000, so the signed compare orders them.
    const __m128i nan = _mm_cmpgt_epi16(_mm_andnot_si128(sign, halves), _mm_set1_epi16(0x7C00));
    const __m128i quiet = _mm_or_si128(_mm_and_si128(halves, sign), _mm_set1_epi16(0x7E00));
    return _mm_blendv_epi8(halves, quiet, nan);
}

inline __m256 load8(const double* sums) {
    return _mm256_set_m128(_mm256_cvtpd_ps(_mm256_loadu_pd(sums + 4)), _mm256_cvtpd_ps(_mm256_loadu_pd(sums)));
}
inline __m256 load8(const float* sums) { return _mm256_loadu_ps(sums); }

template <typename Sum>
std::size_t store_f16(const Sum* sums, std::size_t hidden, std::uint8_t* out) {
    const std::size_t done = hidden / 8 * 8;
    for (std::size_t h = 0; h < done; h += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * h), to_f16(load8(sums + h)));
    return done;
}

// ---- int8 quantization ----
// A block is 32 values in four registers, in the order the packs of store_block restore:
// (0-3 | 8-11), (4-7 | 12-15), (16-19 | 24-27), (20-23 | 28-31) (low | high 128-bit lane).

struct Half {  // an fp16 value's bits
    std::uint16_t bits;
};

// bf16: the bit patterns moved into the high halves of 32-bit lanes (exact), per 128-bit lane.
inline void load_block(const std::uint16_t* values, __m256* block) {
    for (std::size_t i = 0; i < 2; ++i) {
        const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values + 16 * i));
        block[2 * i] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), bits));
        block[2 * i + 1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), bits));
    }
}

// Four float32 / fp16 values as float32 (fp16 widened exactly, by F16C).
inline __m128 load4(const float* values) { return _mm_loadu_ps(values); }
inline __m128 load4(const Half* values) {
    return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(values)));
}

template <typename Value>
inline void load_block(const Value* values, __m256* block) {
    for (std::size_t i = 0; i < 4; ++i) {
        const Value* low = values + 16 * (i / 2) + 4 * (i % 2);
        block[i] = _mm256_set_m128(load4(low + 8), load4(low));
    }
}

// q[0, 32) from the block's integers: saturated to int16, then int8 (so >= 128 gives 127, and the
// integer of a NaN, INT_MIN, gives -128), then raised to -127.
inline void store_block(const __m256i* integers, std::int8_t* q) {
    const __m256i low = _mm256_packs_epi32(integers[0], integers[1]);
    const __m256i high = _mm256_packs_epi32(integers[2], integers[3]);
    const __m256i bytes = _mm256_permute4x64_epi64(_mm256_packs_epi16(low, high), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_max_epi8(bytes, _mm256_set1_epi8(-127)));
}

// The division, the rounding to nearest even and the clamp of quantize_row's loop, 32 values at a
// time (the conversion rounds as the loop's (v + 1.5 * 2^23) - 1.5 * 2^23 does, in the default
// rounding mode). A multiply by the inverse of the scale, with the division redone only for blocks
// holding a product near a half-integer, was slower on an AMD Zen 1 CPU (docs/low_latency_data_path.md).
template <typename Value>
std::size_t quantize(const Value* row, std::size_t hidden, float scale, std::int8_t* q) {
    const std::size_t done = hidden / 32 * 32;
    const __m256 divisor = _mm256_set1_ps(scale);
    for (std::size_t h = 0; h < done; h += 32) {
        __m256 block[4];
        load_block(row + h, block);
        __m256i integers[4];
        for (std::size_t i = 0; i < 4; ++i) integers[i] = _mm256_cvtps_epi32(_mm256_div_ps(block[i], divisor));
        store_block(integers, q + h);
    }
    return done;
}

}  // namespace avx2
#pragma GCC pop_options

bool cpu_has_avx512() {
    static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") &&
                            __builtin_cpu_supports("f16c");
    return has;
}

bool cpu_has_avx2() {
    static const bool has =
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    return has;
}

template <typename Sum>
std::size_t accumulate_any(const RowTerm* terms, std::size_t count, std::size_t hidden, Sum* scratch) {
    // Float64 values (internode partial sums) stay whole-row: a float64 value times a weight is not
    // exact, so a fused multiply-add would change the bits.
    const auto blockable = [](const RowTerm& term) { return term.dtype != Dtype::Float64; };
    if (count == 0 || !std::all_of(terms, terms + count, blockable)) return 0;
    if (cpu_has_avx512()) return avx512::accumulate(terms, count, hidden, scratch);
    if (cpu_has_avx2()) return avx2::accumulate(terms, count, hidden, scratch);
    return 0;
}

}  // namespace

std::size_t accumulate_blocks(const RowTerm* terms, std::size_t count, std::size_t hidden, double* scratch) {
    return accumulate_any(terms, count, hidden, scratch);
}
std::size_t accumulate_blocks(const RowTerm* terms, std::size_t count, std::size_t hidden, float* scratch) {
    return accumulate_any(terms, count, hidden, scratch);
}
std::size_t store_f16_blocks(const double* sums, std::size_t hidden, std::uint8_t* out) {
    return cpu_has_avx2() ? avx2::store_f16(sums, hidden, out) : 0;
}
std::size_t store_f16_blocks(const float* sums, std::size_t hidden, std::uint8_t* out) {
    return cpu_has_avx2() ? avx2::store_f16(sums, hidden, out) : 0;
}
const char* vector_isa() { return cpu_has_avx512() ? "avx512" : cpu_has_avx2() ? "avx2" : "portable"; }
std::size_t quantize_blocks(const std::uint8_t* row, Dtype dtype, std::size_t hidden, float scale, std::int8_t* q) {
    if (!cpu_has_avx2()) return 0;
    switch (dtype) {
        case Dtype::BFloat16:
            return avx2::quantize(reinterpret_cast<const std::uint16_t*>(row), hidden, scale, q);
        case Dtype::Float16:
            return avx2::quantize(reinterpret_cast<const avx2::Half*>(row), hidden, scale, q);
        case Dtype::Float32:
            return avx2::quantize(reinterpret_cast<const float*>(row), hidden, scale, q);
        default:
            return 0;
    }
}

#else

std::size_t accumulate_blocks(const RowTerm*, std::size_t, std::size_t, double*) { return 0; }
std::size_t accumulate_blocks(const RowTerm*, std::size_t, std::size_t, float*) { return 0; }
std::size_t store_f16_blocks(const double*, std::size_t, std::uint8_t*) { return 0; }
std::size_t store_f16_blocks(const float*, std::size_t, std::uint8_t*) { return 0; }
std::size_t quantize_blocks(const std::uint8_t*, Dtype, std::size_t, float, std::int8_t*) { return 0; }
const char* vector_isa() { return "portable"; }

#endif

}  // namespace deep_ep
