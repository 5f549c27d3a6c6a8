// SPDX-License-Identifier: MIT
// The AVX-512 exps of the softmax passes, for the difference d <= 0 of a score from its query's
// running max, 16 fp32 lanes at a time:
// - exp_nonpositive: any d <= 0, subnormal results included (the backward; the AMX pass);
// - exp_above_flush: the forward's fp32 exp pass, whose caller clears the differences below
//   exp_flush_below; three fewer multiply-adds (a table of 2^(j/16));
// - exp_nonpositive_for_bf16: the same table with a shorter polynomial, for probabilities that
//   are rounded to bf16 afterwards.
// Each is bound by the floating-point pipes, which the two products of a block also use: every
// multiply-add taken from them is time taken from the whole block.
#pragma once

#if defined(__AVX512F__)

#include <mha/detail/eigen_compat.hpp>

#include <immintrin.h>

namespace mha {
namespace detail {

/// e^d for d <= 0 (or NaN) in 16 fp32 lanes, from d = n·ln2 + f with n = round(d/ln2) and
/// |f| <= ln2/2: e^d = 2^n · e^f, with e^f from `e_to_f` (a polynomial in f) and 2^n applied by
/// vscalefps. ln2 is split in two (Cody–Waite) so that f is exact to fp32 rounding. NaN stays
/// NaN; −∞ and differences below exp_flush_below are the caller's to clear, by `kept`: the lanes
/// not set in it come out +0 (the scaling's own zero-masking, no instruction of its own).
template <class Polynomial>
MHA_ALWAYS_INLINE __m512 exp_nonpositive_from(__m512 d, Polynomial e_to_f,
                                              __mmask16 kept = 0xFFFF) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(d, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), d);  // ln2, high bits
    f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682e-06f), f);            // ln2, the rest
    return _mm512_maskz_scalef_ps(kept, e_to_f(f), n);
}

/// exp(d) for d <= 0 (1.3 ulp at most, measured): e^f by its Taylor polynomial of degree 7
/// (truncation below (ln2/2)^8/8! ≈ 5e-9 relative); tests/test_bf16_attention.cpp measures the
/// error over [−88, 0] (within 3 ulp). 12 instructions where Eigen's pexp takes about twice as
/// many.
MHA_ALWAYS_INLINE __m512 exp_nonpositive(__m512 d, __mmask16 kept = 0xFFFF) {
    return exp_nonpositive_from(
        d,
        [](__m512 f) {
            __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 720.0f));
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120.0f));
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24.0f));
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6.0f));
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
            return _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
        },
        kept);
}

/// e^d for −87.33 <= d <= 0 (e^d a normal float) or NaN, from d = (16k + j)·ln2/16 + r with
/// 0 <= j < 16 and |r| <= ln2/32: e^d = 2^k · 2^(j/16) · e^r, with 2^(j/16) from a table in one
/// register (vpermps), 2^k added to its exponent bits, and e^r − 1 from `e_to_r_minus_1`, a
/// polynomial in r. `reduce(n, d)` returns r = d − n·ln2/16. The lanes not in `kept` come out +0;
/// below −87.33 the others are wrong (2^k is not normal), so the caller clears them by `kept`.
/// r is 32 times smaller than exp_nonpositive_from's f, so a cubic does the work of its degree 7.
template <class Reduce, class Polynomial>
MHA_ALWAYS_INLINE __m512 exp_by_sixteenths(__m512 d, __mmask16 kept, Reduce reduce,
                                           Polynomial e_to_r_minus_1) {
    // 1.5·2^23 + x rounds x to an integer n (|x| < 2^22) and leaves 2^22 + n in the mantissa:
    // the low four bits are j, and shifted by 19 the bits above them make k·2^23.
    const __m512 shifter = _mm512_set1_ps(12582912.0f);
    const __m512 y = _mm512_fmadd_ps(d, _mm512_set1_ps(23.0831206542234f), shifter);  // 16/ln2
    const __m512 n = _mm512_sub_ps(y, shifter);
    const __m512 r = reduce(n, d);
    // 2^(j/16) rounded to fp32, less j·2^19, so that adding (2^22 + n)·2^19 mod 2^32 = k·2^23 +
    // j·2^19 to its bits leaves 2^k · 2^(j/16).
    const __m512i table = _mm512_sub_epi32(
        _mm512_castps_si512(
            _mm512_setr_ps(0x1.000000p+0f, 0x1.0b5586p+0f, 0x1.172b84p+0f, 0x1.2387a6p+0f,
                           0x1.306fe0p+0f, 0x1.3dea64p+0f, 0x1.4bfdaep+0f, 0x1.5ab07ep+0f,
                           0x1.6a09e6p+0f, 0x1.7a1148p+0f, 0x1.8ace54p+0f, 0x1.9c4918p+0f,
                           0x1.ae89fap+0f, 0x1.c199bep+0f, 0x1.d5818ep+0f, 0x1.ea4afap+0f)),
        _mm512_slli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                          19));
    const __m512i bits = _mm512_castps_si512(y);
    const __m512 scale = _mm512_castsi512_ps(
        _mm512_add_epi32(_mm512_permutexvar_epi32(bits, table), _mm512_slli_epi32(bits, 19)));
    // scale·(1 + q) in one rounding; q is NaN for a NaN d.
    return _mm512_maskz_fmadd_ps(kept, scale, e_to_r_minus_1(r), scale);
}

