#include "low_latency.hpp"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cpu.hpp"
#include "sync.hpp"

namespace deep_ep {

void expert_slots(const std::int64_t* topk_idx, std::size_t tokens, std::size_t topk, std::int64_t num_experts,
                  std::int64_t* slot, std::int64_t* counts) {
    std::fill(counts, counts + num_experts, 0);
    for (std::size_t t = 0; t < tokens; ++t) {
        const std::int64_t* row = topk_idx + t * topk;
        for (std::size_t k = 0; k < topk; ++k) {
            const std::int64_t e = row[k];
            if (e == -1) {
                slot[t * topk + k] = -1;
                continue;
            }
            if (e < -1 || e >= num_experts)
                throw std::invalid_argument("topk_idx[" + std::to_string(t) + ", " + std::to_string(k) + "] = " +
                                            std::to_string(e) + " is outside [-1, " + std::to_string(num_experts) +
                                            ")");
            slot[t * topk + k] = counts[e]++;
        }
    }
}

void ll_send_tokens(const void* x, Dtype dtype, bool quantize, std::size_t tokens, std::size_t hidden,
                    std::size_t topk, const std::int64_t* topk_idx, const std::int64_t* slot,
                    std::size_t experts_per_rank, std::size_t num_ranks, std::size_t rank, std::size_t max_tokens,
                    std::uint8_t* token_rows, float* token_scales, const std::vector<std::int32_t*>& infos,
                    int num_threads) {
    if (quantize) {
        quantize_int8(x, dtype, tokens, hidden, reinterpret_cast<std::int8_t*>(token_rows), token_scales,
                      num_threads);
    } else {
        std::memcpy(token_rows, x, tokens * hidden * dtype_size(dtype));
    }
    for (std::size_t t = 0; t < tokens; ++t) {
        for (std::size_t k = 0; k < topk; ++k) {
            const std::int64_t e = topk_idx[t * topk + k];
            if (e < 0) continue;
            const std::size_t local = static_cast<std::size_t>(e) % experts_per_rank;
            const std::size_t row =
                (local * num_ranks + rank) * max_tokens + static_cast<std::size_t>(slot[t * topk + k]);
            std::int32_t* info = infos[static_cast<std::size_t>(e) / experts_per_rank] + 2 * row;
            info[0] = static_cast<std::int32_t>(t);
            info[1] = static_cast<std::int32_t>(k);
        }
    }
}

void ll_pack(const std::int32_t* info, const std::vector<const std::uint8_t*>& rows,
             const std::vector<const float*>& scales, std::size_t row_bytes, const std::int64_t* counts,
             const std::int64_t* ends, std::size_t blocks, std::size_t num_ranks, std::size_t max_tokens,
             std::uint8_t* out, float* out_scales, std::int32_t* out_info, std::size_t out_rows, int num_threads) {
    const std::size_t total = blocks ? static_cast<std::size_t>(ends[blocks - 1]) : 0;
    parallel_for(blocks, total * row_bytes, num_threads, [&](std::size_t begin, std::size_t end) {
        for (std::size_t b = begin; b < end; ++b) {
            const auto n = static_cast<std::size_t>(counts[b]);
            const auto start = static_cast<std::size_t>(ends[b]) - n;
            const std::size_t source = b % num_ranks;
            const std::uint8_t* src_rows = rows[source];
            const float* src_scales = scales.empty() ? nullptr : scales[source];
            const std::int32_t* refs = info + 2 * b * max_tokens;
            for (std::size_t i = 0; i < n; ++i) {
                const auto token = static_cast<std::size_t>(refs[2 * i]);
                std::memcpy(out + (start + i) * row_bytes, src_rows + token * row_bytes, row_bytes);
                if (src_scales != nullptr) out_scales[start + i] = src_scales[token];
                std::int32_t* row_info = out_info + 3 * (start + i);
                row_info[0] = static_cast<std::int32_t>(source);
                row_info[1] = refs[2 * i];
                row_info[2] = refs[2 * i + 1];
            }
        }
    });
    std::fill(out_info + 3 * total, out_info + 3 * out_rows, -1);
}

void ll_return_rows(const std::uint8_t* x, std::size_t row_bytes, std::size_t rows, const std::int32_t* info,
                    std::size_t topk, const std::vector<std::uint8_t*>& dests, int num_threads) {
    parallel_for(rows, rows * row_bytes, num_threads, [&](std::size_t begin, std::size_t end) {
        for (std::size_t i = begin; i < end; ++i) {
            const std::int32_t* source = info + 3 * i;
            std::uint8_t* dest = dests[source[0]];
            if (dest == nullptr) continue;
            const std::size_t row = static_cast<std::size_t>(source[1]) * topk + static_cast<std::size_t>(source[2]);
            std::memcpy(dest + row * row_bytes, x + i * row_bytes, row_bytes);
        }
    });
}

void ll_publish(const std::vector<std::uintptr_t>& header_addrs, const std::vector<std::int64_t>& header,
                const std::int64_t* extra, std::size_t extra_words, const std::vector<std::uintptr_t>& signal_addrs,
                std::uint64_t value) {
    for (std::size_t d = 0; d < header_addrs.size(); ++d) {
        auto* words = reinterpret_cast<std::int64_t*>(header_addrs[d]);
        std::memcpy(words, header.data(), header.size() * sizeof(std::int64_t));
        if (extra != nullptr)
            std::memcpy(words + header.size(), extra + d * extra_words, extra_words * sizeof(std::int64_t));
    }
    // One release store per peer, after every row and header write above (the row kernels'
    // worker threads were joined before this runs).
    for (std::uintptr_t addr : signal_addrs) store_counter(addr, value);
}

}  // namespace deep_ep
