// deep_ep_cpp: the native core of deep_ep's CPU transport.
// Tensors cross this boundary as addresses plus sizes (no torch C++ headers), so
// one build serves every torch version; index arrays arrive as numpy arrays and
// are bounds-checked here before any byte moves.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "bindings.hpp"
#include "kernels.hpp"
#include "routing.hpp"
#include "shared_memory.hpp"
#include "sync.hpp"
#include "x86_blocks.hpp"

namespace py = pybind11;
using namespace deep_ep;

namespace deep_ep {
// Low-latency mode kernels (low_latency_bindings.cpp).
void register_low_latency(py::module_& m);
}  // namespace deep_ep

namespace {

std::vector<const std::uint8_t*> to_pointers(const std::vector<std::uintptr_t>& addrs) {
    std::vector<const std::uint8_t*> out;
    for (auto a : addrs) out.push_back(reinterpret_cast<const std::uint8_t*>(a));
    return out;
}

// Indices of (rank, row) pairs must name an existing row of an existing source.
void check_sources(const std::int32_t* rank, const std::int64_t* row, std::size_t n,
                   const std::vector<std::int64_t>& src_rows, bool allow_negative_rank, const char* what) {
    for (std::size_t i = 0; i < n; ++i) {
        if (rank[i] < 0 && allow_negative_rank) continue;
        if (rank[i] < 0 || static_cast<std::size_t>(rank[i]) >= src_rows.size() || row[i] < 0 ||
            row[i] >= src_rows[rank[i]])
            throw py::index_error(std::string(what) + ": entry " + std::to_string(i) + " names source " +
                                  std::to_string(rank[i]) + " row " + std::to_string(row[i]) + ", out of range");
    }
}

// Expert ids must lie in [-1, num_experts).
void check_expert_ids(const std::int64_t* idx, std::int64_t n, std::int64_t num_experts, const char* what) {
    for (std::int64_t i = 0; i < n; ++i)
        if (idx[i] < -1 || idx[i] >= num_experts)
            throw py::index_error(std::string(what) + ": expert " + std::to_string(idx[i]) + " out of range");
}

// Lets Ctrl-C interrupt a long wait.
void poll_python_signals() {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
}

}  // namespace

