// SPDX-License-Identifier: MIT
// Which keys of a block each query may see, as the block kernels take it: the union of a query
// tile's ranges (query_key_ranges), which cuts the score and value tiles short on the causal
// diagonal and in sliding windows, and the per-query limits a score tile masks by in its
// registers (block_key_limits, mask_outside_limits), shared by the float and bf16 tiles
// (detail/tiled/block_kernels.hpp, block_kernels_bf16.hpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

#include <mha/core.hpp>
#include <mha/detail/eigen_compat.hpp>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace mha {
namespace detail {

/// The keys each query of a block may see, so that tiles whose queries all stop early (the
/// causal diagonal, a sliding window) are cut short: query c sees block keys
/// [first[c] − offset, last[c] − offset), clamped to the block; first[c] >= last[c] means none.
/// A default-constructed range (first = nullptr) lets every query see every key of the block.
struct query_key_ranges {
    const Index* first = nullptr;
    const Index* last = nullptr;
    Index count = 0;   ///< queries with a range; the others (padding) take the tile's range
    Index offset = 0;  ///< the block's first key

    /// The union of the ranges of queries [c0, c1), relative to the block of nk keys.
    std::pair<Index, Index> of(Index c0, Index c1, Index nk) const {
        if (first == nullptr) return {0, nk};
        Index lo = nk, hi = 0;
        for (Index c = c0; c < std::min(c1, count); ++c) {
            const Index f = std::max(first[c] - offset, Index(0));
            const Index e = std::min(last[c] - offset, nk);
            if (f >= e) continue;
            lo = std::min(lo, f);
            hi = std::max(hi, e);
        }
        return {lo, std::max(lo, hi)};
    }
};

/// The key spans a score tile of 2·Half packets of W queries, from query i, computes: the keys
/// both halves of its queries may see by the whole tile, tiles(std::integral_constant<int,
/// 2·Half>{}, i, j0, j1); the keys only one half may see by that half alone,
/// tiles(std::integral_constant<int, Half>{}, i or i + Half·W, j0, j1). A span may be empty
/// (j0 >= j1). On the causal diagonal the later half sees up to Half·W keys more than the first:
/// computed for the whole tile, they were 6 % of the float score products at L = 512, causal.
template <int Half, Index W, class Tiles>
MHA_ALWAYS_INLINE void split_query_tile(const query_key_ranges& ranges, Index i, Index nk,
                                        Tiles&& tiles) {
    using whole = std::integral_constant<int, 2 * Half>;
    using half = std::integral_constant<int, Half>;
    const Index ib = i + Half * W;
    const auto [lo_a, hi_a] = ranges.of(i, ib, nk);
    const auto [lo_b, hi_b] = ranges.of(ib, ib + Half * W, nk);
    const Index both_lo = std::max(lo_a, lo_b), both_hi = std::min(hi_a, hi_b);
    if (both_lo >= both_hi) {
        tiles(half{}, i, lo_a, hi_a);
        tiles(half{}, ib, lo_b, hi_b);
        return;
    }
    tiles(whole{}, i, both_lo, both_hi);
    tiles(half{}, i, lo_a, std::min(hi_a, both_lo));
    tiles(half{}, i, std::max(lo_a, both_hi), hi_a);
    tiles(half{}, ib, lo_b, std::min(hi_b, both_lo));
    tiles(half{}, ib, std::max(lo_b, both_hi), hi_b);
}

/// Per query of a block (padded), its allowed keys [from, to) relative to the block's first key;
/// null: no limits (every computed score kept). A score tile masks by them in its registers
/// (score_micro_tile, score_tile_bf16).
struct block_key_limits {
    const std::int32_t* from = nullptr;
    const std::int32_t* to = nullptr;

    /// The limits of the queries from c on.
    block_key_limits at(Index c) const {
        return from == nullptr ? block_key_limits{} : block_key_limits{from + c, to + c};
    }
};

#if defined(__AVX512F__)
/// acc[p][r], the scores of queries p·16 to p·16 + 15 with key j + r, becomes −∞ where that key
/// lies outside the query's [limits.from, limits.to). Shared by the float tile (Eigen's float
/// packet on AVX-512 is __m512) and the bf16 tile, whose accumulators are float.
template <int QP, int Keys>
MHA_ALWAYS_INLINE void mask_outside_limits(__m512 (&acc)[QP][Keys], const block_key_limits& limits,
                                           Index j) {
    const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int p = 0; p < QP; ++p) {
        const __m512i from = _mm512_loadu_si512(limits.from + p * 16);
        const __m512i to = _mm512_loadu_si512(limits.to + p * 16);
        for (int r = 0; r < Keys; ++r) {
            const __m512i key = _mm512_set1_epi32(static_cast<int>(j + r));
            const __mmask16 allowed =
                _mm512_cmpge_epi32_mask(key, from) & _mm512_cmplt_epi32_mask(key, to);
            acc[p][r] = _mm512_mask_mov_ps(minus_inf, allowed, acc[p][r]);
        }
    }
}
#elif defined(__AVX2__)
/// mask_outside_limits for the float tile on AVX2 (Eigen's float packet is __m256): the same
/// test with 8-lane integer compares, a key allowed where from <= key < to.
template <int QP, int Keys>
MHA_ALWAYS_INLINE void mask_outside_limits(__m256 (&acc)[QP][Keys], const block_key_limits& limits,
                                           Index j) {
    const __m256 minus_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    for (int p = 0; p < QP; ++p) {
        const __m256i from =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(limits.from + p * 8));
        const __m256i to = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(limits.to + p * 8));
        for (int r = 0; r < Keys; ++r) {
            const __m256i key = _mm256_set1_epi32(static_cast<int>(j + r));
            // ~(from > key) & (to > key); blendv takes acc where the lane's sign bit is set.
            const __m256i allowed =
                _mm256_andnot_si256(_mm256_cmpgt_epi32(from, key), _mm256_cmpgt_epi32(to, key));
            acc[p][r] = _mm256_blendv_ps(minus_inf, acc[p][r], _mm256_castsi256_ps(allowed));
        }
    }
}
#endif

}  // namespace detail
}  // namespace mha
