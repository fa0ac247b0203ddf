// CPU helpers shared by the row kernels: a small thread fan-out and per-CPU code versions.
#pragma once

#include <algorithm>
#include <cstddef>
#include <thread>
#include <vector>

// Row loops compiled for several x86-64 levels (AVX-512, AVX2, baseline); the loader picks the
// best one for the CPU at hand. Only element-wise code and exact max reductions use it, and
// -ffp-contract=off forbids FMA, so every version computes the same bits. (The combine reduction's
// vector path uses FMA explicitly, where the product is exact: see x86_blocks.cpp.)
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__linux__)
#define DEEP_EP_VECTORIZED __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DEEP_EP_VECTORIZED
#endif

namespace deep_ep {

// Below this much work per thread, another thread costs more than it saves: starting and joining
// one takes 20-100 us on the VMs this was measured on, about what a copy of a few MB takes, and
// handing work to a parked one cost as much in a trial (docs/threads_and_bench.md).
constexpr std::size_t kBytesPerThread = 4 << 20;

// Runs fn(begin, end) over [0, n) on up to num_threads threads (fewer for little work).
template <typename Fn>
void parallel_for(std::size_t n, std::size_t bytes, int num_threads, Fn&& fn) {
    std::size_t threads = std::max(1, num_threads);
    threads = std::min<std::size_t>(threads, std::max<std::size_t>(1, bytes / kBytesPerThread));
    threads = std::min(threads, std::max<std::size_t>(1, n));
    if (threads <= 1) {
        fn(0, n);
        return;
    }
    std::vector<std::thread> workers;
    workers.reserve(threads - 1);
    const std::size_t chunk = (n + threads - 1) / threads;
    for (std::size_t t = 1; t < threads; ++t) {
        const std::size_t begin = std::min(n, t * chunk), end = std::min(n, begin + chunk);
        workers.emplace_back([&fn, begin, end] { fn(begin, end); });
    }
    fn(0, std::min(n, chunk));
    for (auto& w : workers) w.join();
}

}  // namespace deep_ep
