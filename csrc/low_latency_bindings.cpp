// Python bindings of the low-latency kernels (registered into deep_ep_cpp by module.cpp).
// Every index that comes from Python or from a peer's shared memory is checked here, before
// any byte moves.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "bindings.hpp"
#include "low_latency.hpp"
#include "sync.hpp"

namespace py = pybind11;

namespace deep_ep {

namespace {

template <typename T>
T* pointer(std::uintptr_t addr) {
    return reinterpret_cast<T*>(addr);
}

// Lets Ctrl-C interrupt a long wait.
void check_python_signals() {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
}

// The waits of one call: the node's NodeSync, the deadline and the operation named on a timeout.
struct Wait {
    NodeSync& sync;
    double timeout_s;
    const std::string& what;

    // Waits (GIL released) until every local peer i has stored at least `value` at addrs[i].
    void until(const std::vector<std::uintptr_t>& addrs, std::uint64_t value) const {
        if (addrs.size() != sync.arrivals_ns().size())
            throw py::value_error(what + ": one address per local rank is needed");
        const std::vector<std::uint64_t> targets(addrs.size(), value);
        std::vector<int> owners(addrs.size());
        for (std::size_t i = 0; i < owners.size(); ++i) owners[i] = static_cast<int>(i);
        py::gil_scoped_release release;
        sync.wait_at_least(addrs, targets, owners, timeout_s, what, check_python_signals);
    }

