// SPDX-License-Identifier: MIT
// The test programs built once more for one instruction set (tests/CMakeLists.txt: the _avx512
// builds define MHA_TEST_AVX512_BUILD, the _avx2 ones MHA_TEST_AVX2_BUILD) exist to run the
// library's paths for it, which the preset's default target does not compile. On a CPU without
// that instruction set such a program exits with 77, which ctest reads as skipped, at static
// initialisation: any of its code may use the instructions, so no test may start.
#pragma once

#include <cstdio>
#include <cstdlib>

namespace mha_test {

#if defined(MHA_TEST_AVX512_BUILD)
inline const bool avx512_build_runs_here = [] {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        return true;
    std::fputs("compiled for AVX-512, which this CPU lacks: skipped\n", stderr);
    std::exit(77);
}();
#endif

#if defined(MHA_TEST_AVX2_BUILD)
inline const bool avx2_build_runs_here = [] {
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return true;
    std::fputs("compiled for AVX2 and FMA, which this CPU lacks: skipped\n", stderr);
    std::exit(77);
}();
#endif

}  // namespace mha_test
