#include "shared_memory.hpp"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <stdexcept>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <utility>

namespace deep_ep {

namespace {

// Closes a file descriptor when leaving scope (the mapping outlives it).
struct FdGuard {
    int fd;
    ~FdGuard() {
        if (fd >= 0) ::close(fd);
    }
};

std::string errno_text(int err) { return std::string(std::strerror(err)); }

// The creator could not reserve the segment: say how much was needed, what /dev/shm has, and the fix.
std::string no_space_text(int fd, std::size_t size, int err) {
    std::string space;
    struct statvfs fs{};
    if (::fstatvfs(fd, &fs) == 0) {
        space = "; /dev/shm has " + std::to_string(static_cast<unsigned long long>(fs.f_bavail) * fs.f_frsize) +
                " of " + std::to_string(static_cast<unsigned long long>(fs.f_blocks) * fs.f_frsize) + " bytes free";
    }
    return "deep_ep: cannot allocate " + std::to_string(size) + " bytes of shared memory in /dev/shm (" +
           errno_text(err) + space +
           "). Give the container a larger /dev/shm (for example docker run --shm-size=8g) "
           "or pass a smaller num_nvl_bytes / num_rdma_bytes to deep_ep.Buffer.";
}

}  // namespace

SharedMemory::SharedMemory(const std::string& name, std::size_t size, bool create, std::size_t committed)
    : name_(name), size_(size), owns_name_(create) {
    if (size == 0) throw std::invalid_argument("shared memory size must be positive");
    if (committed > size) throw std::invalid_argument("shared memory: committed bytes exceed the size");
    const int flags = create ? (O_CREAT | O_EXCL | O_RDWR) : O_RDWR;
    FdGuard guard{::shm_open(name.c_str(), flags, 0600)};
    if (guard.fd < 0) {
        throw std::runtime_error("deep_ep: shm_open(" + name + ") failed: " + errno_text(errno));
    }
    if (create) {
        if (::ftruncate(guard.fd, static_cast<off_t>(size)) != 0) {
            const std::string text = no_space_text(guard.fd, size, errno);
            ::shm_unlink(name.c_str());
            throw std::runtime_error(text);
        }
        const int err = committed ? ::posix_fallocate(guard.fd, 0, static_cast<off_t>(committed)) : 0;
        if (err != 0) {
            const std::string text = no_space_text(guard.fd, committed, err);
            ::shm_unlink(name.c_str());
            throw std::runtime_error(text);
        }
    } else {
        struct stat st{};
        if (::fstat(guard.fd, &st) != 0 || static_cast<std::size_t>(st.st_size) < size) {
            throw std::runtime_error("deep_ep: shared memory " + name + " is smaller than the " +
                                     std::to_string(size) + " bytes expected");
        }
    }
    addr_ = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, guard.fd, 0);
    if (addr_ == MAP_FAILED) {
        addr_ = nullptr;
        const int err = errno;
        if (create) ::shm_unlink(name.c_str());
        throw std::runtime_error("deep_ep: mmap of " + name + " failed: " + errno_text(err));
    }
    if (create) std::swap(fd_, guard.fd);  // the creator keeps it to commit more later
}

SharedMemory::~SharedMemory() {
    // Never let a creator's name outlive it, even when the Python side forgot.
    unlink();
    close();
}

void SharedMemory::unlink() {
    if (owns_name_) {
        ::shm_unlink(name_.c_str());
        owns_name_ = false;
    }
}

void SharedMemory::close() {
    if (addr_ != nullptr) {
        ::munmap(addr_, size_);
        addr_ = nullptr;
    }
    if (fd_ >= 0) {
        ::close(fd_);
        fd_ = -1;
    }
}

void SharedMemory::commit(std::size_t offset, std::size_t length) {
    if (fd_ < 0) throw std::logic_error("deep_ep: only the creator of " + name_ + " can commit it, while open");
    if (offset > size_ || length > size_ - offset)
        throw std::out_of_range("deep_ep: commit of [" + std::to_string(offset) + ", " +
                                std::to_string(offset + length) + ") outside the " + std::to_string(size_) +
                                " bytes of " + name_);
    if (length == 0) return;
    const int err = ::posix_fallocate(fd_, static_cast<off_t>(offset), static_cast<off_t>(length));
    if (err != 0) throw std::runtime_error(no_space_text(fd_, length, err));
}

}  // namespace deep_ep
