// Routing kernel behind deep_ep/layout.py: top-k selections in expert-major order.
#pragma once

#include <cstddef>
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

// One pass over topk_idx [rows, topk]: the smallest and largest id (0 and 0 when empty). A row
// may name an expert more than once: every (row, k) selection is routed on its own.
struct TopkSummary {
    std::int64_t min = 0, max = 0;
};
TopkSummary summarize_topk(const std::int64_t* topk_idx, std::int64_t rows, std::int64_t topk);

// One pass over topk_idx [rows, topk] (after a min/max pass that must lie in [-1, num_experts)):
// per_expert[e] += selections of expert e; with in_rank (and per_rank), in_rank[t, r]
// = 1 if token t selects an expert of rank r (r = e / (num_experts / num_ranks), 0 elsewhere) and
// per_rank[r] += tokens with in_rank[t, r]; with rank_to_node and per_node also, per_node[n] +=
// tokens that select a rank of node n. Counts start from what the arrays hold (callers pass
// zeros). Returns the summary; nothing is counted when an id lies outside [-1, num_experts).
struct LayoutOutputs {
    std::int32_t* per_expert = nullptr;   // [num_experts]
    std::int32_t* per_rank = nullptr;     // [num_ranks] or null
    std::int32_t* in_rank = nullptr;      // [rows, num_ranks] or null
    const std::int64_t* rank_to_node = nullptr;  // [num_ranks] or null
    std::int32_t* per_node = nullptr;     // [num_nodes] or null
    std::int64_t num_nodes = 0;
};
TopkSummary count_layout(const std::int64_t* topk_idx, std::int64_t rows, std::int64_t topk, std::int64_t num_experts,
                         std::int64_t num_ranks, const LayoutOutputs& out);

// The received layout of every rank from counts int64 [R, E] (rows each source sends to each
// expert; expert e lives on rank e / L, L = E / R): expert blocks padded to a multiple of
// alignment, each expert's rows by source rank. Writes padded int64 [R, L] (rows of local expert l
// on rank d), block_start int64 [R, L, R] (first row of block (l, source s) on rank d) and
// rows_per_rank int64 [R].
void plan_blocks(const std::int64_t* counts, std::int64_t num_ranks, std::int64_t num_experts, std::int64_t alignment,
                 std::int64_t* padded, std::int64_t* block_start, std::int64_t* rows_per_rank);

// The rows `rank` receives per local expert l and source s, from counts int64 [R, E]: writes
// recv_counts int64 [L, R] and returns their sum (the rows it receives without padding).
std::int64_t received_counts(const std::int64_t* counts, std::int64_t num_ranks, std::int64_t num_experts,
                             std::int64_t rank, std::int64_t* recv_counts);

// The rows `rank` receives from other sources, ascending, from its block starts (block_start[rank],
// int64 [L, R]) and recv_counts int64 [L, R]: blocks (local expert, source) lie expert-major.
std::vector<std::int64_t> peer_rows(const std::int64_t* rank_block_start, const std::int64_t* recv_counts,
                                    std::int64_t experts_per_rank, std::int64_t num_ranks, std::int64_t rank);

// The int32 routing arrays of rank `rank`'s intranode handle, from plan_blocks' inputs and
// outputs: rank_prefix [R, R] (entry [i][j]: rows rank j receives from ranks <= i),
// channel_prefix [R, L] (block_start[rank] transposed), expert_prefix [L] (inclusive prefix sum
// of padded[rank]) and recv_counts [L, R] (rows this rank receives per local expert and source).
struct HandleArrays {
    std::int32_t* rank_prefix;
    std::int32_t* channel_prefix;
    std::int32_t* expert_prefix;
    std::int32_t* recv_counts;
};
void handle_arrays(const std::int64_t* counts, const std::int64_t* padded, const std::int64_t* block_start,
                   std::int64_t num_ranks, std::int64_t num_experts, std::int64_t rank, const HandleArrays& out);

// Holder and row of every selection of topk_idx [rows, topk] (rows of several sources, each
// source's rows in token order): for expert e >= 0, dest_rank = e / experts_per_rank and dest_row
// = start[e][origin[r]] + taken[e][origin[r]]++ (start / taken int64 [num_experts, num_sources]);
// -1 and -1 for e < 0. The callers check ids and origins first.
void selection_destinations(const std::int64_t* topk_idx, std::int64_t rows, std::int64_t topk,
                            std::int64_t experts_per_rank, const std::int64_t* start, std::int64_t* taken,
                            std::int64_t num_sources, const std::int64_t* origin, std::int64_t* dest_rank,
                            std::int64_t* dest_row);

// A shared-memory data area holds a call's fields as consecutive regions, each of `rows` rows of
// its width and starting at a multiple of kRegionAlign bytes. Fills offsets[f] with the byte offset
// of field f's region and returns the bytes all of them take.
constexpr std::size_t kRegionAlign = 64;
std::size_t region_offsets(const std::vector<std::size_t>& widths, std::size_t rows,
                           std::vector<std::size_t>* offsets);

// One source's published rows of one round: field f at fields[f], rows of the width of output
// field f (extra fields past the outputs are read, not copied).
struct PublishedWindow {
    std::vector<const std::uint8_t*> fields;
    std::int64_t rows = 0;         // rows of this round
    std::int64_t first_token = 0;  // the source token of row 0 (unless origin_token_field says)
    std::int64_t origin_rank = 0;  // the rank the rows come from (unless origin_rank_field says)
};

// Where a rank's selections land, over the experts [expert_begin, expert_begin + span) and
// num_sources source ranks: selection (e, s) goes to row start[e'][s] + taken[e'][s]++ (e' = e -
// expert_begin), so rows of one (expert, source) keep their order. start / taken: int64 [span,
// num_sources]; taken is updated.
struct PullPlan {
    std::int64_t topk = 0, expert_begin = 0, span = 0, num_sources = 0;
    const std::int64_t* start = nullptr;
    std::int64_t* taken = nullptr;
    int topk_field = 0;            // the int64 [rows, topk] field of global expert ids
    int origin_rank_field = -1;    // >= 0: an int64 field giving each row's source rank
    int origin_token_field = -1;   // >= 0: an int64 field giving each row's source token
    bool localize_topk = false;    // the copied top-k ids become local ids (see localize_experts)
};

// An output field: rows of `width` bytes, contiguous.
struct RowField {
    std::uint8_t* data = nullptr;
    std::size_t width = 0;
};

// A receiver's dispatch of one round, in one call: places the selections of every window (windows
// in order, rows in order, k ascending) and copies every output
// field of each placed row; src_rank / src_idx / src_k [out_rows] get the row's source rank, source
// token and top-k column. std::out_of_range (before any row is copied) if a source rank or an
// output row falls outside its range. Returns the rows placed.
std::int64_t pull_selections(const std::vector<PublishedWindow>& windows, const PullPlan& plan,
                             const std::vector<RowField>& outs, std::int64_t out_rows, std::int64_t* src_rank,
                             std::int64_t* src_idx, std::int64_t* src_k, int num_threads);

// In place: global expert ids -> local ids [0, experts_per_rank) of the rank whose first
// expert is expert_begin; every other id (and -1) becomes -1.
void localize_experts(std::int64_t* topk_idx, std::size_t n, std::int64_t expert_begin, std::int64_t experts_per_rank);

}  // namespace deep_ep
