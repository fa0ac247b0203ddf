#include "routing.hpp"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cpu.hpp"
#include "kernels.hpp"

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

TopkSummary count_layout(const std::int64_t* topk_idx, std::int64_t rows, std::int64_t topk, std::int64_t num_experts,
                         std::int64_t num_ranks, const LayoutOutputs& out) {
    const TopkSummary summary = summarize_topk(topk_idx, rows, topk);
    if (summary.min < -1 || summary.max >= num_experts) return summary;
    const std::int64_t experts_per_rank = num_experts / num_ranks;
    std::vector<std::int32_t> node_hit(static_cast<std::size_t>(out.per_node ? out.num_nodes : 0));
    for (std::int64_t t = 0; t < rows; ++t) {
        const std::int64_t* row = topk_idx + t * topk;
        std::int32_t* in_rank = out.in_rank ? out.in_rank + t * num_ranks : nullptr;
        for (std::int64_t j = 0; j < topk; ++j) {
            const std::int64_t e = row[j];
            if (e < 0) continue;
            ++out.per_expert[e];
            if (in_rank) in_rank[e / experts_per_rank] = 1;
        }
        if (!in_rank) continue;
        std::fill(node_hit.begin(), node_hit.end(), 0);
        for (std::int64_t r = 0; r < num_ranks; ++r) {
            out.per_rank[r] += in_rank[r];
            if (in_rank[r] && out.per_node) node_hit[out.rank_to_node[r]] = 1;
        }
        for (std::size_t n = 0; n < node_hit.size(); ++n) out.per_node[n] += node_hit[n];
    }
    return summary;
}

void plan_blocks(const std::int64_t* counts, std::int64_t num_ranks, std::int64_t num_experts, std::int64_t alignment,
                 std::int64_t* padded, std::int64_t* block_start, std::int64_t* rows_per_rank) {
    const std::int64_t experts_per_rank = num_experts / num_ranks;
    for (std::int64_t d = 0; d < num_ranks; ++d) {
        std::int64_t row = 0;
        for (std::int64_t l = 0; l < experts_per_rank; ++l) {
            const std::int64_t e = d * experts_per_rank + l;
            const std::int64_t expert_start = row;
            for (std::int64_t s = 0; s < num_ranks; ++s) {
                block_start[(d * experts_per_rank + l) * num_ranks + s] = row;
                row += counts[s * num_experts + e];
            }
            const std::int64_t real = row - expert_start;
            padded[d * experts_per_rank + l] = (real + alignment - 1) / alignment * alignment;
            row = expert_start + padded[d * experts_per_rank + l];
        }
        rows_per_rank[d] = row;
    }
}

void handle_arrays(const std::int64_t* counts, const std::int64_t* padded, const std::int64_t* block_start,
                   std::int64_t num_ranks, std::int64_t num_experts, std::int64_t rank, const HandleArrays& out) {
    const std::int64_t experts_per_rank = num_experts / num_ranks;
    std::vector<std::int64_t> received(static_cast<std::size_t>(num_ranks), 0);  // by destination, running
    for (std::int64_t s = 0; s < num_ranks; ++s) {
        for (std::int64_t d = 0; d < num_ranks; ++d) {
            const std::int64_t* sent = counts + s * num_experts + d * experts_per_rank;
            for (std::int64_t l = 0; l < experts_per_rank; ++l) received[d] += sent[l];
            out.rank_prefix[s * num_ranks + d] = static_cast<std::int32_t>(received[d]);
        }
    }
    std::int64_t rows = 0;
    for (std::int64_t l = 0; l < experts_per_rank; ++l) {
        rows += padded[rank * experts_per_rank + l];
        out.expert_prefix[l] = static_cast<std::int32_t>(rows);
        for (std::int64_t s = 0; s < num_ranks; ++s) {
            out.channel_prefix[s * experts_per_rank + l] =
                static_cast<std::int32_t>(block_start[(rank * experts_per_rank + l) * num_ranks + s]);
            out.recv_counts[l * num_ranks + s] =
                static_cast<std::int32_t>(counts[s * num_experts + rank * experts_per_rank + l]);
        }
    }
}

std::int64_t received_counts(const std::int64_t* counts, std::int64_t num_ranks, std::int64_t num_experts,
                             std::int64_t rank, std::int64_t* recv_counts) {
    const std::int64_t experts_per_rank = num_experts / num_ranks;
    std::int64_t total = 0;
    for (std::int64_t l = 0; l < experts_per_rank; ++l)
        for (std::int64_t s = 0; s < num_ranks; ++s)
            total += recv_counts[l * num_ranks + s] = counts[s * num_experts + rank * experts_per_rank + l];
    return total;
}

