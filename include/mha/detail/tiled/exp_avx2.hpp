// SPDX-License-Identifier: MIT
// The fp32 exp pass's exp on AVX2 with FMA (8 lanes): exp_above_flush of
// detail/tiled/exp_avx512.hpp for CPUs without AVX-512 (Zen 2 and 3, Intel client cores). Eigen's
// pexp, which the pass took before, clamps its argument, handles overflow and subnormals, and was
// 15 % of the fp32 core at L = 2048 on a Zen 3 (perf record); the pass needs none of that (the
// differences are <= 0 and the caller clears those below exp_flush_below).
#pragma once

#if defined(__AVX2__) && defined(__FMA__)

#include <mha/detail/eigen_compat.hpp>

#include <immintrin.h>

namespace mha {
namespace detail {

/// e^d for −87.33 <= d <= 0 (e^d a normal float) or NaN, in 8 fp32 lanes; wrong below −87.33,
/// where the caller clears the lanes. As exp_by_sixteenths (detail/tiled/exp_avx512.hpp):
/// d = (16k + j)·ln2/16 + r with |r| <= ln2/32, e^d = 2^k · 2^(j/16) · (1 + q), q = e^r − 1 by
/// its cubic Taylor polynomial (truncation (ln2/32)^4/4! ≈ 9e-9 relative); ln2/16 in two
/// parts (Cody–Waite), so r is exact to fp32 rounding. AVX2 permutes 8 lanes, so the 16-entry
/// table of 2^(j/16) is two permutes and a blend on bit 3 of j. NaN stays NaN (q is NaN).
MHA_ALWAYS_INLINE __m256 exp_above_flush_avx2(__m256 d) {
    // 1.5·2^23 + x rounds x to an integer n (|x| < 2^22) and leaves 2^22 + n in the mantissa:
    // the low four bits are j, and shifted by 19 the bits above them make k·2^23.
    const __m256 shifter = _mm256_set1_ps(12582912.0f);
    const __m256 y = _mm256_fmadd_ps(d, _mm256_set1_ps(23.0831206542234f), shifter);  // 16/ln2
    const __m256 n = _mm256_sub_ps(y, shifter);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0x1.62e4p-5f), d);  // ln2/16, high bits
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(8.92879263e-08f), r);      // ln2/16, the rest
    // 2^(j/16) rounded to fp32, less j·2^19, so that adding (2^22 + n)·2^19 mod 2^32 = k·2^23 +
    // j·2^19 to its bits leaves 2^k · 2^(j/16).
    const __m256i step = _mm256_slli_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), 19);
    const __m256 low = _mm256_castsi256_ps(_mm256_sub_epi32(
        _mm256_castps_si256(_mm256_setr_ps(0x1.000000p+0f, 0x1.0b5586p+0f, 0x1.172b84p+0f,
                                           0x1.2387a6p+0f, 0x1.306fe0p+0f, 0x1.3dea64p+0f,
                                           0x1.4bfdaep+0f, 0x1.5ab07ep+0f)),
        step));
    const __m256 high = _mm256_castsi256_ps(_mm256_sub_epi32(
        _mm256_castps_si256(_mm256_setr_ps(0x1.6a09e6p+0f, 0x1.7a1148p+0f, 0x1.8ace54p+0f,
                                           0x1.9c4918p+0f, 0x1.ae89fap+0f, 0x1.c199bep+0f,
                                           0x1.d5818ep+0f, 0x1.ea4afap+0f)),
        _mm256_add_epi32(step, _mm256_set1_epi32(8 << 19))));
    const __m256i bits = _mm256_castps_si256(y);
    // vpermps reads the low three bits of each index; the blend takes `high` where bit 3 is set
    // (moved to the sign bit, which is what vblendvps reads).
    const __m256 entry =
        _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, bits), _mm256_permutevar8x32_ps(high, bits),
                         _mm256_castsi256_ps(_mm256_slli_epi32(bits, 28)));
    const __m256 scale = _mm256_castsi256_ps(
        _mm256_add_epi32(_mm256_castps_si256(entry), _mm256_slli_epi32(bits, 19)));
    const __m256 p = _mm256_fmadd_ps(r, _mm256_set1_ps(1.0f / 6.0f), _mm256_set1_ps(0.5f));
    const __m256 q = _mm256_fmadd_ps(_mm256_mul_ps(r, r), p, r);  // r + r²·(1/2 + r/6)
    return _mm256_fmadd_ps(scale, q, scale);                      // scale·(1 + q), one rounding
}

}  // namespace detail
}  // namespace mha

#endif  // __AVX2__ && __FMA__
