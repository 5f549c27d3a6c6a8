// SPDX-License-Identifier: MIT
// Advice that a large buffer be backed by 2 MiB pages (Linux transparent huge pages), for the
// buffers a decoding step reads a small slice of per page: a KV cache keeps each token's heads in
// one column, so a step that reads one head touches one 4 KiB page per token, and every page
// is a TLB miss and a restart of the hardware prefetchers.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mha {
namespace detail {

/// Advises the kernel to back the whole 2 MiB pages inside [data, data + bytes) with huge pages
/// (MADV_HUGEPAGE), best to call before the buffer is first written. Advice only: where the
/// system has no transparent huge pages, or has them switched off, nothing changes, and no error
/// is reported. A no-op off Linux.
inline void advise_huge_pages([[maybe_unused]] void* data, [[maybe_unused]] std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    constexpr std::size_t huge = std::size_t(1) << 21;
    if (data == nullptr) return;
    // Bytes from data to the first 2 MiB boundary, then the whole pages after it.
    const std::size_t skip = (huge - reinterpret_cast<std::uintptr_t>(data) % huge) % huge;
    if (bytes <= skip) return;
    const std::size_t length = (bytes - skip) / huge * huge;
    if (length > 0) (void)madvise(static_cast<char*>(data) + skip, length, MADV_HUGEPAGE);
#endif
}

}  // namespace detail
}  // namespace mha
