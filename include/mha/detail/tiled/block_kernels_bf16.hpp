// SPDX-License-Identifier: MIT
// Block kernels of the bfloat16 tiled attention (detail/tiled/forward_bf16.hpp): Q, K and V are
// stored as Eigen::bfloat16, every sum is accumulated in fp32.
//
// Two implementations of the same products, chosen at compile time:
//   native   (__AVX512BF16__): register tiles of `vdpbf16ps` (_mm512_dpbf16_ps), which
//            multiplies 32 pairs of bf16 and adds each pair's two products to one of 16 fp32
//            lanes: twice the multiply-adds of an fp32 FMA per instruction.
//   portable (elsewhere, or forced by the tests): the bf16 operands are widened to fp32 (exactly:
//            a bf16 is the upper half of an fp32) and the fp32 kernels of block_kernels.hpp run.
//
// Pair-interleaved layout. vdpbf16ps pairs adjacent bf16 elements along the reduction dimension:
// lane i of the result receives a[2i]·b[2i] + a[2i+1]·b[2i+1]. So the operand whose packet spans
// the lanes (queries for the scores, value rows for P·V) must hold, for each lane, two
// consecutive elements of the reduction dimension next to each other:
//   qp (scores):  qp[(d/2·nqp + c)·2 + d%2] = Q(d, c)       lanes: queries, pairs of d_k
//   vp (P·V):     vp[(j/2·dvp + e)·2 + j%2] = V(e, j0 + j)   lanes: value rows, pairs of keys
//   pp (P·V):     pp[(j/2·nqp + c)·2 + j%2] = P(j, c)        broadcast: one 32-bit pair
// The other operand of each product is broadcast one 32-bit pair at a time. For the scores that
// is a pair of K(d, j), K(d+1, j): adjacent in a column of K already, so K is read in place. Q,
// V and P are not in that order, and the reordering costs a pass over the operand: done once per
// query block (Q), once per key block (V, P), never inside the register tiles, where it would be
// repeated for every tile that reads the block. An odd d_k or key count gets a zero partner.
// P is packed by detail/tiled/probabilities_bf16.hpp, with its exp.
//
// Rounding: products of two bf16 are exact in fp32 (8 + 8 significand bits); the native kernel
// adds them with round-to-nearest-even and treats bf16/fp32 subnormals as zero (the
// instruction's fixed behaviour, whatever MXCSR says). P is rounded to bf16 (nearest-even) for
// P·V in both implementations; the error this adds is bounded in docs/performance.md ("bfloat16")
// and in tests/support/check.hpp (require_bf16_attention_close).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include <Eigen/Core>

#include <mha/core.hpp>
#include <mha/detail/bf16_conversions.hpp>
#include <mha/detail/tiled/block_kernels.hpp>
#include <mha/detail/tiled/online_softmax.hpp>

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>
#define MHA_BF16_NATIVE 1
#endif

