// Shared-memory synchronisation between the ranks of one node: barriers and
// waits on counters that peers bump, each with a deadline and liveness checks.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace deep_ep {

class NodeSync {
public:
    // counter_addrs[i]: the barrier counter (a 64-bit word in shared memory) of
    // local peer i; global_ranks[i] / pids[i]: that peer's rank and process id.
    NodeSync(std::vector<std::uintptr_t> counter_addrs, int my_index, std::vector<int> global_ranks,
             std::vector<std::int64_t> pids);

    // Every local rank arrives, or RuntimeError naming the ranks that did not.
    void barrier(double timeout_s, const std::string& what, const std::function<void()>& poll);

    // Waits until *addrs[i] >= targets[i] for every i; owners[i] is the local
    // peer index expected to write addrs[i] (named in the timeout message).
    void wait_at_least(const std::vector<std::uintptr_t>& addrs, const std::vector<std::uint64_t>& targets,
                       const std::vector<int>& owners, double timeout_s, const std::string& what,
                       const std::function<void()>& poll);

    std::uint64_t generation() const { return generation_; }

    // steady_clock (CLOCK_MONOTONIC) nanoseconds at which each local peer was last seen arriving in
    // barrier() (this rank: when it arrived itself); the cost statistics of dispatch / combine.
    const std::vector<std::int64_t>& arrivals_ns() const { return arrivals_ns_; }

private:
    bool peer_alive(int index) const;

    std::vector<std::uintptr_t> counter_addrs_;
    int my_index_;
    std::vector<int> global_ranks_;
    std::vector<std::int64_t> pids_;
    std::vector<bool> check_liveness_;
    std::uint64_t generation_ = 0;
    std::vector<std::int64_t> arrivals_ns_;
};

// Release-store of a 64-bit counter in shared memory.
void store_counter(std::uintptr_t addr, std::uint64_t value);
std::uint64_t load_counter(std::uintptr_t addr);

}  // namespace deep_ep
