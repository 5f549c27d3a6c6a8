// SPDX-License-Identifier: MIT
// Which bf16 kernels (include/mha/detail/tiled/block_kernels_bf16.hpp's bf16_kernel) a test
// binary can run on this CPU, for the bf16 tests that run every one of them. Each bf16 test file
// is built twice by tests/CMakeLists.txt: with the preset's flags, and with AVX512-BF16 (and
// AMX where the compiler takes it) as the _native binary. On a CPU without AVX512-BF16 that
// binary exits with 77 before any test (ctest reads it as skipped, tests/CMakeLists.txt): any
// of its code may use AVX-512, and skipping case by case let some run far enough to hit an
// illegal instruction.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <catch2/catch_test_macros.hpp>

#include <mha/detail/amx.hpp>
#include <mha/detail/tiled/block_kernels_bf16.hpp>

namespace mha_test {

using bf16_kernel = mha::detail::bf16_kernel;

/// Whether the vdpbf16ps kernels are compiled in and the CPU runs them.
inline bool bf16_native_available() {
#if defined(MHA_BF16_NATIVE) && (defined(__GNUC__) || defined(__clang__))
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
#else
    return false;
#endif
}

/// Whether the AMX kernels are compiled in, and the CPU and the OS let them run.
inline bool bf16_amx_available() {
#if defined(MHA_BF16_AMX)
    return bf16_native_available() && mha::detail::amx_usable();
#else
    return false;
#endif
}

/// False in the build compiled for AVX512-BF16 on a CPU without it.
inline bool bf16_build_runs_here() {
#if defined(MHA_TEST_NATIVE_BUILD)
    return bf16_native_available();
#else
    return true;
#endif
}

#if defined(MHA_TEST_NATIVE_BUILD)
/// Exits with ctest's "skipped" code at static initialisation when this CPU cannot run the build.
inline const bool bf16_native_build_runs_here = [] {
    if (bf16_native_available()) return true;
    std::fputs("compiled for AVX512-BF16, which this CPU lacks: skipped\n", stderr);
    std::exit(77);
}();
#endif

/// Every kernel that runs here: portable always, native and amx where available.
inline std::vector<bf16_kernel> bf16_kernels_here() {
    std::vector<bf16_kernel> ks{bf16_kernel::portable};
    if (bf16_native_available()) ks.push_back(bf16_kernel::native);
    if (bf16_amx_available()) ks.push_back(bf16_kernel::amx);
    return ks;
}

inline const char* bf16_kernel_name(bf16_kernel k) {
    return k == bf16_kernel::amx ? "amx" : k == bf16_kernel::native ? "native" : "portable";
}

}  // namespace mha_test

#define MHA_SKIP_UNLESS_BUILD_RUNS_HERE() \
    if (!mha_test::bf16_build_runs_here()) SKIP("compiled for AVX512-BF16, which this CPU lacks")
