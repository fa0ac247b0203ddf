// bfloat16 <-> float32 conversions of the row kernels (kernels.cpp, low_latency.cpp). Branch-free,
// so loops over rows vectorize.
#pragma once

#include <cstdint>
#include <cstring>

namespace deep_ep {

inline float bf16_to_float(std::uint16_t v) {
    std::uint32_t bits = static_cast<std::uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}

// Round to nearest even, as torch does; NaN becomes the canonical quiet NaN.
inline std::uint16_t float_to_bf16(float f) {
    std::uint32_t bits;
    std::memcpy(&bits, &f, sizeof(bits));
    const std::uint32_t rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
    const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
    return static_cast<std::uint16_t>(nan ? 0x7FC0u : rounded);
}

}  // namespace deep_ep
