// POSIX shared-memory segment owned by one rank and mapped by its local peers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace deep_ep {

// RAII mapping of a named POSIX shared-memory object.
// The creator sizes the object to `size` bytes (ftruncate: address space only) and reserves
// (posix_fallocate) just its first `committed` bytes; commit() reserves more later. Every byte a
// process touches must have been reserved first: a small /dev/shm then fails in commit() with a
// clear message instead of a SIGBUS on first touch.
class SharedMemory {
public:
    SharedMemory(const std::string& name, std::size_t size, bool create, std::size_t committed);
    ~SharedMemory();
    SharedMemory(const SharedMemory&) = delete;
    SharedMemory& operator=(const SharedMemory&) = delete;

    // Removes the name; the mapping stays valid until every process unmaps it.
    void unlink();
    void close();
    // Creator only: reserves [offset, offset + length). On failure (std::runtime_error with the
    // bytes asked for and /dev/shm's free space) nothing of the range stays reserved. Reserve only
    // ranges not reserved before: the kernel's rollback of a failed reservation also drops untouched
    // pages an earlier reservation of the same range made.
    void commit(std::size_t offset, std::size_t length);

    std::uintptr_t address() const { return reinterpret_cast<std::uintptr_t>(addr_); }
    std::size_t size() const { return size_; }
    const std::string& name() const { return name_; }
    bool is_open() const { return addr_ != nullptr; }
    void* data() const { return addr_; }
    // The creator's descriptor of the object (kept for commit), -1 for a peer's mapping.
    int fd() const { return fd_; }

private:
    std::string name_;
    std::size_t size_ = 0;
    void* addr_ = nullptr;
    int fd_ = -1;
    bool owns_name_ = false;
};

}  // namespace deep_ep
