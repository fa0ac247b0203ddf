// Shared-memory synchronisation between the ranks of one node: barriers and
// waits on counters that peers bump, each with a deadline and liveness checks.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace deep_ep {

// A local peer's process, watched through a pidfd where the kernel offers one (Linux 5.3+): a
// pidfd names the process itself, not its reusable number, and polls readable once the process
// has exited (also while it is an unreaped zombie). Without one, /proc/<pid>/stat decides. A pid
// not visible at construction (a peer in another pid namespace) is not watched: only the deadline
// applies to it. Owns its descriptor (closed on destruction; movable, not copyable).
class PeerProcess {
public:
    explicit PeerProcess(std::int64_t pid);
    ~PeerProcess();
    PeerProcess(PeerProcess&& other) noexcept;
    PeerProcess& operator=(PeerProcess&& other) noexcept;
    PeerProcess(const PeerProcess&) = delete;
    PeerProcess& operator=(const PeerProcess&) = delete;

    // False once the process has exited (true for a process that is not watched).
    bool alive() const;
    bool has_pidfd() const { return pidfd_ >= 0; }

private:
    std::int64_t pid_;
    bool watched_ = false;
    int pidfd_ = -1;
};

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

    // Local peers watched through a pidfd (the others through /proc, or not at all).
    int peers_with_pidfd() const;

    // steady_clock (CLOCK_MONOTONIC) nanoseconds at which each local peer was last seen arriving in
    // barrier() (this rank: when it arrived itself); the cost statistics of dispatch / combine.
    const std::vector<std::int64_t>& arrivals_ns() const { return arrivals_ns_; }

private:
    bool peer_alive(int index) const;

    std::vector<std::uintptr_t> counter_addrs_;
    int my_index_;
    std::vector<int> global_ranks_;
    std::vector<PeerProcess> peers_;
    std::uint64_t generation_ = 0;
    std::vector<std::int64_t> arrivals_ns_;
};

// Release-store of a 64-bit counter in shared memory.
void store_counter(std::uintptr_t addr, std::uint64_t value);
std::uint64_t load_counter(std::uintptr_t addr);

}  // namespace deep_ep
