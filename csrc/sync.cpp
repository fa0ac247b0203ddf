#include "sync.hpp"

#include <atomic>
#include <chrono>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <utility>

#include <poll.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace deep_ep {

namespace {

std::atomic<std::uint64_t>* counter_at(std::uintptr_t addr) {
    static_assert(std::atomic<std::uint64_t>::is_always_lock_free,
                  "shared-memory counters need lock-free 64-bit atomics");
    return reinterpret_cast<std::atomic<std::uint64_t>*>(addr);
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

// A process that exited, or that is a zombie waiting to be reaped, is gone.
bool process_alive(std::int64_t pid) {
    std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
    if (!stat) return false;
    std::string line;
    std::getline(stat, line);
    const auto close_paren = line.rfind(')');
    if (close_paren == std::string::npos || close_paren + 2 >= line.size()) return true;
    const char state = line[close_paren + 2];
    return state != 'Z' && state != 'X';
}

std::string join_ranks(const std::vector<int>& ranks) {
    std::ostringstream out;
    out << "[";
    for (std::size_t i = 0; i < ranks.size(); ++i) out << (i ? ", " : "") << ranks[i];
    out << "]";
    return out.str();
}

}  // namespace

void store_counter(std::uintptr_t addr, std::uint64_t value) {
    counter_at(addr)->store(value, std::memory_order_release);
}

std::uint64_t load_counter(std::uintptr_t addr) { return counter_at(addr)->load(std::memory_order_acquire); }

PeerProcess::PeerProcess(std::int64_t pid) : pid_(pid), watched_(process_alive(pid)) {
#ifdef SYS_pidfd_open
    // The pid was checked alive just before: a number reused in between is not a practical concern.
    if (watched_) pidfd_ = static_cast<int>(syscall(SYS_pidfd_open, static_cast<pid_t>(pid), 0));
#endif
}

PeerProcess::~PeerProcess() {
    if (pidfd_ >= 0) close(pidfd_);
}

PeerProcess::PeerProcess(PeerProcess&& other) noexcept
    : pid_(other.pid_), watched_(other.watched_), pidfd_(std::exchange(other.pidfd_, -1)) {}

PeerProcess& PeerProcess::operator=(PeerProcess&& other) noexcept {
    if (this != &other) {
        if (pidfd_ >= 0) close(pidfd_);
        pid_ = other.pid_;
        watched_ = other.watched_;
        pidfd_ = std::exchange(other.pidfd_, -1);
    }
    return *this;
}

bool PeerProcess::alive() const {
    if (!watched_) return true;
    if (pidfd_ < 0) return process_alive(pid_);
    pollfd ready{pidfd_, POLLIN, 0};
    return poll(&ready, 1, 0) == 0;  // readable (or an error on the descriptor): exited
}

NodeSync::NodeSync(std::vector<std::uintptr_t> counter_addrs, int my_index, std::vector<int> global_ranks,
                   std::vector<std::int64_t> pids)
    : counter_addrs_(std::move(counter_addrs)), my_index_(my_index), global_ranks_(std::move(global_ranks)) {
    if (counter_addrs_.size() != global_ranks_.size() || counter_addrs_.size() != pids.size())
        throw std::invalid_argument("NodeSync: counter_addrs, global_ranks and pids differ in length");
    if (my_index_ < 0 || my_index_ >= static_cast<int>(counter_addrs_.size()))
        throw std::invalid_argument("NodeSync: my_index out of range");
    peers_.reserve(pids.size());
    for (std::int64_t pid : pids) peers_.emplace_back(pid);
    arrivals_ns_.assign(counter_addrs_.size(), 0);
    generation_ = load_counter(counter_addrs_[my_index_]);
}

int NodeSync::peers_with_pidfd() const {
    int count = 0;
    for (int i = 0; i < static_cast<int>(peers_.size()); ++i) count += i != my_index_ && peers_[i].has_pidfd();
    return count;
}

bool NodeSync::peer_alive(int index) const { return peers_[index].alive(); }

void NodeSync::barrier(double timeout_s, const std::string& what, const std::function<void()>& poll) {
    ++generation_;
    arrivals_ns_[my_index_] = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                  std::chrono::steady_clock::now().time_since_epoch()).count();
    store_counter(counter_addrs_[my_index_], generation_);
    std::vector<std::uintptr_t> addrs;
    std::vector<std::uint64_t> targets;
    std::vector<int> owners;
    for (int i = 0; i < static_cast<int>(counter_addrs_.size()); ++i) {
        if (i == my_index_) continue;
        addrs.push_back(counter_addrs_[i]);
        targets.push_back(generation_);
        owners.push_back(i);
    }
    wait_at_least(addrs, targets, owners, timeout_s, what, poll);
}

void NodeSync::wait_at_least(const std::vector<std::uintptr_t>& addrs, const std::vector<std::uint64_t>& targets,
                             const std::vector<int>& owners, double timeout_s, const std::string& what,
                             const std::function<void()>& poll) {
    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    const auto deadline = start + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(timeout_s));
    auto next_check = start + std::chrono::milliseconds(50);
    std::vector<std::size_t> pending(addrs.size());
    for (std::size_t i = 0; i < pending.size(); ++i) pending[i] = i;
    for (std::uint64_t iteration = 0;; ++iteration) {
        std::size_t kept = 0;
        std::int64_t seen_ns = -1;
        for (std::size_t i : pending) {
            if (load_counter(addrs[i]) < targets[i]) {
                pending[kept++] = i;
            } else {
                if (seen_ns < 0)
                    seen_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(clock::now().time_since_epoch())
                                  .count();
                arrivals_ns_[owners[i]] = seen_ns;
            }
        }
        pending.resize(kept);
        if (pending.empty()) return;
        // Spin briefly (the peer is usually microseconds away), then yield, then sleep:
        // with more ranks than cores a spinning waiter would starve the peer it waits for.
        if (iteration < 2000) {
            cpu_relax();
            continue;
        }
        if (iteration < 6000) {
            std::this_thread::yield();
        } else {
            std::this_thread::sleep_for(std::chrono::microseconds(50));
        }
        const auto now = clock::now();
        if (now < next_check) continue;
        next_check = now + std::chrono::milliseconds(50);
        if (poll) poll();
        std::vector<int> missing, dead;
        for (std::size_t i : pending) {
            const int owner = owners[i];
            missing.push_back(global_ranks_[owner]);
            if (!peer_alive(owner)) dead.push_back(global_ranks_[owner]);
        }
        const std::string me = std::to_string(global_ranks_[my_index_]);
        if (!dead.empty()) {
            throw std::runtime_error("deep_ep: rank " + me + " waited in " + what + " for ranks " +
                                     join_ranks(missing) + ", but ranks " + join_ranks(dead) +
                                     " have exited. The Buffer must be recreated.");
        }
        if (now >= deadline) {
            std::ostringstream msg;
            msg << "deep_ep: rank " << me << " timed out after " << timeout_s << " s in " << what
                << " waiting for ranks " << join_ranks(missing)
                << " (DEEP_EP_TIMEOUT_S). A peer crashed, is stuck, or called a different operation; "
                << "the Buffer must be recreated.";
            throw std::runtime_error(msg.str());
        }
    }
}

}  // namespace deep_ep
