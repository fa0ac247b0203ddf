// Helpers shared by the pybind11 binding files: array arguments checked at the boundary.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <string>

#include "kernels.hpp"

namespace deep_ep {

// Index and weight arrays arrive as C-contiguous numpy arrays (converted if needed).
template <typename T>
using Array = pybind11::array_t<T, pybind11::array::c_style | pybind11::array::forcecast>;

// The array's data, after checking it holds exactly `expected` entries.
template <typename T>
const T* checked_data(const Array<T>& array, std::size_t expected, const char* name) {
    if (static_cast<std::size_t>(array.size()) != expected)
        throw pybind11::value_error(std::string(name) + ": expected " + std::to_string(expected) +
                                    " entries, got " + std::to_string(array.size()));
    return array.data();
}

// A dtype code from Python; float64 only where partial sums are allowed.
inline Dtype to_dtype(int code, bool allow_float64 = false) {
    const int last = allow_float64 ? 3 : 2;
    if (code < 0 || code > last)
        throw pybind11::value_error(allow_float64
                                        ? "dtype code must be 0 (float32), 1 (bfloat16), 2 (float16) or 3 (float64)"
                                        : "dtype code must be 0 (float32), 1 (bfloat16) or 2 (float16)");
    return static_cast<Dtype>(code);
}

}  // namespace deep_ep
