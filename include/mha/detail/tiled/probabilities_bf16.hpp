// SPDX-License-Identifier: MIT
// The probabilities of the vdpbf16ps kernels (detail/tiled/block_kernels_bf16.hpp): P rounded to
// bf16 (nearest-even) and pair-interleaved for P·V (layout pp at the top of that file), either
// from probabilities already computed or fused with the online softmax's exp pass.
#pragma once

#include <algorithm>
#include <cstdint>

#include <mha/core.hpp>
#include <mha/detail/tiled/block_kernels.hpp>
#include <mha/detail/tiled/block_kernels_bf16.hpp>
#include <mha/detail/tiled/block_softmax.hpp>

#if defined(MHA_BF16_NATIVE)
#include <immintrin.h>

namespace mha {
namespace detail {

/// The permutation of a 32 × bf16 register that interleaves its halves: element 2c ← c,
/// 2c + 1 ← 16 + c, so that the two keys of a pair (the halves, one key each) lie side by side.
inline __m512i interleave_halves_bf16() {
    alignas(64) static constexpr std::int16_t order[32] = {
        0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
        8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    return _mm512_load_si512(order);
}

/// pp ← P(0 : nk, 0 : nqp) rounded to bf16 (nearest-even) and pair-interleaved, from the
/// transposed probabilities st (P(j, c) = st[j·ld + c]); the partner of an odd last key is 0.
inline void pack_probability_pairs(const float* st, Index ld, Index nqp, Index nk,
                                   std::uint16_t* pp) {
    const __m512i idx = interleave_halves_bf16();
    for (Index j = 0; j < nk; j += 2) {
        const float* even = st + j * ld;
        const float* odd = j + 1 < nk ? st + (j + 1) * ld : nullptr;
        for (Index c = 0; c < nqp; c += bf16_lanes) {
            const __m512 lo = _mm512_loadu_ps(even + c);
            const __m512 hi = odd != nullptr ? _mm512_loadu_ps(odd + c) : _mm512_setzero_ps();
            // Elements 0..15 from `lo` (key j), 16..31 from `hi` (key j + 1).
            const __m512bh both = _mm512_cvtne2ps_pbh(hi, lo);
            const __m512i pairs =
                _mm512_permutexvar_epi16(idx, reinterpret_cast<const __m512i&>(both));
            _mm512_storeu_si512(pp + ((j / 2) * nqp + c) * 2, pairs);
        }
    }
}

/// The online softmax's exp pass fused with pack_probability_pairs: for keys j < nk and
/// queries c < nqp, P(j, c) = exp(st[j·ld + c] − shift[c]) with exp_shifted_per_query's rules
/// (−∞ gives exactly 0, differences below exp_flush_below give 0, NaN stays NaN; the exp is
/// exp_nonpositive_for_bf16), but for a query whose shift is NaN: every P of it is NaN then,
/// −∞ scores too, where the fp32 pass gives them 0 (its output is NaN either way); sum[c] gets the
/// fp32 sum over j, pp the bf16 pairs. st is read once and not written. With `ranges`, the key
/// pairs outside the union of the ranges of a group of 16 queries take P = 0 without reading st
/// (every one of those keys is masked for all 16: on a causal diagonal, half the block).
inline void exp_pack_probability_pairs(const float* st, Index ld, Index nqp, Index nk,
                                       const float* shift, float* sum, std::uint16_t* pp,
                                       const query_key_ranges& ranges = {}) {
    const __m512i idx = interleave_halves_bf16();
    const __m512 flush = _mm512_set1_ps(exp_flush_below<float>());
    auto exp_of = [&](const float* col, __m512 sh) {
        const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(col), sh);
        // A −∞ score needs no test of its own: the shift is finite or +∞ (0 for a query with no
        // key yet), so its difference is −∞, below the flush; or the shift is NaN, and then so
        // is every probability and sum of the query. The unordered compare keeps NaN.
        const __mmask16 kept = _mm512_cmp_ps_mask(d, flush, _CMP_NLT_UQ);
        return exp_nonpositive_for_bf16(d, kept);
    };
    const Index key_pairs = (nk + 1) / 2;
    for (Index c = 0; c < nqp; c += bf16_lanes) {
        const __m512 sh = _mm512_loadu_ps(shift + c);
        __m512 total = _mm512_setzero_ps();
        // Pairs [a, b) meet the group's ranges; the value tiles read others next to them (a tile
        // of queries across two groups), so those are written as zeros, not left as they were.
        const auto [lo, hi] = ranges.of(c, c + bf16_lanes, nk);
        const Index a = lo / 2, b = std::max(a, (hi + 1) / 2);
        for (Index q = 0; q < a; ++q)
            _mm512_storeu_si512(pp + (q * nqp + c) * 2, _mm512_setzero_si512());
        for (Index q = b; q < key_pairs; ++q)
            _mm512_storeu_si512(pp + (q * nqp + c) * 2, _mm512_setzero_si512());
        for (Index j = 2 * a; j < 2 * b; j += 2) {
            // A pair's key outside [lo, hi) is 0: a block masked in the score tiles has not
            // written its row (and a key past the last is the odd last key's partner).
            const __m512 e0 = j >= lo ? exp_of(st + j * ld + c, sh) : _mm512_setzero_ps();
            const __m512 e1 = j + 1 < hi ? exp_of(st + (j + 1) * ld + c, sh) : _mm512_setzero_ps();
            total = _mm512_add_ps(_mm512_add_ps(total, e0), e1);
            const __m512bh both = _mm512_cvtne2ps_pbh(e1, e0);
            const __m512i pairs =
                _mm512_permutexvar_epi16(idx, reinterpret_cast<const __m512i&>(both));
            _mm512_storeu_si512(pp + ((j / 2) * nqp + c) * 2, pairs);
        }
        _mm512_storeu_ps(sum + c, total);
    }
}

}  // namespace detail
}  // namespace mha

#endif  // MHA_BF16_NATIVE
