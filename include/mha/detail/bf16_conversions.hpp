// SPDX-License-Identifier: MIT
// bfloat16 ↔ fp32 conversions, one value at a time and over arrays.
//
// The array forms are what the portable bf16 kernels spend their conversion time in: the keys
// and values of every key block widened to fp32, and the probabilities rounded to bf16 before
// P·V (detail/tiled/forward_bf16.hpp), A and B widened for the fp32 register tiles
// (detail/gemm_bf16.hpp). Converted one Eigen::bfloat16 at a time, GCC kept them scalar: about
// a third of the portable bf16 core at L = 2048 on an AVX2 machine (profiled;
// docs/performance.md). Both are integer operations on the bits, so on AVX2 and AVX-512 they go
// 8 or 16 lanes at a time, with the same bits as the scalar forms (tests/test_bf16_attention.cpp
// checks every lane position).
#pragma once

#include <cstdint>
#include <cstring>

#include <Eigen/Core>

#include <mha/core.hpp>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace mha {
namespace detail {

/// The bits of a bf16.
inline std::uint16_t bf16_bits(Eigen::bfloat16 x) {
    std::uint16_t b;
    std::memcpy(&b, &x, sizeof b);
    return b;
}

/// A bf16 as fp32, exactly (a bf16 is the upper 16 bits of the fp32 of the same value).
inline float bf16_to_float(Eigen::bfloat16 x) {
    return static_cast<float>(x);
}

/// x rounded to the nearest bf16 (ties to even; NaN stays NaN), back in fp32.
inline float round_to_bf16(float x) {
    return static_cast<float>(Eigen::bfloat16(x));
}

/// dst[0 : n] ← src[0 : n] widened to fp32 (exact).
inline void widen_bf16(const Eigen::bfloat16* src, Index n, float* dst) {
    static_assert(sizeof(Eigen::bfloat16) == 2, "a bf16 is stored in 16 bits");
    Index i = 0;
    // Zero-extend each 16-bit pattern to 32 bits and shift it into the upper half.
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
        _mm512_storeu_si512(dst + i, _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
#endif
#if defined(__AVX2__)
    for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                            _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
#endif
    for (; i < n; ++i)
        dst[i] = bf16_to_float(src[i]);
}

/// dst(0 : rows, 0 : cols) ← src widened to fp32 (column j of src at src + j·stride, of dst at
/// dst + j·ld).
inline void widen_columns(const Eigen::bfloat16* src, Index stride, Index rows, Index cols,
                          float* dst, Index ld) {
    for (Index j = 0; j < cols; ++j)
        widen_bf16(src + j * stride, rows, dst + j * ld);
}

/// x[0 : n] ← round_to_bf16(x[0 : n]), bit for bit. Rounding to nearest even adds 0x7fff plus
/// the lowest kept bit to the pattern and clears the low half; a NaN becomes the quiet NaN of
/// its sign (0x7fc0 or 0xffc0), which the addition could have turned into an infinity.
inline void round_to_bf16_in_place(float* x, Index n) {
    Index i = 0;
#if defined(__AVX512F__)
    {
        const __m512i low = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
        const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
        const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
        const __m512i qnan = _mm512_set1_epi32(0x7fc00000);
        for (; i + 16 <= n; i += 16) {
            const __m512 v = _mm512_loadu_ps(x + i);
            const __m512i u = _mm512_castps_si512(v);
            const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
            __m512i r = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(low, lsb)), high);
            const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            r = _mm512_mask_or_epi32(r, nan, _mm512_and_si512(u, sign), qnan);
            _mm512_storeu_ps(x + i, _mm512_castsi512_ps(r));
        }
    }
#endif
#if defined(__AVX2__)
    {
        const __m256i low = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
        const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
        const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
        const __m256i qnan = _mm256_set1_epi32(0x7fc00000);
        for (; i + 8 <= n; i += 8) {
            const __m256 v = _mm256_loadu_ps(x + i);
            const __m256i u = _mm256_castps_si256(v);
            const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
            const __m256i r =
                _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(low, lsb)), high);
            const __m256i nan_bits = _mm256_or_si256(_mm256_and_si256(u, sign), qnan);
            const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
            _mm256_storeu_ps(x + i, _mm256_blendv_ps(_mm256_castsi256_ps(r),
                                                     _mm256_castsi256_ps(nan_bits), nan));
        }
    }
#endif
    for (; i < n; ++i)
        x[i] = round_to_bf16(x[i]);
}

}  // namespace detail
}  // namespace mha
