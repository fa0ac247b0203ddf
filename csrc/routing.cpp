#include "routing.hpp"

#include <algorithm>

#include "cpu.hpp"

namespace deep_ep {

ExpertMajorSort::ExpertMajorSort(const std::int64_t* topk_idx, std::int64_t tokens, std::int64_t topk,
                                 std::int64_t expert_begin, std::int64_t expert_end)
    : topk_idx_(topk_idx), tokens_(tokens), topk_(topk), expert_begin_(expert_begin), span_(expert_end - expert_begin),
      first_(static_cast<std::size_t>(span_) + 1, 0) {
    for (std::int64_t i = 0; i < tokens_ * topk_; ++i) {
        const std::int64_t e = topk_idx_[i] - expert_begin_;
        if (e >= 0 && e < span_) ++first_[e + 1];
    }
    for (std::int64_t e = 0; e < span_; ++e) first_[e + 1] += first_[e];
}

void ExpertMajorSort::fill(std::int64_t* token, std::int64_t* k, std::int64_t* expert, std::int64_t* within) const {
    std::vector<std::int64_t> next(first_.begin(), first_.end() - 1);
    for (std::int64_t t = 0; t < tokens_; ++t) {
        for (std::int64_t j = 0; j < topk_; ++j) {
            const std::int64_t e = topk_idx_[t * topk_ + j] - expert_begin_;
            if (e < 0 || e >= span_) continue;
            const std::int64_t pos = next[e]++;
            token[pos] = t;
            k[pos] = j;
            expert[pos] = e + expert_begin_;
            within[pos] = pos - first_[e];
        }
    }
}

std::int64_t place_selections(const std::int64_t* topk_idx, std::int64_t rows, std::int64_t topk,
                              std::int64_t expert_begin, std::int64_t expert_end, const std::int64_t* start,
                              std::int64_t* taken, std::int64_t num_sources, const std::int64_t* origin,
                              std::int64_t* row_out, std::int64_t* k_out, std::int64_t* placed_out) {
    const std::int64_t span = expert_end - expert_begin;
    std::int64_t n = 0;
    for (std::int64_t r = 0; r < rows; ++r) {
        for (std::int64_t j = 0; j < topk; ++j) {
            const std::int64_t e = topk_idx[r * topk + j] - expert_begin;
            if (e < 0 || e >= span) continue;
            const std::int64_t cell = e * num_sources + origin[r];
            row_out[n] = r;
            k_out[n] = j;
            placed_out[n] = start[cell] + taken[cell]++;
            ++n;
        }
    }
    return n;
}

DEEP_EP_VECTORIZED
void localize_experts(std::int64_t* topk_idx, std::size_t n, std::int64_t expert_begin, std::int64_t experts_per_rank) {
    // Branch-free so it vectorizes; -1 maps below expert_begin >= 0 and so to -1 as well.
    for (std::size_t i = 0; i < n; ++i) {
        const std::int64_t local = topk_idx[i] - expert_begin;
        const bool mine = topk_idx[i] >= 0 && local >= 0 && local < experts_per_rank;
        topk_idx[i] = mine ? local : -1;
    }
}

TopkSummary summarize_topk(const std::int64_t* topk_idx, std::int64_t rows, std::int64_t topk) {
    TopkSummary summary;
    if (rows * topk == 0) return summary;
    const auto [low, high] = std::minmax_element(topk_idx, topk_idx + rows * topk);
    summary.min = *low;
    summary.max = *high;
    return summary;
}

}  // namespace deep_ep