std::vector<std::int64_t> peer_rows(const std::int64_t* rank_block_start, const std::int64_t* recv_counts,
                                    std::int64_t experts_per_rank, std::int64_t num_ranks, std::int64_t rank) {
    std::vector<std::int64_t> rows;
    for (std::int64_t l = 0; l < experts_per_rank; ++l)
        for (std::int64_t s = 0; s < num_ranks; ++s) {
            const std::int64_t block = l * num_ranks + s;
            for (std::int64_t j = 0; s != rank && j < recv_counts[block]; ++j)
                rows.push_back(rank_block_start[block] + j);
        }
    return rows;
}

void selection_destinations(const std::int64_t* topk_idx, std::int64_t rows, std::int64_t topk,
                            std::int64_t experts_per_rank, const std::int64_t* start, std::int64_t* taken,
                            std::int64_t num_sources, const std::int64_t* origin, std::int64_t* dest_rank,
                            std::int64_t* dest_row) {
    for (std::int64_t r = 0; r < rows; ++r) {
        for (std::int64_t j = 0; j < topk; ++j) {
            const std::int64_t i = r * topk + j, e = topk_idx[i];
            if (e < 0) {
                dest_rank[i] = dest_row[i] = -1;
                continue;
            }
            const std::int64_t cell = e * num_sources + origin[r];
            dest_rank[i] = e / experts_per_rank;
            dest_row[i] = start[cell] + taken[cell]++;
        }
    }
}

std::size_t region_offsets(const std::vector<std::size_t>& widths, std::size_t rows,
                           std::vector<std::size_t>* offsets) {
    offsets->clear();
    std::size_t offset = 0;
    for (const std::size_t width : widths) {
        offsets->push_back(offset);
        offset += (rows * width + kRegionAlign - 1) / kRegionAlign * kRegionAlign;
    }
    return offset;
}

std::int64_t pull_selections(const std::vector<PublishedWindow>& windows, const PullPlan& plan,
                             const std::vector<RowField>& outs, std::int64_t out_rows, std::int64_t* src_rank,
                             std::int64_t* src_idx, std::int64_t* src_k, int num_threads) {
    // Pass 1 (serial: `taken` orders the rows of one (expert, source)): place and check every selection.
    std::vector<std::int32_t> from_window;
    std::vector<std::int64_t> from_row, to_row;
    for (std::size_t w = 0; w < windows.size(); ++w) {
        const PublishedWindow& window = windows[w];
        const auto* topk_idx = reinterpret_cast<const std::int64_t*>(window.fields[plan.topk_field]);
        const auto* origin_ranks = plan.origin_rank_field < 0
                                       ? nullptr
                                       : reinterpret_cast<const std::int64_t*>(window.fields[plan.origin_rank_field]);
        const auto* origin_tokens = plan.origin_token_field < 0
                                        ? nullptr
                                        : reinterpret_cast<const std::int64_t*>(window.fields[plan.origin_token_field]);
        for (std::int64_t r = 0; r < window.rows; ++r) {
            const std::int64_t origin = origin_ranks ? origin_ranks[r] : window.origin_rank;
            const std::int64_t token = origin_tokens ? origin_tokens[r] : window.first_token + r;
            if (origin < 0 || origin >= plan.num_sources)
                throw std::out_of_range("pull_selections: row " + std::to_string(r) + " names source rank " +
                                        std::to_string(origin) + ", out of range");
            for (std::int64_t j = 0; j < plan.topk; ++j) {
                const std::int64_t e = topk_idx[r * plan.topk + j] - plan.expert_begin;
                if (e < 0 || e >= plan.span) continue;
                const std::int64_t cell = e * plan.num_sources + origin;
                const std::int64_t placed = plan.start[cell] + plan.taken[cell]++;
                if (placed < 0 || placed >= out_rows)
                    throw std::out_of_range("pull_selections: output row " + std::to_string(placed) +
                                            " out of range [0, " + std::to_string(out_rows) + ")");
                from_window.push_back(static_cast<std::int32_t>(w));
                from_row.push_back(r);
                to_row.push_back(placed);
                src_rank[placed] = origin;
                src_idx[placed] = token;
                src_k[placed] = j;
            }
        }
    }
    // Pass 2: every field of every placed selection, on the caller's threads.
    for (std::size_t f = 0; f < outs.size(); ++f) {
        std::vector<const std::uint8_t*> srcs;
        for (const PublishedWindow& window : windows) srcs.push_back(window.fields[f]);
        copy_rows(outs[f].data, outs[f].width, srcs, outs[f].width, from_window.data(), from_row.data(), to_row.data(),
                  to_row.size(), outs[f].width, num_threads);
    }
    if (plan.localize_topk) {
        auto* topk_out = reinterpret_cast<std::int64_t*>(outs[plan.topk_field].data);
        for (const std::int64_t row : to_row)
            localize_experts(topk_out + row * plan.topk, static_cast<std::size_t>(plan.topk), plan.expert_begin,
                             plan.span);
    }
    return static_cast<std::int64_t>(to_row.size());
}

}  // namespace deep_ep
