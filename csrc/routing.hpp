// Routing kernel behind deep_ep/layout.py: top-k selections in expert-major order.
#pragma once

#include <cstdint>
#include <vector>

namespace deep_ep {

// A counting sort of the selections of topk_idx [tokens, topk] whose expert lies in
// [expert_begin, expert_end), by expert then token: count() sizes it, fill() writes it.
class ExpertMajorSort {
public:
    ExpertMajorSort(const std::int64_t* topk_idx, std::int64_t tokens, std::int64_t topk, std::int64_t expert_begin,
                    std::int64_t expert_end);
    std::int64_t count() const { return first_.back(); }
    // Writes count() entries: token, k, expert and the index inside the expert's group.
    void fill(std::int64_t* token, std::int64_t* k, std::int64_t* expert, std::int64_t* within) const;

private:
    const std::int64_t* topk_idx_;
    std::int64_t tokens_, topk_, expert_begin_, span_;
    std::vector<std::int64_t> first_;  // first_[e]: first entry of expert e; back(): total
};

// In place: global expert ids -> local ids [0, experts_per_rank) of the rank whose first
// expert is expert_begin; every other id (and -1) becomes -1.
void localize_experts(std::int64_t* topk_idx, std::size_t n, std::int64_t expert_begin, std::int64_t experts_per_rank);

}  // namespace deep_ep
