// POSIX shared-memory segment owned by one rank and mapped by its local peers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace deep_ep {

// RAII mapping of a named POSIX shared-memory object.
// The creator reserves every page up front (posix_fallocate) so that a small
// /dev/shm fails here with a clear message instead of a SIGBUS later.
class SharedMemory {
public:
    SharedMemory(const std::string& name, std::size_t size, bool create);
    ~SharedMemory();
    SharedMemory(const SharedMemory&) = delete;
    SharedMemory& operator=(const SharedMemory&) = delete;

    // Removes the name; the mapping stays valid until every process unmaps it.
    void unlink();
    void close();

    std::uintptr_t address() const { return reinterpret_cast<std::uintptr_t>(addr_); }
    std::size_t size() const { return size_; }
    const std::string& name() const { return name_; }
    bool is_open() const { return addr_ != nullptr; }
    void* data() const { return addr_; }

private:
    std::string name_;
    std::size_t size_ = 0;
    void* addr_ = nullptr;
    bool owns_name_ = false;
};

}  // namespace deep_ep