    // until(signals, seq), then whether every source's header (at signal + header_offset) agrees
    // with `mine` on its first `compared` words.
    bool headers_agree(const std::vector<std::uintptr_t>& signals, std::uint64_t seq, std::size_t header_offset,
                       const std::vector<std::int64_t>& mine, std::size_t compared) const {
        if (compared > mine.size()) throw py::value_error(what + ": more header words compared than given");
        until(signals, seq);
        for (std::uintptr_t addr : signals) {
            const auto* header = pointer<const std::int64_t>(addr + header_offset);
            for (std::size_t i = 0; i < compared; ++i)
                if (header[i] != mine[i]) return false;
        }
        return true;
    }
};

void publish_checked(const std::vector<std::uintptr_t>& header_addrs, const std::vector<std::int64_t>& header,
                     const std::int64_t* extra, std::size_t extra_words,
                     const std::vector<std::uintptr_t>& signal_addrs, std::uint64_t value) {
    if (header_addrs.size() != signal_addrs.size())
        throw py::value_error("ll_publish: header_addrs and signal_addrs differ in length");
    ll_publish(header_addrs, header, extra, extra_words, signal_addrs, value);
}

}  // namespace

void register_low_latency(py::module_& m) {
    m.def(
        "expert_slots",
        [](const Array<std::int64_t>& topk_idx, std::size_t tokens, std::size_t topk, std::int64_t num_experts) {
            if (num_experts <= 0) throw py::value_error("expert_slots: num_experts must be positive");
            const auto* idx = checked_data(topk_idx, tokens * topk, "topk_idx");
            py::array_t<std::int64_t> slot(static_cast<py::ssize_t>(tokens * topk));
            py::array_t<std::int64_t> counts(static_cast<py::ssize_t>(num_experts));
            expert_slots(idx, tokens, topk, num_experts, slot.mutable_data(), counts.mutable_data());
            return py::make_tuple(slot, counts);
        },
        py::arg("topk_idx"), py::arg("tokens"), py::arg("topk"), py::arg("num_experts"),
        "(slot int64 [T*K], counts int64 [E]): slot[t,k] = selections before (t, k) of expert topk_idx[t,k] "
        "(-1 for -1); counts: selections per expert; ValueError for ids outside [-1, E).");

    m.def(
        "ll_dispatch_send",
        [](NodeSync& sync, double timeout_s, const std::string& what, const std::vector<std::uintptr_t>& ack_addrs,
           std::uint64_t previous, std::uintptr_t x, int dtype, bool quantize, std::size_t tokens, std::size_t hidden,
           std::size_t topk, const Array<std::int64_t>& topk_idx, const Array<std::int64_t>& slot,
           std::size_t experts_per_rank, std::size_t rank, std::size_t max_tokens, std::uintptr_t token_rows,
           std::uintptr_t token_scales, const std::vector<std::uintptr_t>& info_addrs,
           const std::vector<std::int64_t>& header, const std::vector<std::uintptr_t>& header_addrs,
           const Array<std::int64_t>& counts, const std::vector<std::uintptr_t>& signal_addrs, std::uint64_t value,
           int num_threads) {
            const std::size_t num_ranks = info_addrs.size();
            if (header_addrs.size() != num_ranks)
                throw py::value_error("ll_dispatch_send: one header address per rank is needed");
            if (experts_per_rank == 0 || rank >= num_ranks || tokens > max_tokens)
                throw py::value_error("ll_dispatch_send: bad sizes");
            const Dtype type = to_dtype(dtype);
            if (!quantize && dtype_size(type) != 2)
                throw py::value_error("ll_dispatch_send: only 16-bit rows travel unquantized");
            const auto* idx = checked_data(topk_idx, tokens * topk, "topk_idx");
            const auto* slots = checked_data(slot, tokens * topk, "slot");
            const auto* count = checked_data(counts, num_ranks * experts_per_rank, "counts");
            const auto experts = static_cast<std::int64_t>(num_ranks * experts_per_rank);
            for (std::size_t i = 0; i < tokens * topk; ++i) {
                if (idx[i] < -1 || idx[i] >= experts)
                    throw py::index_error("ll_dispatch_send: expert " + std::to_string(idx[i]) + " out of range");
                if (idx[i] >= 0 && (slots[i] < 0 || slots[i] >= static_cast<std::int64_t>(max_tokens)))
                    throw py::index_error("ll_dispatch_send: slot " + std::to_string(slots[i]) + " out of range");
            }
            // Every owner has consumed the call before the previous one on this parity.
            if (previous > 0) Wait{sync, timeout_s, what}.until(ack_addrs, previous);
            std::vector<std::int32_t*> infos;
            for (auto a : info_addrs) infos.push_back(pointer<std::int32_t>(a));
            py::gil_scoped_release release;
            ll_send_tokens(pointer<const void>(x), type, quantize, tokens, hidden, topk, idx, slots,
                           experts_per_rank, num_ranks, rank, max_tokens, pointer<std::uint8_t>(token_rows),
                           pointer<float>(token_scales), infos, num_threads);
            publish_checked(header_addrs, header, count, experts_per_rank, signal_addrs, value);
        },
        py::arg("sync"), py::arg("timeout_s"), py::arg("what"), py::arg("ack_addrs"), py::arg("previous"),
        py::arg("x"), py::arg("dtype"), py::arg("quantize"), py::arg("tokens"), py::arg("hidden"), py::arg("topk"),
        py::arg("topk_idx"), py::arg("slot"), py::arg("experts_per_rank"), py::arg("rank"), py::arg("max_tokens"),
        py::arg("token_rows"), py::arg("token_scales"), py::arg("info_addrs"), py::arg("header"),
        py::arg("header_addrs"), py::arg("counts"), py::arg("signal_addrs"), py::arg("value"),
        py::arg("num_threads") = 1,
        "Waits until every owner acked call `previous` (0: no wait; RuntimeError naming the ranks after "
        "timeout_s), publishes this rank's token rows (int8-quantized with `quantize`) into its token area, "
        "writes the (token, k) reference of every selection into its receiver's slot, then each receiver's "
        "header and counts, then release-stores `value` into each receiver's signal word.");

    m.def(
        "ll_dispatch_receive",
        [](NodeSync& sync, double timeout_s, const std::string& what, const std::vector<std::uintptr_t>& signal_addrs,
           std::uint64_t seq, const std::vector<std::int64_t>& header, std::size_t compared, std::size_t header_offset,
           std::size_t counts_offset, std::uintptr_t info, const std::vector<std::uintptr_t>& row_addrs,
           const std::vector<std::uintptr_t>& scale_addrs, std::size_t row_bytes, std::size_t topk,
           std::size_t experts_per_rank, std::size_t max_tokens, std::uintptr_t out, std::uintptr_t out_scales,
           py::array_t<std::int32_t, py::array::c_style> out_info, py::array_t<std::int64_t, py::array::c_style> ends,
           py::array_t<std::int64_t, py::array::c_style> recv_count, const std::vector<std::uintptr_t>& ack_addrs,
           int num_threads) -> std::int64_t {
            const std::size_t num_ranks = row_addrs.size();
            const std::size_t blocks = experts_per_rank * num_ranks;
            if (num_ranks == 0 || signal_addrs.size() != num_ranks || ack_addrs.size() != num_ranks ||
                (!scale_addrs.empty() && scale_addrs.size() != num_ranks))
                throw py::value_error("ll_dispatch_receive: one mailbox and token area per rank is needed");
            if (static_cast<std::size_t>(ends.size()) != blocks ||
                static_cast<std::size_t>(recv_count.size()) != experts_per_rank)
                throw py::value_error("ll_dispatch_receive: ends must hold L * R and recv_count L entries");
            const auto out_rows = static_cast<std::size_t>(out_info.size()) / 3;
            if (static_cast<std::size_t>(out_info.size()) != 3 * out_rows)
                throw py::value_error("ll_dispatch_receive: out_info must be [rows, 3]");
            if (!Wait{sync, timeout_s, what}.headers_agree(signal_addrs, seq, header_offset, header, compared))
                return -1;
            // Rows of block b = l * R + s (local expert l, source s): what s wrote into its mailbox.
            std::vector<std::int64_t> counts(blocks);
            auto* end = ends.mutable_data();
            auto* per_expert = recv_count.mutable_data();
            const auto* refs = pointer<const std::int32_t>(info);
            std::int64_t total = 0;
            for (std::size_t l = 0; l < experts_per_rank; ++l) {
                per_expert[l] = 0;
                for (std::size_t source = 0; source < num_ranks; ++source) {
                    const std::size_t b = l * num_ranks + source;
                    const std::int64_t n = pointer<const std::int64_t>(signal_addrs[source] + counts_offset)[l];
                    if (n < 0 || n > static_cast<std::int64_t>(max_tokens))
                        throw py::index_error("ll_dispatch_receive: rank " + std::to_string(source) + " sent " +
                                              std::to_string(n) + " rows to local expert " + std::to_string(l) +
                                              ", outside [0, max_tokens]");
                    // The references come from a peer's writes: each must name one of its tokens.
                    for (std::int64_t i = 0; i < n; ++i) {
                        const std::int32_t* ref = refs + 2 * (b * max_tokens + static_cast<std::size_t>(i));
                        if (ref[0] < 0 || ref[0] >= static_cast<std::int64_t>(max_tokens) || ref[1] < 0 ||
                            static_cast<std::size_t>(ref[1]) >= topk)
                            throw py::index_error("ll_dispatch_receive: slot " + std::to_string(i) + " of block " +
                                                  std::to_string(b) + " names token " + std::to_string(ref[0]) +
                                                  " k " + std::to_string(ref[1]) + ", out of range");
                    }
                    counts[b] = n;
                    total += n;
                    end[b] = total;
                    per_expert[l] += n;
                }
            }
            if (total > static_cast<std::int64_t>(out_rows))
                throw py::index_error("ll_dispatch_receive: " + std::to_string(total) + " rows do not fit " +
                                      std::to_string(out_rows) + " output rows");
            auto* info_out = out_info.mutable_data();
            std::vector<const std::uint8_t*> rows;
            std::vector<const float*> scales;
            for (auto a : row_addrs) rows.push_back(pointer<const std::uint8_t>(a));
            for (auto a : scale_addrs) scales.push_back(pointer<const float>(a));
            py::gil_scoped_release release;
            ll_pack(refs, rows, scales, row_bytes, counts.data(), end, blocks, num_ranks, max_tokens,
                    pointer<std::uint8_t>(out), pointer<float>(out_scales), info_out, out_rows, num_threads);
            for (std::uintptr_t addr : ack_addrs) store_counter(addr, seq);
            return total;
        },
        py::arg("sync"), py::arg("timeout_s"), py::arg("what"), py::arg("signal_addrs"), py::arg("seq"),
        py::arg("header"), py::arg("compared"), py::arg("header_offset"), py::arg("counts_offset"), py::arg("info"),
        py::arg("row_addrs"), py::arg("scale_addrs"), py::arg("row_bytes"), py::arg("topk"),
        py::arg("experts_per_rank"), py::arg("max_tokens"), py::arg("out"), py::arg("out_scales"),
        py::arg("out_info"), py::arg("ends"), py::arg("recv_count"), py::arg("ack_addrs"), py::arg("num_threads") = 1,
        "Waits until every source signalled call `seq` (RuntimeError naming the ranks after timeout_s); returns "
        "-1, touching nothing, if a source's header differs from `header` in its first `compared` words. Else "
        "reads the rows per (source, local expert) from the mailboxes, writes ends (inclusive prefix per block "
        "l * R + s) and recv_count [L], packs the referenced token rows expert-major into out (and out_scales; "
        "scale_addrs empty for 16-bit rows), fills out_info [rows, 3], release-stores `seq` into every ack "
        "address and returns the number of packed rows.");

    m.def(
        "ll_combine_send",
        [](NodeSync& sync, double timeout_s, const std::string& what, const std::vector<std::uintptr_t>& ack_addrs,
           std::uint64_t previous, std::uintptr_t x, std::size_t row_bytes, std::size_t rows,
           const Array<std::int32_t>& info, std::size_t topk, const std::vector<std::uintptr_t>& dest_addrs,
           std::size_t dest_rows, const std::vector<std::int64_t>& header,
           const std::vector<std::uintptr_t>& header_addrs, const std::vector<std::uintptr_t>& signal_addrs,
           std::uint64_t value, std::size_t me, py::array_t<std::int64_t, py::array::c_style> own_rows,
           bool in_place, const Array<std::int64_t>& extra, std::size_t extra_words, int num_threads) {
            const auto* source = checked_data(info, 3 * rows, "info");
            if (me >= dest_addrs.size()) throw py::value_error("ll_combine_send: me is not a rank index");
            const auto* extra_data = checked_data(extra, dest_addrs.size() * extra_words, "extra");
            for (std::size_t i = 0; i < rows; ++i) {
                const std::int32_t* s = source + 3 * i;
                if (s[0] < 0 || static_cast<std::size_t>(s[0]) >= dest_addrs.size() || s[1] < 0 || s[2] < 0 ||
                    static_cast<std::size_t>(s[2]) >= topk ||
                    static_cast<std::size_t>(s[1]) * topk + static_cast<std::size_t>(s[2]) >= dest_rows)
                    throw py::index_error("ll_combine_send: row " + std::to_string(i) + " names rank " +
                                          std::to_string(s[0]) + " token " + std::to_string(s[1]) + " k " +
                                          std::to_string(s[2]) + ", out of range");
            }
            std::vector<std::uint8_t*> dests;
            for (auto a : dest_addrs) dests.push_back(pointer<std::uint8_t>(a));
            if (own_rows.size() > 0) {  // this rank's own rows stay in x: own_rows[t * topk + k] = i
                auto* own = own_rows.mutable_data();
                const auto n = static_cast<std::size_t>(own_rows.size());
                std::fill(own, own + n, -1);
                for (std::size_t i = 0; i < rows; ++i) {
                    const std::int32_t* s = source + 3 * i;
                    if (static_cast<std::size_t>(s[0]) != me) continue;
                    const std::size_t row = static_cast<std::size_t>(s[1]) * topk + static_cast<std::size_t>(s[2]);
                    if (row >= n)
                        throw py::index_error("ll_combine_send: row " + std::to_string(i) + " names own token " +
                                              std::to_string(s[1]) + ", outside own_rows");
                    own[row] = static_cast<std::int64_t>(i);
                }
                dests[me] = nullptr;
            }
            if (previous > 0) Wait{sync, timeout_s, what}.until(ack_addrs, previous);
            py::gil_scoped_release release;
            if (!in_place)
                ll_return_rows(pointer<const std::uint8_t>(x), row_bytes, rows, source, topk, dests, num_threads);
            publish_checked(header_addrs, header, extra_data, extra_words, signal_addrs, value);
        },
        py::arg("sync"), py::arg("timeout_s"), py::arg("what"), py::arg("ack_addrs"), py::arg("previous"),
        py::arg("x"), py::arg("row_bytes"), py::arg("rows"), py::arg("info"), py::arg("topk"),
        py::arg("dest_addrs"), py::arg("dest_rows"), py::arg("header"), py::arg("header_addrs"),
        py::arg("signal_addrs"), py::arg("value"), py::arg("me"), py::arg("own_rows"), py::arg("in_place"),
        py::arg("extra"), py::arg("extra_words"), py::arg("num_threads") = 1,
        "Waits until every owner acked call `previous` (0: no wait), writes packed row i into row "
        "token*topk+k of rank `source` ((source, token, k) = info[i]) unless `in_place` (the rows stay in x, "
        "where the owners read them), then publishes the header with extra[d] (int64 [R, extra_words]) "
        "for owner d and release-stores `value` into every signal word. With a non-empty own_rows "
        "(int64 [T * topk], this rank's tokens) the rows of source `me` are not copied: "
        "own_rows[token*topk+k] = i (-1 elsewhere).");

    m.def(
        "ll_combine_receive",
        [](NodeSync& sync, double timeout_s, const std::string& what, const std::vector<std::uintptr_t>& signal_addrs,
           std::uint64_t seq, const std::vector<std::int64_t>& header, std::size_t compared, std::size_t header_offset,
           std::uintptr_t rows, std::size_t num_rows, int dtype, std::size_t tokens, std::size_t topk,
           std::size_t hidden, const Array<std::int32_t>& dropped, const Array<float>& weights, std::uintptr_t out,
           std::uintptr_t own, const Array<std::int64_t>& own_rows, std::size_t own_count,
           std::size_t placement_offset, const std::vector<std::uintptr_t>& in_place_rows,
           std::size_t in_place_count, const Array<std::int64_t>& topk_idx, const Array<std::int64_t>& slot,
           std::size_t experts_per_rank, const std::vector<std::uintptr_t>& ack_addrs, int sums, int num_threads) {
            const std::size_t n = tokens * topk;
            const std::size_t holders = signal_addrs.size();
            if (in_place_rows.size() != holders || experts_per_rank == 0)
                throw py::value_error("ll_combine_receive: one in-place area per holder, experts_per_rank > 0");
            const auto* expert = checked_data(topk_idx, n, "topk_idx");
            const auto* slots = checked_data(slot, n, "slot");
            if (n > num_rows) throw py::value_error("ll_combine_receive: tokens * topk rows exceed the area");
            const std::int64_t* own_row = own_rows.size() ? checked_data(own_rows, n, "own_rows") : nullptr;
            if (own_row != nullptr)
                for (std::size_t i = 0; i < n; ++i)
                    if (own_row[i] >= static_cast<std::int64_t>(own_count))
                        throw py::index_error("ll_combine_receive: own row " + std::to_string(own_row[i]) +
                                              " outside x's " + std::to_string(own_count) + " rows");
            const Dtype type = to_dtype(dtype);
            if (dtype_size(type) != 2) throw py::value_error("ll_combine_receive: rows must be 16-bit");
            const Dtype sum_type = to_dtype(sums, true);
            if (sum_type != Dtype::Float32 && sum_type != Dtype::Float64)
                throw py::value_error("ll_combine_receive: sums must be the code of float32 or float64");
            const auto* drop = checked_data(dropped, n, "dropped");
            const auto* w = checked_data(weights, n, "weights");
            if (!Wait{sync, timeout_s, what}.headers_agree(signal_addrs, seq, header_offset, header, compared))
                return false;
            // A holder that left its rows in place (its zero-copy buffer) wrote 1 and then, per local
            // expert l, the first row of block (l, this rank) of its packed layout into this rank's
            // mailbox; one that copied them wrote 0.
            std::vector<const std::int64_t*> block_first(holders, nullptr);
            for (std::size_t h = 0; h < holders; ++h) {
                const auto* words = pointer<const std::int64_t>(signal_addrs[h] + placement_offset);
                if (words[0] == 1) block_first[h] = words + 1;
            }
            // Selection i = t * topk + k: row i of the return area, or row own_row[i] of x (kept there
            // by ll_combine_send), or row block_first[l] + slot[i] of its holder's in-place rows, or
            // nothing where dropped.
            std::vector<const std::uint8_t*> sources = {pointer<const std::uint8_t>(rows),
                                                        pointer<const std::uint8_t>(own)};
            for (std::uintptr_t area : in_place_rows) sources.push_back(pointer<const std::uint8_t>(area));
            std::vector<std::int32_t> source(n);
            std::vector<std::int64_t> row(n);
            for (std::size_t i = 0; i < n; ++i) {
                const std::size_t h = drop[i] < 0 ? 0 : static_cast<std::size_t>(expert[i]) / experts_per_rank;
                if (drop[i] >= 0 && (expert[i] < 0 || h >= holders))
                    throw py::index_error("ll_combine_receive: expert " + std::to_string(expert[i]) + " has no holder");
                if (drop[i] >= 0 && block_first[h] != nullptr) {
                    const std::int64_t r = block_first[h][static_cast<std::size_t>(expert[i]) % experts_per_rank] + slots[i];
                    if (r < 0 || r >= static_cast<std::int64_t>(in_place_count))
                        throw py::index_error("ll_combine_receive: holder " + std::to_string(h) + " places a row at " +
                                              std::to_string(r) + ", outside its " + std::to_string(in_place_count));
                    source[i] = static_cast<std::int32_t>(2 + h);
                    row[i] = r;
                    continue;
                }
                const bool kept = own_row != nullptr && own_row[i] >= 0;
                source[i] = drop[i] < 0 ? -1 : (kept ? 1 : 0);
                row[i] = kept ? own_row[i] : static_cast<std::int64_t>(i);
            }
            {
                py::gil_scoped_release release;
                combine_reduce(pointer<void>(out), type, tokens, topk, hidden, sources,
                               std::vector<Dtype>(sources.size(), type), source.data(), row.data(), w, Bias{}, Bias{},
                               sum_type, num_threads);
            }
            for (std::uintptr_t addr : ack_addrs) store_counter(addr, seq);
            return true;
        },
        py::arg("sync"), py::arg("timeout_s"), py::arg("what"), py::arg("signal_addrs"), py::arg("seq"),
        py::arg("header"), py::arg("compared"), py::arg("header_offset"), py::arg("rows"), py::arg("num_rows"),
        py::arg("dtype"), py::arg("tokens"), py::arg("topk"), py::arg("hidden"), py::arg("dropped"),
        py::arg("weights"), py::arg("out"), py::arg("own"), py::arg("own_rows"), py::arg("own_count"),
        py::arg("placement_offset"), py::arg("in_place_rows"), py::arg("in_place_count"), py::arg("topk_idx"),
        py::arg("slot"), py::arg("experts_per_rank"), py::arg("ack_addrs"), py::arg("sums"), py::arg("num_threads") = 1,
        "Waits until every holder signalled call `seq` (RuntimeError naming the ranks after timeout_s); returns "
        "False, touching nothing, if a header differs from `header` in its first `compared` words. Else "
        "out[t] (16-bit `dtype`) = sum over k ascending, where dropped[t, k] >= 0, of weights[t, k] * row "
        "t * topk + k of `rows` (row own_rows[t, k] of `own`, this rank's x of own_count rows, where that "
        "is >= 0; own_rows may be empty), summed as combine_reduce does in sums of dtype code `sums`; a "
        "holder whose mailbox says it left its rows in place (word 1 at placement_offset, then the first row "
        "of block (l, this rank) per local expert l) is read there instead: row block_first[l] + slot[t, k] "
        "of in_place_rows[holder] (in_place_count rows), l and the holder from topk_idx [T, topk] (the "
        "dispatch's ids). Then "
        "release-stores `seq` into every ack address and returns True.");

    m.def(
        "ll_publish",
        [](const std::vector<std::uintptr_t>& header_addrs, const std::vector<std::int64_t>& header,
           const std::vector<std::uintptr_t>& signal_addrs, std::uint64_t value) {
            publish_checked(header_addrs, header, nullptr, 0, signal_addrs, value);
        },
        py::arg("header_addrs"), py::arg("header"), py::arg("signal_addrs"), py::arg("value"),
        "Writes the header at every header address, then release-stores `value` into every signal word.");

    m.def(
        "store_counters",
        [](const std::vector<std::uintptr_t>& addrs, std::uint64_t value) {
            for (std::uintptr_t addr : addrs) store_counter(addr, value);
        },
        py::arg("addrs"), py::arg("value"), "Release-stores `value` into every counter.");
}

}  // namespace deep_ep
