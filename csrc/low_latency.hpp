// Kernels of low-latency mode (deep_ep/transport/shm_low_latency.py): fixed slots per
// (local expert, source rank) in every receiver's shared memory, double-buffered.
//
// A source publishes each of its tokens once, in its own segment: token rows [Nmax, row_bytes]
// (the int8 q, or the 16-bit x row) and, for int8, scales [Nmax] float32. For every selection of
// an expert of receiver d it writes the reference (token, k) into d's slot area: for block
// b = l * num_ranks + source (local expert l), slots [b * max_tokens, (b + 1) * max_tokens) of
// int32 pairs. The receiver packs by following the references: one copy per received row.
// The callers (the bindings) check every index against the sizes before any byte moves.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels.hpp"

namespace deep_ep {

// Routing of one rank's tokens (deep_ep/layout.py): slot[t, k] = how many selections before (t, k),
// in (token, k) order, name expert topk_idx[t, k] (-1 where topk_idx is -1); counts[e] = selections
// of e. A row may name an expert more than once: each selection gets its own slot. Throws
// std::invalid_argument for an id outside [-1, num_experts).
void expert_slots(const std::int64_t* topk_idx, std::size_t tokens, std::size_t topk, std::int64_t num_experts,
                  std::int64_t* slot, std::int64_t* counts);

// Dispatch send: publishes this rank's tokens into its own token area (quantizing each once with
// quantize) and writes reference (t, k) into slot slot[t, k] of block (e % L, rank) of receiver
// e / L's slot area (infos[receiver]) for every expert e = topk_idx[t, k] >= 0.
void ll_send_tokens(const void* x, Dtype dtype, bool quantize, std::size_t tokens, std::size_t hidden,
                    std::size_t topk, const std::int64_t* topk_idx, const std::int64_t* slot,
                    std::size_t experts_per_rank, std::size_t num_ranks, std::size_t rank, std::size_t max_tokens,
                    std::uint8_t* token_rows, float* token_scales, const std::vector<std::int32_t*>& infos,
                    int num_threads);

// Dispatch receive: block b's first counts[b] references go to packed rows
// [ends[b] - counts[b], ends[b]), copying token rows (and scales) from the source's token area
// (rows[source], scales[source]); out_info [out_rows, 3] gets (source rank, source token, k) per
// row and -1 past ends[blocks - 1].
void ll_pack(const std::int32_t* info, const std::vector<const std::uint8_t*>& rows,
             const std::vector<const float*>& scales, std::size_t row_bytes, const std::int64_t* counts,
             const std::int64_t* ends, std::size_t blocks, std::size_t num_ranks, std::size_t max_tokens,
             std::uint8_t* out, float* out_scales, std::int32_t* out_info, std::size_t out_rows, int num_threads);

// Combine send: packed row i goes to row (token * topk + k) of receiver `source`, where
// (source, token, k) = info[i]; rows whose receiver's dests entry is null stay where they are.
void ll_return_rows(const std::uint8_t* x, std::size_t row_bytes, std::size_t rows, const std::int32_t* info,
                    std::size_t topk, const std::vector<std::uint8_t*>& dests, int num_threads);

// Writes header (+ extra[d * extra_words ...]) at header_addrs[d], then release-stores `value`
// at signal_addrs[d]: peer d may read everything written before once it sees the value.
void ll_publish(const std::vector<std::uintptr_t>& header_addrs, const std::vector<std::int64_t>& header,
                const std::int64_t* extra, std::size_t extra_words, const std::vector<std::uintptr_t>& signal_addrs,
                std::uint64_t value);

}  // namespace deep_ep
