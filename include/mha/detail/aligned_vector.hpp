// SPDX-License-Identifier: MIT
// std::vector on 64-byte boundaries, for the bf16 kernels' packed operands and scratch, and a
// variant whose resize() does not zero-fill, for the buffers a call writes whole before it reads.
//
// std::allocator gives 16 bytes (what malloc promises). A 64-byte row that starts 16 bytes into a
// cache line spans two lines, so every AMX tile row or zmm load from such a buffer costs two line
// accesses: a loop of four tile loads and four TDPBF16PS from one 16-byte aligned buffer took
// 39 cycles per product, 14 from the same buffer 64-byte aligned (one core of a 2-vCPU Xeon with
// AMX, data in L1).
#pragma once

#include <cstddef>
#include <cstring>
#include <new>
#include <type_traits>
#include <utility>
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

/// cache_line_allocator whose resize() leaves new elements of a trivially copyable type unwritten
/// (indeterminate) instead of value-initialising them (zero). For the K and V copied once per
/// call: a call without a kept workspace zero-filled them first (4 MB at L = 2048 with 8 heads of
/// 64 in bf16, 16 MB at 8192; memset was 3 % of the bf16 core's samples) for bytes the packing
/// then overwrites.
template <class T>
struct uninitialized_cache_line_allocator : cache_line_allocator<T> {
    template <class U>
    struct rebind {
        using other = uninitialized_cache_line_allocator<U>;
    };

    uninitialized_cache_line_allocator() noexcept = default;
    template <class U>
    uninitialized_cache_line_allocator(  // NOLINT: rebinding
        const uninitialized_cache_line_allocator<U>&) noexcept {}

    template <class U>
    void construct([[maybe_unused]] U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
        // Eigen::bfloat16's default constructor writes 0. A trivially copyable and destructible
        // type has implicit lifetime: the allocated storage provides its objects, and nothing
        // needs writing (for a scalar, default-initialisation writes nothing either).
        if constexpr (!(std::is_trivially_copyable_v<U> && std::is_trivially_destructible_v<U>)) {
            ::new (static_cast<void*>(p)) U;
        } else {
#if !defined(NDEBUG)
            // With assertions on, a finite value that no result could hide: a read before the
            // write then shows in the tests' comparisons. Not NaN, which the kernels' repair of
            // non-finite columns would recompute away. Bytes 0x41 are 12.06 in bfloat16 bits.
            if constexpr (std::is_floating_point_v<U>)
                *p = U(12.25);
            else
                std::memset(static_cast<void*>(p), 0x41, sizeof(U));
#endif
        }
    }
    template <class U, class... Args>
    void construct(U* p, Args&&... args) {
        ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
    }
};

/// An aligned_vector whose resize() leaves trivially copyable elements unwritten (a finite
/// filler when NDEBUG is not defined): every element must be written before it is read.
template <class T>
using uninitialized_aligned_vector = std::vector<T, uninitialized_cache_line_allocator<T>>;

}  // namespace detail
}  // namespace mha