PYBIND11_MODULE(deep_ep_cpp, m) {
    m.doc() = "deep_ep native core: shared-memory segments, node barriers and row kernels";
    register_low_latency(m);

    py::class_<SharedMemory>(m, "SharedMemory", py::buffer_protocol())
        .def(py::init<const std::string&, std::size_t, bool, std::size_t>(), py::arg("name"), py::arg("size"),
             py::arg("create"), py::arg("committed"),
             "Creates (create=True) or maps a segment of `size` bytes; the creator reserves its first "
             "`committed` bytes in /dev/shm.")
        .def("unlink", &SharedMemory::unlink)
        .def("close", &SharedMemory::close)
        .def("commit", &SharedMemory::commit, py::arg("offset"), py::arg("length"),
             "Creator only: reserves [offset, offset + length) in /dev/shm (RuntimeError when it is full).")
        .def_property_readonly("fd", &SharedMemory::fd)
        .def_property_readonly("address", &SharedMemory::address)
        .def_property_readonly("size", &SharedMemory::size)
        .def_property_readonly("name", &SharedMemory::name)
        .def_buffer([](SharedMemory& shm) -> py::buffer_info {
            if (!shm.is_open()) throw py::value_error("shared memory " + shm.name() + " is closed");
            return py::buffer_info(shm.data(), 1, py::format_descriptor<std::uint8_t>::format(), 1,
                                   {static_cast<py::ssize_t>(shm.size())}, {1});
        });

    py::class_<NodeSync>(m, "NodeSync")
        .def(py::init<std::vector<std::uintptr_t>, int, std::vector<int>, std::vector<std::int64_t>>(),
             py::arg("counter_addrs"), py::arg("my_index"), py::arg("global_ranks"), py::arg("pids"))
        .def(
            "barrier",
            [](NodeSync& sync, double timeout_s, const std::string& what) {
                py::gil_scoped_release release;
                sync.barrier(timeout_s, what, poll_python_signals);
            },
            py::arg("timeout_s"), py::arg("what"))
        .def(
            "wait_at_least",
            [](NodeSync& sync, const std::vector<std::uintptr_t>& addrs, const std::vector<std::uint64_t>& targets,
               const std::vector<int>& owners, double timeout_s, const std::string& what) {
                if (addrs.size() != targets.size() || addrs.size() != owners.size())
                    throw py::value_error("wait_at_least: addrs, targets and owners differ in length");
                for (int owner : owners)
                    if (owner < 0 || owner >= static_cast<int>(sync.arrivals_ns().size()))
                        throw py::value_error("wait_at_least: owner index out of range");
                py::gil_scoped_release release;
                sync.wait_at_least(addrs, targets, owners, timeout_s, what, poll_python_signals);
            },
            py::arg("addrs"), py::arg("targets"), py::arg("owners"), py::arg("timeout_s"), py::arg("what"))
        .def(
            "publish",
            [](NodeSync& sync, const std::vector<std::uintptr_t>& release_addrs, const std::vector<int>& owners,
               std::uint64_t reads, std::uintptr_t meta_address, std::optional<std::int64_t> status,
               const Array<std::int64_t>& words,
               const std::vector<std::tuple<std::uintptr_t, std::uintptr_t, std::size_t>>& copies, int num_threads,
               double timeout_s, const std::string& what) {
                if (release_addrs.size() != owners.size())
                    throw py::value_error("publish: release_addrs and owners differ in length");
                for (int owner : owners)
                    if (owner < 0 || owner >= static_cast<int>(sync.arrivals_ns().size()))
                        throw py::value_error("publish: owner index out of range");
                const std::vector<std::uint64_t> targets(release_addrs.size(), reads);
                const auto* data = words.data();
                const auto nbytes = static_cast<std::size_t>(words.size()) * sizeof(std::int64_t);
                py::gil_scoped_release release;
                sync.wait_at_least(release_addrs, targets, owners, timeout_s, what, poll_python_signals);
                if (status) {
                    auto* meta = reinterpret_cast<std::int64_t*>(meta_address);
                    meta[0] = *status;
                    std::memcpy(meta + 1, data, nbytes);
                }
                for (const auto& [dst, src, size] : copies)
                    copy_bytes(reinterpret_cast<std::uint8_t*>(dst), reinterpret_cast<const std::uint8_t*>(src), size,
                               num_threads);
            },
            py::arg("release_addrs"), py::arg("owners"), py::arg("reads"), py::arg("meta_address"), py::arg("status"),
            py::arg("words"), py::arg("copies"), py::arg("num_threads"), py::arg("timeout_s"), py::arg("what"),
            "Waits until every counter at release_addrs (written by local peer owners[i]) reaches `reads`, then "
            "(unless status is None) writes the status word and then `words` (int64) at meta_address, and makes "
            "the (dst, src, nbytes) copies: one call per published exchange.")
        .def(
            "gather",
            [](NodeSync& sync, const std::vector<std::uintptr_t>& meta_addrs, std::int64_t words,
               const Array<std::int64_t>& agreed, double timeout_s, const std::string& what) {
                if (meta_addrs.size() != sync.arrivals_ns().size() || words < 1)
                    throw py::value_error("gather: one meta address per local rank and words >= 1 expected");
                const auto* fields = agreed.data();
                const auto num_agreed = static_cast<std::size_t>(agreed.size());
                for (std::size_t j = 0; j < num_agreed; ++j)
                    if (fields[j] < 0 || fields[j] >= words - 1)
                        throw py::value_error("gather: agreed field index out of range");
                const auto ranks = static_cast<py::ssize_t>(meta_addrs.size());
                py::array_t<std::int64_t> out({ranks, static_cast<py::ssize_t>(words)});
                auto* dst = out.mutable_data();
                int outcome = 0;
                {
                    py::gil_scoped_release release;
                    sync.barrier(timeout_s, what, poll_python_signals);
                    for (std::size_t i = 0; i < meta_addrs.size(); ++i)
                        std::memcpy(dst + i * words, reinterpret_cast<const void*>(meta_addrs[i]),
                                    static_cast<std::size_t>(words) * sizeof(std::int64_t));
                    // Word 0 of every meta is its status; the header fields follow it.
                    for (py::ssize_t i = 0; i < ranks && outcome == 0; ++i)
                        if (dst[i * words] != 0) outcome = 1;
                    for (py::ssize_t i = 1; i < ranks && outcome == 0; ++i)
                        for (std::size_t j = 0; j < num_agreed; ++j)
                            if (dst[i * words + 1 + fields[j]] != dst[1 + fields[j]]) outcome = 2;
                }
                return py::make_tuple(out, outcome);
            },
            py::arg("meta_addrs"), py::arg("words"), py::arg("agreed"), py::arg("timeout_s"), py::arg("what"),
            "barrier(), then the first `words` int64 at every local rank's meta address: (int64 [local ranks, "
            "words], outcome). Word 0 of a meta is its status; outcome is 1 when a status is non-zero, else 2 "
            "when the ranks' field agreed[j] (word 1 + agreed[j]) differs for some j, else 0.")
        .def_property_readonly("generation", &NodeSync::generation)
        .def_property_readonly("peers_with_pidfd", &NodeSync::peers_with_pidfd)
        .def_property_readonly("arrivals_ns", &NodeSync::arrivals_ns);

    m.def(
        "getenv",
        [](const std::string& name) -> py::object {
            const char* value = std::getenv(name.c_str());
            if (value == nullptr) return py::none();
            // Decoded as os.environ decodes (the filesystem encoding, surrogateescape).
            PyObject* text = PyUnicode_DecodeFSDefault(value);
            if (text == nullptr) throw py::error_already_set();
            return py::reinterpret_steal<py::object>(text);
        },
        py::arg("name"),
        "The process environment's value of `name`, or None: what os.environ.get gives (os.environ's "
        "changes reach the C environment), in one call instead of several Python frames.");

    m.def(
        "any_set",
        [](const std::vector<std::string>& names) {
            for (const auto& name : names)
                if (std::getenv(name.c_str()) != nullptr) return true;
            return false;
        },
        py::arg("names"),
        "Whether any of `names` is in the process environment (set, even to an empty value): one call that lets "
        "the usual case, none set, skip reading them one by one.");

    m.def("store_counter", &store_counter, py::arg("addr"), py::arg("value"));
    m.def("load_counter", &load_counter, py::arg("addr"));

    m.def(
        "copy_rows",
        [](std::uintptr_t dst, std::int64_t dst_rows, std::size_t dst_stride, const std::vector<std::uintptr_t>& srcs,
           const std::vector<std::int64_t>& src_rows, std::size_t src_stride, std::size_t row_bytes,
           const Array<std::int32_t>& src_rank, const Array<std::int64_t>& src_row, const Array<std::int64_t>& dst_row,
           int num_threads) {
            if (srcs.size() != src_rows.size()) throw py::value_error("copy_rows: srcs and src_rows differ in length");
            if (row_bytes > dst_stride || row_bytes > src_stride)
                throw py::value_error("copy_rows: row_bytes exceeds a stride");
            const std::size_t n = static_cast<std::size_t>(dst_row.size());
            const auto* rank = checked_data(src_rank, n, "src_rank");
            const auto* row = checked_data(src_row, n, "src_row");
            const auto* out_row = dst_row.data();
            check_sources(rank, row, n, src_rows, false, "copy_rows");
            for (std::size_t i = 0; i < n; ++i)
                if (out_row[i] < 0 || out_row[i] >= dst_rows)
                    throw py::index_error("copy_rows: destination row " + std::to_string(out_row[i]) +
                                          " out of range [0, " + std::to_string(dst_rows) + ")");
            const auto pointers = to_pointers(srcs);
            py::gil_scoped_release release;
            copy_rows(reinterpret_cast<std::uint8_t*>(dst), dst_stride, pointers, src_stride, rank, row, out_row, n,
                      row_bytes, num_threads);
        },
        py::arg("dst"), py::arg("dst_rows"), py::arg("dst_stride"), py::arg("srcs"), py::arg("src_rows"),
        py::arg("src_stride"), py::arg("row_bytes"), py::arg("src_rank"), py::arg("src_row"), py::arg("dst_row"),
        py::arg("num_threads") = 1,
        "dst[dst_row[i]] = srcs[src_rank[i]][src_row[i]] (row_bytes each) for every i.");

    m.def(
        "copy_bytes",
        [](std::uintptr_t dst, std::uintptr_t src, std::size_t nbytes, int num_threads) {
            py::gil_scoped_release release;
            copy_bytes(reinterpret_cast<std::uint8_t*>(dst), reinterpret_cast<const std::uint8_t*>(src), nbytes,
                       num_threads);
        },
        py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("num_threads") = 1,
        "Copies nbytes from src to dst (non-overlapping) on up to num_threads threads, without torch's "
        "intra-op threads.");

    m.def(
        "expert_major_entries",
        [](const Array<std::int64_t>& topk_idx, std::int64_t tokens, std::int64_t topk, std::int64_t expert_begin,
           std::int64_t expert_end) {
            if (tokens < 0 || topk < 0 || expert_end < expert_begin)
                throw py::value_error("expert_major_entries: negative sizes or an empty expert range");
            const auto* idx = checked_data(topk_idx, static_cast<std::size_t>(tokens * topk), "topk_idx");
            const ExpertMajorSort sort(idx, tokens, topk, expert_begin, expert_end);
            const auto n = static_cast<py::ssize_t>(sort.count());
            py::array_t<std::int64_t> token(n), k(n), expert(n), within(n);
            std::int64_t* outs[] = {token.mutable_data(), k.mutable_data(), expert.mutable_data(),
                                    within.mutable_data()};
            {
                py::gil_scoped_release release;
                sort.fill(outs[0], outs[1], outs[2], outs[3]);
            }
            return py::make_tuple(token, k, expert, within);
        },
        py::arg("topk_idx"), py::arg("tokens"), py::arg("topk"), py::arg("expert_begin"), py::arg("expert_end"),
        "(token, k, expert, index within the expert) of the selections in [expert_begin, expert_end), "
        "ordered by expert then token.");

    m.def(
        "summarize_topk",
        [](const Array<std::int64_t>& topk_idx, std::int64_t rows, std::int64_t topk) {
            const auto* idx = checked_data(topk_idx, static_cast<std::size_t>(rows * topk), "topk_idx");
            TopkSummary summary;
            {
                py::gil_scoped_release release;
                summary = summarize_topk(idx, rows, topk);
            }
            return py::make_tuple(summary.min, summary.max);
        },
        py::arg("topk_idx"), py::arg("rows"), py::arg("topk"),
        "(min id, max id) of topk_idx [rows, topk].");

    m.def(
        "count_layout",
        [](std::uintptr_t topk_idx, std::int64_t rows, std::int64_t topk, std::int64_t num_experts,
           std::int64_t num_ranks, bool with_ranks, const std::optional<Array<std::int64_t>>& rank_to_node) {
            if (rows < 0 || topk < 0 || num_ranks <= 0 || num_experts <= 0 || num_experts % num_ranks)
                throw py::value_error("count_layout: negative sizes, or num_experts not a multiple of num_ranks");
            if (rank_to_node && !with_ranks) throw py::value_error("count_layout: per-node counts need with_ranks");
            // Zeroed outputs, made here: one call instead of an allocation per array in Python.
            auto zeros = [](auto array) {
                std::fill(array.mutable_data(), array.mutable_data() + array.size(), 0);
                return array;
            };
            auto per_expert = zeros(py::array_t<std::int32_t>(num_experts));
            LayoutOutputs out;
            out.per_expert = per_expert.mutable_data();
            py::object per_rank = py::none(), in_rank = py::none(), per_node = py::none();
            if (with_ranks) {
                auto ranks = zeros(py::array_t<std::int32_t>(num_ranks));
                auto in = zeros(py::array_t<std::int32_t>({rows, num_ranks}));
                out.per_rank = ranks.mutable_data();
                out.in_rank = in.mutable_data();
                per_rank = ranks;
                in_rank = in;
            }
            if (rank_to_node) {
                const auto* node = checked_data(*rank_to_node, static_cast<std::size_t>(num_ranks), "rank_to_node");
                const std::int64_t num_nodes = *std::max_element(node, node + num_ranks) + 1;
                for (std::int64_t r = 0; r < num_ranks; ++r)
                    if (node[r] < 0) throw py::value_error("count_layout: rank_to_node names a negative node");
                auto nodes = zeros(py::array_t<std::int32_t>(num_nodes));
                out.rank_to_node = node;
                out.per_node = nodes.mutable_data();
                out.num_nodes = num_nodes;
                per_node = nodes;
            }
            TopkSummary summary;
            {
                py::gil_scoped_release release;
                summary = count_layout(reinterpret_cast<const std::int64_t*>(topk_idx), rows, topk, num_experts,
                                       num_ranks, out);
            }
            return py::make_tuple(summary.min, summary.max, per_expert, per_rank, in_rank, per_node);
        },
        py::arg("topk_idx"), py::arg("rows"), py::arg("topk"), py::arg("num_experts"), py::arg("num_ranks"),
        py::arg("with_ranks"), py::arg("rank_to_node") = py::none(),
        "topk_idx: the address of a contiguous CPU int64 [rows, topk]. Returns (min id, max id, per_expert "
        "int32 [E], per_rank int32 [R], in_rank int32 [rows, R], per_node int32 [nodes]); the rank counts "
        "are None without with_ranks, the node counts None without rank_to_node (int64 [R]). Counts "
        "nothing unless the ids lie in [-1, num_experts).");

    m.def(
        "plan_routing",
        [](const Array<std::int64_t>& counts, std::int64_t num_ranks, std::int64_t num_experts, std::int64_t alignment,
           std::int64_t rank, std::uintptr_t topk_idx, std::int64_t tokens, std::int64_t topk) {
            if (num_ranks <= 0 || num_experts <= 0 || num_experts % num_ranks || alignment <= 0)
                throw py::value_error("plan_routing: num_experts must be a positive multiple of num_ranks, "
                                      "alignment positive");
            if (rank < 0 || rank >= num_ranks || tokens < 0 || topk < 0)
                throw py::value_error("plan_routing: rank out of range or negative sizes");
            const auto* data = checked_data(counts, static_cast<std::size_t>(num_ranks * num_experts), "counts");
            for (std::int64_t i = 0; i < num_ranks * num_experts; ++i)
                if (data[i] < 0) throw py::value_error("plan_routing: negative count");
            const auto* idx = reinterpret_cast<const std::int64_t*>(topk_idx);
            check_expert_ids(idx, tokens * topk, num_experts, "plan_routing");
            const std::int64_t experts_per_rank = num_experts / num_ranks;
            py::array_t<std::int64_t> padded({num_ranks, experts_per_rank});
            py::array_t<std::int64_t> block_start({num_ranks, experts_per_rank, num_ranks}), rows(num_ranks);
            py::array_t<std::int64_t> recv_counts({experts_per_rank, num_ranks});
            py::array_t<std::int64_t> dest_rank({tokens, topk}), dest_row({tokens, topk});
            py::array_t<std::int32_t> holder({tokens, topk});
            py::array_t<std::int32_t> rank_prefix({num_ranks, num_ranks});
            py::array_t<std::int32_t> channel_prefix({num_ranks, experts_per_rank}), expert_prefix(experts_per_rank);
            py::array_t<std::int32_t> recv_counts32({experts_per_rank, num_ranks});
            // Raw pointers taken with the GIL held; the passes below run without it.
            auto* padded_data = padded.mutable_data();
            auto* start = block_start.mutable_data();
            auto* received = recv_counts.mutable_data();
            auto* rank_of = dest_rank.mutable_data();
            auto* row_of = dest_row.mutable_data();
            auto* holder_of = holder.mutable_data();
            const HandleArrays handle{rank_prefix.mutable_data(), channel_prefix.mutable_data(),
                                      expert_prefix.mutable_data(), recv_counts32.mutable_data()};
            auto* rows_data = rows.mutable_data();
            std::vector<std::int64_t> others;
            std::int64_t real_rows = 0;
            {
                py::gil_scoped_release release;
                plan_blocks(data, num_ranks, num_experts, alignment, padded_data, start, rows_data);
                real_rows = received_counts(data, num_ranks, num_experts, rank, received);
                const std::vector<std::int64_t> origin(static_cast<std::size_t>(tokens), rank);
                std::vector<std::int64_t> taken(static_cast<std::size_t>(num_experts * num_ranks), 0);
                selection_destinations(idx, tokens, topk, experts_per_rank, start, taken.data(), num_ranks,
                                       origin.data(), rank_of, row_of);
                std::copy(rank_of, rank_of + tokens * topk, holder_of);
                handle_arrays(data, padded_data, start, num_ranks, num_experts, rank, handle);
                others = peer_rows(start + rank * experts_per_rank * num_ranks, received, experts_per_rank,
                                   num_ranks, rank);
            }
            py::array_t<std::int64_t> peers(static_cast<py::ssize_t>(others.size()), others.data());
            return py::make_tuple(padded, block_start, rows, recv_counts, dest_rank, dest_row, holder, peers,
                                  py::make_tuple(rank_prefix, channel_prefix, expert_prefix, recv_counts32),
                                  real_rows);
        },
        py::arg("counts"), py::arg("num_ranks"), py::arg("num_experts"), py::arg("alignment"), py::arg("rank"),
        py::arg("topk_idx"), py::arg("tokens"), py::arg("topk"),
        "The routing plan of `rank`, from counts int64 [R, E] (rows each source sends to each expert) and "
        "the address of the rank's contiguous CPU topk_idx int64 [tokens, topk]: (padded int64 [R, L], "
        "block_start int64 [R, L, R], "
        "rows_per_rank int64 [R], recv_counts int64 [L, R] (rows `rank` receives per local expert and "
        "source), dest_rank / dest_row int64 [tokens, topk] (holder and row of every selection, -1 for -1), "
        "holder int32 [tokens, topk] (dest_rank), peer_rows int64 [n] (the received rows of other sources, "
        "ascending), the intranode handle's int32 arrays (rank_prefix [R, R], channel_prefix [R, L], "
        "expert_prefix [L], recv_counts [L, R]; see handle_arrays in routing.hpp), the rows `rank` receives "
        "without padding).");

    m.def(
        "selection_destinations",
        [](const Array<std::int64_t>& topk_idx, std::int64_t rows, std::int64_t topk, std::int64_t num_experts,
           std::int64_t experts_per_rank, const Array<std::int64_t>& start, const Array<std::int64_t>& origin,
           std::int64_t num_sources) {
            if (rows < 0 || topk < 0 || num_experts < 0 || experts_per_rank <= 0 || num_sources <= 0)
                throw py::value_error("selection_destinations: negative sizes");
            const auto* idx = checked_data(topk_idx, static_cast<std::size_t>(rows * topk), "topk_idx");
            const auto* first = checked_data(start, static_cast<std::size_t>(num_experts * num_sources), "start");
            const auto* from = checked_data(origin, static_cast<std::size_t>(rows), "origin");
            check_expert_ids(idx, rows * topk, num_experts, "selection_destinations");
            for (std::int64_t r = 0; r < rows; ++r)
                if (from[r] < 0 || from[r] >= num_sources)
                    throw py::index_error("selection_destinations: origin " + std::to_string(from[r]) + " out of range");
            py::array_t<std::int64_t> dest_rank({rows, topk}), dest_row({rows, topk});
            std::vector<std::int64_t> taken(static_cast<std::size_t>(num_experts * num_sources), 0);
            std::int64_t* outs[] = {dest_rank.mutable_data(), dest_row.mutable_data()};
            {
                py::gil_scoped_release release;
                selection_destinations(idx, rows, topk, experts_per_rank, first, taken.data(), num_sources, from,
                                       outs[0], outs[1]);
            }
            return py::make_tuple(dest_rank, dest_row);
        },
        py::arg("topk_idx"), py::arg("rows"), py::arg("topk"), py::arg("num_experts"), py::arg("experts_per_rank"),
        py::arg("start"), py::arg("origin"), py::arg("num_sources"),
        "(dest_rank, dest_row) int64 [rows, topk]: holder rank and row of every selection (-1 for id -1); "
        "start int64 [num_experts, num_sources] first rows, origin int64 [rows] source ranks.");

    m.def(
        "pull_selections",
        [](const std::vector<std::tuple<std::uintptr_t, std::size_t, std::int64_t, std::int64_t, std::int64_t>>&
               windows,
           const std::vector<std::size_t>& widths, std::int64_t topk, std::int64_t expert_begin, std::int64_t span,
           std::int64_t num_sources,
           std::uintptr_t start, std::uintptr_t taken, int topk_field, int origin_rank_field, int origin_token_field,
           const std::vector<std::pair<std::uintptr_t, std::size_t>>& outs, std::int64_t out_rows,
           std::uintptr_t src_rank, std::uintptr_t src_idx, std::uintptr_t src_k, bool localize_topk, int num_threads) {
            if (topk < 0 || span < 0 || num_sources <= 0 || out_rows < 0)
                throw py::value_error("pull_selections: negative sizes");
            if (localize_topk && (topk_field >= static_cast<int>(outs.size()) ||
                                  outs[topk_field].second != static_cast<std::size_t>(topk) * sizeof(std::int64_t)))
                throw py::value_error("pull_selections: localize_topk needs the top-k field among the outputs");
            const int needed = std::max({topk_field, origin_rank_field, origin_token_field,
                                         static_cast<int>(outs.size()) - 1});
            if (static_cast<int>(widths.size()) <= needed || topk_field < 0)
                throw py::value_error("pull_selections: the windows lack a field the plan names");
            std::vector<std::size_t> offsets;
            std::vector<PublishedWindow> published;
            for (const auto& [base, capacity, rows, first_token, origin_rank] : windows) {
                if (rows < 0 || static_cast<std::size_t>(rows) > capacity)
                    throw py::value_error("pull_selections: a window's rows exceed its capacity");
                PublishedWindow window;
                region_offsets(widths, capacity, &offsets);
                for (auto offset : offsets)
                    window.fields.push_back(reinterpret_cast<const std::uint8_t*>(base + offset));
                window.rows = rows;
                window.first_token = first_token;
                window.origin_rank = origin_rank;
                published.push_back(std::move(window));
            }
            PullPlan plan;
            plan.topk = topk;
            plan.expert_begin = expert_begin;
            plan.span = span;
            plan.num_sources = num_sources;
            plan.start = reinterpret_cast<const std::int64_t*>(start);
            plan.taken = reinterpret_cast<std::int64_t*>(taken);
            plan.topk_field = topk_field;
            plan.origin_rank_field = origin_rank_field;
            plan.origin_token_field = origin_token_field;
            plan.localize_topk = localize_topk;
            std::vector<RowField> fields;
            for (const auto& [address, width] : outs) fields.push_back({reinterpret_cast<std::uint8_t*>(address), width});
            try {
                py::gil_scoped_release release;
                return pull_selections(published, plan, fields, out_rows, reinterpret_cast<std::int64_t*>(src_rank),
                                       reinterpret_cast<std::int64_t*>(src_idx),
                                       reinterpret_cast<std::int64_t*>(src_k), num_threads);
            } catch (const std::out_of_range& error) {
                throw py::index_error(error.what());
            }
        },
        py::arg("windows"), py::arg("widths"), py::arg("topk"), py::arg("expert_begin"), py::arg("span"),
        py::arg("num_sources"), py::arg("start"), py::arg("taken"), py::arg("topk_field"), py::arg("origin_rank_field"),
        py::arg("origin_token_field"), py::arg("outs"), py::arg("out_rows"), py::arg("src_rank"), py::arg("src_idx"),
        py::arg("src_k"), py::arg("localize_topk") = false, py::arg("num_threads") = 1,
        "One round of a receiver's dispatch: windows are (data-area address, capacity rows, rows, first token, "
        "origin rank) per source, whose fields of `widths` bytes per row lie as region_layout places them; "
        "start / taken int64 [span, num_sources] addresses; outs (address, width) per output field; "
        "src_rank / src_idx / src_k int64 [out_rows] addresses. Places every selection of the windows in "
        "[expert_begin, expert_begin + span) and copies its fields; with localize_topk the copied top-k ids "
        "become local ids [0, span) (-1 for other experts). Returns the rows placed.");

    m.def("vector_isa", &vector_isa,
          "The widest instruction set of the kernels' vector paths on this CPU: 'avx512', 'avx2' or 'portable' "
          "(every path gives the same bits).");

    m.attr("REGION_ALIGN") = kRegionAlign;
    m.def(
        "region_layout",
        [](const std::vector<std::size_t>& widths, std::size_t rows) {
            std::vector<std::size_t> offsets;
            const std::size_t total = region_offsets(widths, rows, &offsets);
            return py::make_tuple(offsets, total);
        },
        py::arg("widths"), py::arg("rows"),
        "(byte offsets, bytes taken) of consecutive regions of `rows` rows of each width in a shared-memory data "
        "area, each starting at a multiple of REGION_ALIGN bytes: how a sender lays out its fields and where a "
        "receiver finds them.");

    m.def(
        "localize_experts",
        [](py::array_t<std::int64_t, py::array::c_style> topk_idx, std::int64_t expert_begin,
           std::int64_t experts_per_rank) {
            auto* data = topk_idx.mutable_data();
            const auto n = static_cast<std::size_t>(topk_idx.size());
            py::gil_scoped_release release;
            localize_experts(data, n, expert_begin, experts_per_rank);
        },
        py::arg("topk_idx").noconvert(), py::arg("expert_begin"), py::arg("experts_per_rank"),
        "In place: global expert ids to local ids [0, experts_per_rank), others to -1.");

    m.def(
        "quantize_int8",
        [](std::uintptr_t x, int dtype, std::size_t rows, std::size_t hidden, std::uintptr_t q, std::uintptr_t scales,
           int num_threads) {
            py::gil_scoped_release release;
            quantize_int8(reinterpret_cast<const void*>(x), to_dtype(dtype), rows, hidden,
                          reinterpret_cast<std::int8_t*>(q), reinterpret_cast<float*>(scales), num_threads);
        },
        py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("hidden"), py::arg("q"), py::arg("scales"),
        py::arg("num_threads") = 1, "Per-token int8 quantization of rows x [rows, hidden] into q and scales.");

    m.def(
        "combine_reduce",
        [](std::uintptr_t out, int out_dtype, std::size_t tokens, std::size_t columns, std::size_t hidden,
           const std::vector<std::uintptr_t>& srcs, const std::vector<std::int64_t>& src_rows,
           const std::vector<int>& src_dtypes, const Array<std::int32_t>& src_rank, const Array<std::int64_t>& src_row,
           std::uintptr_t weights, std::uintptr_t bias0, int bias0_dtype, std::uintptr_t bias1, int bias1_dtype,
           int sums, int num_threads) {
            if (srcs.size() != src_rows.size() || srcs.size() != src_dtypes.size())
                throw py::value_error("combine_reduce: srcs, src_rows and src_dtypes differ in length");
            const std::size_t n = tokens * columns;
            const auto* rank = checked_data(src_rank, n, "src_rank");
            const auto* row = checked_data(src_row, n, "src_row");
            const auto* w = reinterpret_cast<const float*>(weights);
            check_sources(rank, row, n, src_rows, true, "combine_reduce");
            const auto pointers = to_pointers(srcs);
            std::vector<Dtype> dtypes;
            for (int code : src_dtypes) dtypes.push_back(to_dtype(code, true));
            const Bias b0{reinterpret_cast<const void*>(bias0), to_dtype(bias0_dtype)};
            const Bias b1{reinterpret_cast<const void*>(bias1), to_dtype(bias1_dtype)};
            const Dtype out_type = to_dtype(out_dtype, true);
            const Dtype sum_type = to_dtype(sums, true);
            py::gil_scoped_release release;
            combine_reduce(reinterpret_cast<void*>(out), out_type, tokens, columns, hidden, pointers, dtypes, rank, row,
                           w, b0, b1, sum_type, num_threads);
        },
        py::arg("out"), py::arg("out_dtype"), py::arg("tokens"), py::arg("columns"), py::arg("hidden"),
        py::arg("srcs"), py::arg("src_rows"), py::arg("src_dtypes"), py::arg("src_rank"), py::arg("src_row"),
        py::arg("weights"), py::arg("bias0") = 0, py::arg("bias0_dtype") = 0, py::arg("bias1") = 0,
        py::arg("bias1_dtype") = 0, py::arg("sums") = static_cast<int>(Dtype::Float64), py::arg("num_threads") = 1,
        "out[t] = sum_c weights[t,c] * srcs[src_rank[t,c]][src_row[t,c]] (+ biases), c ascending, in `sums` "
        "(the dtype code of float64, or of float32 for 16/32-bit rows and outputs: each product and add "
        "rounded to float32); weights: the address of a contiguous float32 [tokens, columns].");
}
