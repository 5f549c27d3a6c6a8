// SPDX-License-Identifier: MIT
// AMX (Intel's Advanced Matrix Extensions) for the bf16 products: whether it is compiled in
// (MHA_BF16_AMX), whether this process may use it (amx_usable), and the tile configuration every
// AMX kernel here uses (amx_tile_scope). The kernels: detail/gemm_bf16_amx.hpp (projections) and
// detail/tiled/block_kernels_amx.hpp (attention).
//
// Compiled in when the compiler targets AMX-TILE and AMX-BF16 (e.g. -march=sapphirerapids, or
// -march=native on such a CPU) as well as AVX512-BF16, on Linux with GCC or clang; used when the
// CPU has it and Linux grants the process the tile state (arch_prctl(ARCH_REQ_XCOMP_PERM), asked
// once). Elsewhere the vdpbf16ps kernels run.
#pragma once

#include <cstdint>

#include <mha/detail/tiled/block_kernels_bf16.hpp>

#if defined(MHA_BF16_NATIVE) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && \
    defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define MHA_BF16_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace mha {
namespace detail {

#if defined(MHA_BF16_AMX)

/// True when the CPU has AMX-TILE and AMX-BF16 and Linux lets this process use the tile state.
/// Asked once per process; the permission, once granted, holds for every thread.
inline bool amx_usable() {
    static const bool usable = [] {
        unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
        if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) return false;
        const bool amx_bf16 = ((edx >> 22) & 1u) != 0, amx_tile = ((edx >> 24) & 1u) != 0;
        if (!amx_bf16 || !amx_tile) return false;
        constexpr long request_permission = 0x1023;  // ARCH_REQ_XCOMP_PERM
        constexpr long tile_data = 18;               // XFEATURE_XTILEDATA
        return syscall(SYS_arch_prctl, request_permission, tile_data) == 0;
    }();
    return usable;
}

/// The tile configuration of this GEMM, loaded for the scope of one thread's work: eight tiles of
/// 16 rows × 64 bytes (16 fp32, or 32 bf16, or 16 bf16 pairs per row).
class amx_tile_scope {
public:
    amx_tile_scope() {
        config cfg{};
        cfg.palette = 1;
        for (int t = 0; t < 8; ++t) {
            cfg.bytes_per_row[t] = 64;
            cfg.rows[t] = 16;
        }
        _tile_loadconfig(&cfg);
    }
    ~amx_tile_scope() { _tile_release(); }
    amx_tile_scope(const amx_tile_scope&) = delete;
    amx_tile_scope& operator=(const amx_tile_scope&) = delete;

private:
    // The 64-byte layout LDTILECFG reads (palette 1).
    struct alignas(64) config {
        std::uint8_t palette;
        std::uint8_t start_row;
        std::uint8_t reserved[14];
        std::uint16_t bytes_per_row[16];
        std::uint8_t rows[16];
    };
};

#endif  // MHA_BF16_AMX

}  // namespace detail
}  // namespace mha