namespace mha {
namespace detail {

/// Which implementation of the bf16 block kernels a call runs.
enum class bf16_kernel {
    portable,  ///< bf16 widened to fp32, then the fp32 register tiles
    native,    ///< vdpbf16ps register tiles; only when MHA_BF16_NATIVE is defined
    amx        ///< native, with the GEMM on AMX tiles where the CPU and OS allow it
               ///< (detail/gemm_bf16_amx.hpp)
};

/// True when `k` runs the vdpbf16ps block kernels (native and amx alike).
constexpr bool uses_dot_pairs(bf16_kernel k) {
    return k != bf16_kernel::portable;
}

/// The implementation the translation unit is compiled for: amx when the compiler targets AMX-BF16
/// (the GEMM still checks at run time that the CPU and the OS allow it).
#if defined(MHA_BF16_NATIVE) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
inline constexpr bf16_kernel default_bf16_kernel = bf16_kernel::amx;
#elif defined(MHA_BF16_NATIVE)
inline constexpr bf16_kernel default_bf16_kernel = bf16_kernel::native;
#else
inline constexpr bf16_kernel default_bf16_kernel = bf16_kernel::portable;
#endif

/// Packets of queries and value rows in the native kernels: 16 fp32 lanes, 32 bf16.
inline constexpr Index bf16_lanes = 16;

/// Rounds n up to a multiple of the native packet (16): the padded query count of the native
/// score tile and the padded value width of its accumulator.
constexpr Index bf16_padded(Index n) {
    return (n + bf16_lanes - 1) / bf16_lanes * bf16_lanes;
}

/// qp ← the pair-interleaved queries q(:, 0 : nq) (layout at the top of this file), zero for
/// queries nq..nqp and for the partner of an odd d_k. Unscaled: the scale multiplies the fp32
/// scores, so Q keeps its exact bf16 values. A pair of Q(d, c), Q(d+1, c) is adjacent in column
/// c, so it moves as one 32-bit word.
inline void pack_query_pairs(const Eigen::bfloat16* q, Index q_stride, Index dk, Index nq,
                             Index nqp, std::uint16_t* qp) {
    const Index pairs = (dk + 1) / 2, full = dk / 2;
    if (nq < nqp || dk % 2 != 0) std::fill(qp, qp + pairs * nqp * 2, std::uint16_t(0));
    // 16 queries at a time, pair by pair: each pair's 16 words fill one cache line of qp, and the
    // 16 query columns stay in L1 meanwhile. Query by query, every store went to another line of
    // qp; pair by pair over all the block's queries, the columns (a QKV row apart: 3 KB for
    // 512/8 heads, which L1 maps to 4 of its sets) evicted each other. Either took 7 % of the
    // bf16 core at L = 512, causal (profiled).
    // On AVX-512, 16 queries × 16 pairs go through registers as a 16 × 16 block of 32-bit words:
    // one 64-byte load per query column, one 64-byte store per pair. Word by word, the packing
    // was 2 % of the bf16 core at L = 2048 and 3 % with the causal mask (profiled).
    Index c_done = 0, d2_done = 0;
#if defined(__AVX512F__)
    d2_done = full / 16 * 16;
    for (; c_done + 16 <= nq; c_done += 16)
        for (Index d2 = 0; d2 < d2_done; d2 += 16) {
            __m512 r[16];
            for (int i = 0; i < 16; ++i)
                r[i] = _mm512_loadu_ps(q + (c_done + i) * q_stride + 2 * d2);
            transpose_16x16(r);
            for (int i = 0; i < 16; ++i)
                _mm512_storeu_ps(qp + (d2 + i) * nqp * 2 + 2 * c_done, r[i]);
        }
#endif
    for (Index c0 = 0; c0 < nq; c0 += bf16_lanes) {
        const Index c1 = std::min(nq, c0 + bf16_lanes);
        for (Index d2 = c0 < c_done ? d2_done : 0; d2 < full; ++d2) {
            std::uint16_t* row = qp + d2 * nqp * 2;
            for (Index c = c0; c < c1; ++c)
                std::memcpy(row + 2 * c, q + c * q_stride + 2 * d2, 2 * sizeof(std::uint16_t));
        }
    }
    if (dk % 2 != 0)
        for (Index c = 0; c < nq; ++c)
            qp[(full * nqp + c) * 2] = bf16_bits(q[c * q_stride + dk - 1]);
}

/// vp ← the pair-interleaved values V(0 : dv, 0 : nk) (value j at v + j·v_stride), zero in rows
/// dv..dvp and in the partner of an odd last key.
inline void pack_value_pairs(const Eigen::bfloat16* v, Index v_stride, Index dv, Index nk,
                             Index dvp, std::uint16_t* vp) {
    const Index pairs = (nk + 1) / 2;
    if (dv < dvp || nk % 2 != 0) std::fill(vp, vp + pairs * dvp * 2, std::uint16_t(0));
    Index j = 0;
#if defined(MHA_BF16_NATIVE)
    // Two keys at a time, 32 rows at a time: the rows of keys j and j + 1 interleaved by one
    // two-source permute per 32 outputs.
    alignas(64) static constexpr std::int16_t low[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                                         37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                                         11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    alignas(64) static constexpr std::int16_t high[32] = {
        16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
        24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
    const __m512i lo_idx = _mm512_load_si512(low), hi_idx = _mm512_load_si512(high);
    for (; j + 2 <= nk; j += 2) {
        const Eigen::bfloat16* a = v + j * v_stride;
        const Eigen::bfloat16* b = a + v_stride;
        std::uint16_t* dst = vp + (j / 2) * dvp * 2;
        Index e = 0;
        for (; e + 32 <= dv; e += 32) {
            const __m512i x = _mm512_loadu_si512(a + e), y = _mm512_loadu_si512(b + e);
            _mm512_storeu_si512(dst + 2 * e, _mm512_permutex2var_epi16(x, lo_idx, y));
            _mm512_storeu_si512(dst + 2 * e + 32, _mm512_permutex2var_epi16(x, hi_idx, y));
        }
        for (; e < dv; ++e) {
            dst[2 * e] = bf16_bits(a[e]);
            dst[2 * e + 1] = bf16_bits(b[e]);
        }
    }
#endif
    for (; j < nk; ++j) {
        const Eigen::bfloat16* vj = v + j * v_stride;
        std::uint16_t* dst = vp + (j / 2) * dvp * 2 + j % 2;
        for (Index e = 0; e < dv; ++e)
            dst[2 * e] = bf16_bits(vj[e]);
    }
}

#if defined(MHA_BF16_NATIVE)

/// The 32-bit word at p (two bf16), loaded whatever its alignment.
MHA_ALWAYS_INLINE std::uint32_t load_pair(const void* p) {
    std::uint32_t w;
    std::memcpy(&w, p, sizeof w);
    return w;
}

/// acc + the pairwise products of a and b, each holding 32 bf16 (vdpbf16ps).
MHA_ALWAYS_INLINE __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
    return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh&>(a), reinterpret_cast<__m512bh&>(b));
}

/// One native score tile: st(0 : QP·16, 0 : Keys) = scale · qp-queries · K(:, 0 : Keys); with a
/// non-null `mx`, also mx(0 : QP·16) = max(mx, the tile's scaled max per query) over the scores
/// that are not NaN: one vmaxps per score, where a NaN-propagating max takes three and made the
/// tile slower than the separate pass it saved. With `limits`, the tile's first key is key j of
/// the block and a score of query c outside [limits.from[c], limits.to[c]) becomes −∞ before it
/// is stored or taken into the max (a boundary block masked in the registers).
template <int QP, int Keys>
MHA_ALWAYS_INLINE void score_tile_bf16(const std::uint16_t* qp, Index nqp, Index dk,
                                       const Eigen::bfloat16* k, Index k_stride, float scale,
                                       float* st, Index ld, float* mx,
                                       const block_key_limits& limits = {}, Index j = 0) {
    __m512 acc[QP][Keys];
    for (int p = 0; p < QP; ++p)
        for (int r = 0; r < Keys; ++r)
            acc[p][r] = _mm512_setzero_ps();
    const Index full = dk / 2;
    for (Index d2 = 0; d2 < full; ++d2) {
        __m512i x[QP];
        for (int p = 0; p < QP; ++p)
            x[p] = _mm512_loadu_si512(qp + (d2 * nqp + p * bf16_lanes) * 2);
        for (int r = 0; r < Keys; ++r) {
            const __m512i b =
                _mm512_set1_epi32(static_cast<int>(load_pair(k + r * k_stride + 2 * d2)));
            for (int p = 0; p < QP; ++p)
                acc[p][r] = dot_pairs(acc[p][r], x[p], b);
        }
    }
    if (dk % 2 != 0) {  // the last d alone: its partner is 0 in qp and here (never K's next word)
        __m512i x[QP];
        for (int p = 0; p < QP; ++p)
            x[p] = _mm512_loadu_si512(qp + (full * nqp + p * bf16_lanes) * 2);
        for (int r = 0; r < Keys; ++r) {
            const __m512i b =
                _mm512_set1_epi32(static_cast<int>(bf16_bits(k[r * k_stride + dk - 1])));
            for (int p = 0; p < QP; ++p)
                acc[p][r] = dot_pairs(acc[p][r], x[p], b);
        }
    }
    const __m512 s = _mm512_set1_ps(scale);
    for (int r = 0; r < Keys; ++r)
        for (int p = 0; p < QP; ++p)
            acc[p][r] = _mm512_mul_ps(acc[p][r], s);
    if (limits.from != nullptr) mask_outside_limits(acc, limits, j);
    for (int r = 0; r < Keys; ++r)
        for (int p = 0; p < QP; ++p)
            _mm512_storeu_ps(st + r * ld + p * bf16_lanes, acc[p][r]);
    if (mx == nullptr) return;
    for (int p = 0; p < QP; ++p) {
        __m512 m = _mm512_loadu_ps(mx + p * bf16_lanes);
        for (int r = 0; r < Keys; ++r)
            m = _mm512_max_ps(acc[p][r], m);
        _mm512_storeu_ps(mx + p * bf16_lanes, m);
    }
}

/// st(0 : nqp, 0 : nk) = scale · Qᵀ·K(:, 0 : nk) with the queries packed by pack_query_pairs,
/// key j at k + j·k_stride. With `ranges` and `mx`, as transposed_scores, but mx(c) becomes the
/// max of query c's scaled scores that are not NaN (−∞ when all are NaN), for blocks left as
/// computed or masked by `limits` (see score_tile_bf16; rows outside `ranges` are not written).
inline void transposed_scores_bf16(const std::uint16_t* qp, Index nqp, Index dk,
                                   const Eigen::bfloat16* k, Index k_stride, Index nk, float scale,
                                   float* st, Index ld, const query_key_ranges& ranges = {},
                                   float* mx = nullptr, const block_key_limits& limits = {}) {
    constexpr Index w = bf16_lanes;
    if (mx != nullptr) std::fill(mx, mx + nqp, -std::numeric_limits<float>::infinity());
    // 4 packets of queries × 6 keys: 24 accumulators of the 32 registers, and 10 loads or
    // broadcasts per 24 dot products (2 × 8 needed 10 per 16).
    constexpr int qpk = 4, keys = 6;
    auto tiles = [&](auto packets, auto width, Index i, Index j0, Index j1) {
        constexpr int n_packets = decltype(packets)::value;
        float* m = mx == nullptr ? nullptr : mx + i;
        const block_key_limits lim = limits.at(i);
        for_each_key_tile<decltype(width)::value>(
            j0, j1, [&](auto n_keys, Index j) MHA_ALWAYS_INLINE_LAMBDA {
                score_tile_bf16<n_packets, decltype(n_keys)::value>(
                    qp + i * 2, nqp, dk, k + j * k_stride, k_stride, scale, st + j * ld + i, ld, m,
                    lim, j);
            });
    };
    Index i = 0;
    for (; i + qpk * w <= nqp; i += qpk * w)
        split_query_tile<qpk / 2, w>(
            ranges, i, nk, [&](auto packets, Index at, Index j0, Index j1) {
                tiles(packets, std::integral_constant<int, keys>{}, at, j0, j1);
            });
    for (; i < nqp; i += w) {
        const auto [j_lo, j_hi] = ranges.of(i, i + w, nk);
        tiles(std::integral_constant<int, 1>{}, std::integral_constant<int, 2 * keys>{}, i, j_lo,
              j_hi);
    }
}

/// One native value tile: acc(0 : VP·16, 0 : Queries) += V · P over key pairs [jp0, jp1) of the
/// packed block (vp, row stride dvp; pp, query stride nqp).
template <int VP, int Queries>
MHA_ALWAYS_INLINE void value_tile_bf16(const std::uint16_t* vp, Index dvp, Index jp0, Index jp1,
                                       const std::uint16_t* pp, Index nqp, float* acc,
                                       Index ld_acc) {
    __m512 o[VP][Queries];
    for (int c = 0; c < Queries; ++c)
        for (int p = 0; p < VP; ++p)
            o[p][c] = _mm512_loadu_ps(acc + c * ld_acc + p * bf16_lanes);
    for (Index jp = jp0; jp < jp1; ++jp) {
        __m512i x[VP];
        for (int p = 0; p < VP; ++p)
            x[p] = _mm512_loadu_si512(vp + (jp * dvp + p * bf16_lanes) * 2);
        for (int c = 0; c < Queries; ++c) {
            const __m512i b =
                _mm512_set1_epi32(static_cast<int>(load_pair(pp + (jp * nqp + c) * 2)));
            for (int p = 0; p < VP; ++p)
                o[p][c] = dot_pairs(o[p][c], x[p], b);
        }
    }
    for (int c = 0; c < Queries; ++c)
        for (int p = 0; p < VP; ++p)
            _mm512_storeu_ps(acc + c * ld_acc + p * bf16_lanes, o[p][c]);
}

/// acc(0 : dvp, 0 : nq) += V·P over the nk keys of a block packed by pack_value_pairs (vp) and
/// pack_probability_pairs (pp). With `ranges`, a query tile reads only the key pairs that meet
/// the union of its queries' ranges (P is 0 elsewhere; a pair's other key may be outside, with
/// P = 0 for it).
inline void accumulate_values_bf16(const std::uint16_t* vp, Index dvp, Index nk,
                                   const std::uint16_t* pp, Index nqp, Index nq, float* acc,
                                   Index ld_acc, const query_key_ranges& ranges = {}) {
    constexpr Index chunk_pairs = 64;  // 128 keys: a chunk of V (16 KB for d_v = 64) stays in L1
    // With d_v = 64, 4 packets of rows × 6 queries: 24 accumulators, 10 loads or broadcasts per
    // 24 dot products.
    constexpr int queries = 6;
    const Index pairs = (nk + 1) / 2;
    for (Index p0 = 0; p0 < pairs; p0 += chunk_pairs) {
        const Index p1 = std::min(pairs, p0 + chunk_pairs);
        auto rows = [&](auto tile, Index c) {
            constexpr int n = decltype(tile)::value;
            const auto [lo, hi] = ranges.of(c, c + n, nk);
            if (lo >= hi) return;
            const Index a = std::max(p0, lo / 2), b = std::min(p1, (hi + 1) / 2);
            if (a >= b) return;
            const std::uint16_t* pc = pp + c * 2;
            float* ac = acc + c * ld_acc;
            Index e = 0;
            for (; e + 4 * bf16_lanes <= dvp; e += 4 * bf16_lanes)
                value_tile_bf16<4, n>(vp + e * 2, dvp, a, b, pc, nqp, ac + e, ld_acc);
            for (; e + 2 * bf16_lanes <= dvp; e += 2 * bf16_lanes)
                value_tile_bf16<2, n>(vp + e * 2, dvp, a, b, pc, nqp, ac + e, ld_acc);
            for (; e < dvp; e += bf16_lanes)
                value_tile_bf16<1, n>(vp + e * 2, dvp, a, b, pc, nqp, ac + e, ld_acc);
        };
        Index c = 0;
        for (; c + queries <= nq; c += queries)
            rows(std::integral_constant<int, queries>{}, c);
        for (; c < nq; ++c)
            rows(std::integral_constant<int, 1>{}, c);
    }
}

#endif  // MHA_BF16_NATIVE

}  // namespace detail
}  // namespace mha
