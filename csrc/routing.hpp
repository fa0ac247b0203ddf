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

// Places selections in expert-major layouts without sorting: visits the selections of
// topk_idx [rows, topk] whose expert e lies in [expert_begin, expert_end) in (row, k) order and
// gives each the row start[e'][s] + taken[e'][s]++ (e' = e - expert_begin, s = origin[row], the
// row's source rank), so rows of one (expert, source) keep their order. start / taken: int64
// [expert_end - expert_begin, num_sources]; taken is updated. Writes row, k and the placed row
// of every selection and returns their number (at most rows * topk).
std::int64_t place_selections(const std::int64_t* topk_idx, std::int64_t rows, std::int64_t topk,
                              std::int64_t expert_begin, std::int64_t expert_end, const std::int64_t* start,
                              std::int64_t* taken, std::int64_t num_sources, const std::int64_t* origin,
                              std::int64_t* row_out, std::int64_t* k_out, std::int64_t* placed_out);

// One pass over topk_idx [rows, topk]: the smallest and largest id (0 and 0 when empty). A row
// may name an expert more than once: every (row, k) selection is routed on its own.
struct TopkSummary {
    std::int64_t min = 0, max = 0;
};
TopkSummary summarize_topk(const std::int64_t* topk_idx, std::int64_t rows, std::int64_t topk);

// In place: global expert ids -> local ids [0, experts_per_rank) of the rank whose first
// expert is expert_begin; every other id (and -1) becomes -1.
void localize_experts(std::int64_t* topk_idx, std::size_t n, std::int64_t expert_begin, std::int64_t experts_per_rank);

}  // namespace deep_ep
