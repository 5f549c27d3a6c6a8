// SPDX-License-Identifier: MIT
// bfloat16 ↔ fp32 conversions, one value at a time and over arrays.
//
// The array forms are what the portable bf16 kernels spend their conversion time in: the keys
// and values of every key block widened to fp32, and the probabilities rounded to bf16 before
// P·V (detail/tiled/forward_bf16.hpp), A and B widened for the fp32 register tiles
// (detail/gemm_bf16.hpp). Converted one Eigen::bfloat16 at a time, GCC kept them scalar: about
// a third of the portable bf16 core at L = 2048 on an AVX2 machine (profiled;
// docs/performance.md). Both are integer operations on the bits, so on AVX2 and AVX-512 they go
// 8 or 16 lanes at a time, with the same bits as the scalar forms. The bf16 linear's result is
// rounded into a bfloat16 output the same way (store_rounded_bf16, mha/projection_bf16.hpp).
// tests/test_bf16_conversions.cpp checks every lane position, in builds for AVX2 and AVX-512.
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

/// dst[0 : n] ← src[0], src[step], …, src[(n − 1)·step] widened to fp32: one row or column of
/// an operand stored either way round, contiguous when step is 1.
inline void widen_bf16_strided(const Eigen::bfloat16* src, Index step, Index n, float* dst) {
    if (step == 1) {
        widen_bf16(src, n, dst);
        return;
    }
    for (Index i = 0; i < n; ++i)
        dst[i] = bf16_to_float(src[i * step]);
}

/// dst(0 : rows, 0 : cols) ← src widened to fp32 (column j of src at src + j·stride, of dst at
/// dst + j·ld).
inline void widen_columns(const Eigen::bfloat16* src, Index stride, Index rows, Index cols,
                          float* dst, Index ld) {
    for (Index j = 0; j < cols; ++j)
        widen_bf16(src + j * stride, rows, dst + j * ld);
}

// Rounding to nearest even adds 0x7fff plus the lowest kept bit (bit 16) to the pattern and keeps
// the upper half; a NaN becomes the quiet NaN of its sign (0x7fc0 or 0xffc0), which the addition
// could have turned into an infinity. These are Eigen's scalar float → bfloat16 bits.
#if defined(__AVX512F__)
/// The bf16 nearest to each lane of v in the upper 16 bits of the lane, the lower 16 zero.
inline __m512i rounded_bf16_bits(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i half_ulp = _mm512_set1_epi32(0x7fff);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(half_ulp, odd)),
                                       _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_mask_or_epi32(
        r, nan, _mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(0x80000000u))),
        _mm512_set1_epi32(0x7fc00000));
}
#endif

#if defined(__AVX2__)
/// The bf16 nearest to each lane of v in the upper 16 bits of the lane, the lower 16 zero.
inline __m256i rounded_bf16_bits(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i half_ulp = _mm256_set1_epi32(0x7fff);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(half_ulp, odd)),
                                       _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
    const __m256i nan_bits =
        _mm256_or_si256(_mm256_and_si256(u, _mm256_set1_epi32(static_cast<int>(0x80000000u))),
                        _mm256_set1_epi32(0x7fc00000));
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    return _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(nan_bits), nan));
}
#endif

/// x[0 : n] ← round_to_bf16(x[0 : n]), bit for bit, 16 or 8 at a time where AVX-512 or AVX2 is
/// compiled in.
inline void round_to_bf16_in_place(float* x, Index n) {
    Index i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(x + i, _mm512_castsi512_ps(rounded_bf16_bits(_mm512_loadu_ps(x + i))));
#endif
#if defined(__AVX2__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(x + i, _mm256_castsi256_ps(rounded_bf16_bits(_mm256_loadu_ps(x + i))));
#endif
    for (; i < n; ++i)
        x[i] = round_to_bf16(x[i]);
}

/// dst[0 : n) ← src[0 : n) rounded to bfloat16: the bits of Eigen::bfloat16(src[i]) (nearest,
/// ties to even; subnormals rounded, not flushed; a NaN becomes the quiet NaN 0x7fc0 with its
/// sign), 16 at a time where AVX-512 is compiled in and 8 where AVX2 is (Eigen's scalar
/// conversion, one element at a time, is the fallback). On large outputs the pass is bound by
/// memory either way: the fp32 result is written by the GEMM and read back here
/// (docs/performance.md, bfloat16 on AMX).
inline void store_rounded_bf16(const float* src, Eigen::bfloat16* dst, Index n) {
    static_assert(sizeof(Eigen::bfloat16) == 2, "a bf16 is stored in 16 bits");
    Index i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {
        const __m512i r = _mm512_srli_epi32(rounded_bf16_bits(_mm512_loadu_ps(src + i)), 16);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm512_cvtepi32_epi16(r));
    }
#endif
#if defined(__AVX2__)
    for (; i + 8 <= n; i += 8) {
        // Every lane is at most 0xffff after the shift, so the unsigned saturation keeps it.
        const __m256i r = _mm256_srli_epi32(rounded_bf16_bits(_mm256_loadu_ps(src + i)), 16);
        _mm_storeu_si128(
            reinterpret_cast<__m128i*>(dst + i),
            _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
    }
#endif
    for (; i < n; ++i)
        dst[i] = Eigen::bfloat16(src[i]);
}

}  // namespace detail
}  // namespace mha