/// exp(d) for exp_flush_below <= d <= 0 (within 2 ulp, measured; tests/test_bf16_attention.cpp
/// checks 3 over [−87.33, 0]) or NaN; the lanes not in `kept` come out +0, and the caller clears
/// those below −87.33 by it. ln2/16 is split in two (Cody–Waite), so r is exact to fp32
/// rounding; e^r − 1 is its Taylor polynomial of degree 3 (truncation (ln2/32)^4/4! ≈ 9e-9
/// relative). 7 multiply-adds where exp_nonpositive takes 10, a roundscale and a scalef: the
/// forward's fp32 core up to 5 % faster (docs/performance.md).
MHA_ALWAYS_INLINE __m512 exp_above_flush(__m512 d, __mmask16 kept) {
    return exp_by_sixteenths(
        d, kept,
        [](__m512 n, __m512 x) {
            const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0x1.62e4p-5f), x);  // high bits
            return _mm512_fnmadd_ps(n, _mm512_set1_ps(8.92879263e-08f), r);         // the rest
        },
        [](__m512 r) {
            const __m512 p = _mm512_fmadd_ps(r, _mm512_set1_ps(1.0f / 6.0f), _mm512_set1_ps(0.5f));
            return _mm512_fmadd_ps(_mm512_mul_ps(r, r), p, r);  // r + r²·(1/2 + r/6)
        });
}

/// e^d for −87.33 <= d <= 0 with relative error 2.0e-6 at most (measured; the tests hold it to
/// 2.5e-6, tests/support/check.hpp), for probabilities that are rounded to bf16 afterwards
/// (relative error up to 2^-9 ≈ 2e-3, a thousand times more); the lanes not in `kept` come out
/// +0, and the caller clears those below −87.33 by it. e^r − 1 is r + r²/2 (truncation
/// (ln2/32)^3/3! ≈ 1.7e-6 relative), and ln2/16 is one fp32 constant: its rounding (2.7e-9
/// relative) moves r by at most 87.33 · 2.7e-9 ≈ 2.4e-7. 5 multiply-adds where the reduction by
/// vscalefps and a degree-4 polynomial took 7, a roundscale and a scalef. exp(0) = 1 exactly, so
/// the largest score's probability is 1.
MHA_ALWAYS_INLINE __m512 exp_nonpositive_for_bf16(__m512 d, __mmask16 kept = 0xFFFF) {
    return exp_by_sixteenths(
        d, kept,
        [](__m512 n, __m512 x) {
            return _mm512_fnmadd_ps(n, _mm512_set1_ps(0.0433216989f), x);  // ln2/16
        },
        [](__m512 r) { return _mm512_fmadd_ps(_mm512_mul_ps(r, r), _mm512_set1_ps(0.5f), r); });
}

}  // namespace detail
}  // namespace mha

#endif  // __AVX512F__
