// SPDX-License-Identifier: MIT
// The query block packed for the score tiles of detail/tiled/block_kernels.hpp (transposed, scaled,
// padded: the layout `qt` described there), the register transposes it goes through on AVX-512 and
// AVX2, and the prefetch hint that the decode passes use for columns a stride apart.
#pragma once

#include <algorithm>
#include <type_traits>

#include <mha/core.hpp>
#include <mha/detail/eigen_compat.hpp>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace mha {
namespace detail {

#if defined(__AVX512F__)
/// r[i](j) ← r[j](i): a 16 × 16 float block transposed in registers (pairs, then quadruples
/// by 64-bit unpacks, then 128-bit lanes twice).
MHA_ALWAYS_INLINE void transpose_16x16(__m512 (&r)[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    auto lo64 = [](__m512 a, __m512 b) {
        return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
    };
    auto hi64 = [](__m512 a, __m512 b) {
        return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
    };
    for (int i = 0; i < 16; i += 4) {
        r[i] = lo64(t[i], t[i + 2]);
        r[i + 1] = hi64(t[i], t[i + 2]);
        r[i + 2] = lo64(t[i + 1], t[i + 3]);
        r[i + 3] = hi64(t[i + 1], t[i + 3]);
    }
    for (int h = 0; h < 16; h += 8)
        for (int i = 0; i < 4; ++i) {
            t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
            t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
        }
    for (int i = 0; i < 8; ++i) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
}
#elif defined(__AVX2__)
/// r[i](j) ← r[j](i): an 8 × 8 float block transposed in registers (pairs by unpacks, quadruples
/// by shuffles, then the 128-bit halves).
MHA_ALWAYS_INLINE void transpose_8x8(__m256 (&r)[8]) {
    __m256 t[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    __m256 u[8];
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
    }
    for (int i = 0; i < 4; ++i) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}
#endif

/// The cache line size the prefetches step by: 64 bytes on x86 and most Arm cores. A wrong guess
/// only changes how many hints are issued (twice as many as needed for 32-byte lines).
inline constexpr Index cache_line_bytes = 64;

/// Asks the cache for the `rows` entries of columns [from, to) (column j at base + j·stride),
/// clipped to the n columns there are; a hint, which never faults and never changes a result.
/// For the few-query passes of a decode step, which read a KV cache in place: there one head's
/// columns lie a cache column apart (4 KiB for 8 key/value heads of 128 floats), each on a page of
/// its own, and the hardware prefetchers do not cross pages, so every column was a wait on
/// memory (perf annotate: the products stalled on their loads).
template <class T>
MHA_ALWAYS_INLINE void prefetch_columns(const T* base, Index stride, Index rows, Index from,
                                        Index to, Index n) {
#if defined(__GNUC__) || defined(__clang__)
    constexpr Index line = std::max<Index>(1, cache_line_bytes / Index(sizeof(T)));
    for (Index j = from; j < std::min(to, n); ++j)
        for (Index d = 0; d < rows; d += line)
            __builtin_prefetch(base + j * stride + d, 0, 3);
#else
    (void)base, (void)stride, (void)rows, (void)from, (void)to, (void)n;
#endif
}

/// qt(c, d) = scale·q(d, c) for c < nq, 0 for nq <= c < nq_padded, with qt(c, d) at
/// qt[d·ldq + c] (ldq >= nq_padded; rows from nq_padded to ldq are left as they are). Column c
/// of q starts at q + c·q_stride.
template <class Scalar>
void pack_scaled_queries(const Scalar* q, Index q_stride, Index dk, Index nq, Index nq_padded,
                         Scalar scale, Scalar* qt, Index ldq) {
    // Query by query, every store went to another cache line of qt: 5-8 % of the float kernel at
    // L = 512, causal (profiled). On AVX-512 float, 16 × 16 blocks go through registers:
    // contiguous loads from 16 query columns, contiguous stores of 16 queries for each d.
    Index c_done = 0, d_done = dk;
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<Scalar, float>) {
        const __m512 s = _mm512_set1_ps(scale);
        d_done = dk / 16 * 16;
        for (; c_done + 16 <= nq; c_done += 16)
            for (Index d0 = 0; d0 < d_done; d0 += 16) {
                __m512 r[16];
                for (int i = 0; i < 16; ++i)
                    r[i] = _mm512_loadu_ps(q + (c_done + i) * q_stride + d0);
                transpose_16x16(r);
                for (int i = 0; i < 16; ++i)
                    _mm512_storeu_ps(qt + (d0 + i) * ldq + c_done, _mm512_mul_ps(s, r[i]));
            }
    }
#elif defined(__AVX2__)
    // The same with 8 × 8 blocks, two per 16 queries so that the rest below starts on its
    // cache-line chunk (3-4.5 % of the AVX2 core at L = 512, causal, went here, profiled; most
    // of it waits on the strided loads, so the transposes gained 1 %).
    if constexpr (std::is_same_v<Scalar, float>) {
        const __m256 s = _mm256_set1_ps(scale);
        d_done = dk / 8 * 8;
        for (; c_done + 16 <= nq; c_done += 16)
            for (Index d0 = 0; d0 < d_done; d0 += 8)
                for (Index c = c_done; c < c_done + 16; c += 8) {
                    __m256 r[8];
                    for (int i = 0; i < 8; ++i)
                        r[i] = _mm256_loadu_ps(q + (c + i) * q_stride + d0);
                    transpose_8x8(r);
                    for (int i = 0; i < 8; ++i)
                        _mm256_storeu_ps(qt + (d0 + i) * ldq + c, _mm256_mul_ps(s, r[i]));
                }
    }
#endif
    // The rest a cache line of queries at a time, d by d: each d's stores fill one line of qt,
    // and the line's query columns stay in L1 meanwhile (a QKV row apart, they map to few sets).
    constexpr Index chunk = std::max<Index>(1, cache_line_bytes / Index(sizeof(Scalar)));
    for (Index c0 = 0; c0 < nq; c0 += chunk) {
        const Index c1 = std::min(nq, c0 + chunk);
        for (Index d = c0 < c_done ? d_done : 0; d < dk; ++d)
            for (Index c = c0; c < c1; ++c)
                qt[d * ldq + c] = scale * q[c * q_stride + d];
    }
    for (Index d = 0; d < dk; ++d)
        std::fill(qt + d * ldq + nq, qt + d * ldq + nq_padded, Scalar(0));
}

}  // namespace detail
}  // namespace mha
