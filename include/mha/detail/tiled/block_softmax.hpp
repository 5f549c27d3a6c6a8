// SPDX-License-Identifier: MIT
// The softmax steps of one block of transposed scores (st: a column per key, queries along it;
// layouts in detail/tiled/block_kernels.hpp), shared by the fp32 and bf16 online passes and the
// backward: each query's max, the shifted exp with its sum, and the check of an output column
// (the AVX-512 and AVX2 exps behind them are in detail/tiled/exp_avx512.hpp and exp_avx2.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include <Eigen/Core>

#include <mha/core.hpp>
#include <mha/detail/eigen_compat.hpp>
#include <mha/detail/tiled/block_kernels.hpp>
#include <mha/detail/tiled/exp_avx2.hpp>
#include <mha/detail/tiled/exp_avx512.hpp>
#include <mha/normalization.hpp>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace mha {
namespace detail {

/// st[r·ld + c] = −∞ for each key j0 + r (r < nk) outside query c's allowed interval
/// [first[c], last[c]) (absolute key indices, first[c] <= last[c]), for c < nq; keys in
/// [max_first, min_last), inside every query's interval, are skipped. The block is walked key by
/// key, so the stores run along a key's column of queries: masking query by query stored one
/// score per cache line (a third of the bf16 online pass at L = 512, causal, profiled).
template <class Scalar>
void mask_outside_intervals(Scalar* st, Index ld, Index nq, Index j0, Index nk, const Index* first,
                            const Index* last, Index max_first, Index min_last) {
    const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
    for (Index r = 0; r < nk; ++r) {
        const Index j = j0 + r;
        if (j >= max_first && j < min_last) continue;
        Scalar* col = st + r * ld;
        Index c = 0;
#if defined(__AVX512F__)
        if constexpr (std::is_same_v<Scalar, float> && sizeof(Index) == 8) {
            const __m512i key = _mm512_set1_epi64(static_cast<long long>(j));
            const __m512 fill = _mm512_set1_ps(minus_inf);
            // 8 queries' bounds per compare: the keys before first[c] or from last[c] on.
            auto outside = [&](Index at) {
                return static_cast<unsigned>(
                    _mm512_cmpgt_epi64_mask(_mm512_loadu_si512(first + at), key) |
                    _mm512_cmple_epi64_mask(_mm512_loadu_si512(last + at), key));
            };
            for (; c + 16 <= nq; c += 16)
                _mm512_mask_storeu_ps(
                    col + c, static_cast<__mmask16>(outside(c) | (outside(c + 8) << 8)), fill);
        }
#endif
        for (; c < nq; ++c)
            if (j < first[c] || j >= last[c]) col[c] = minus_inf;
    }
}

/// mx[c] = max over keys j < nk of st[j·ld + c], for c < nqp (a multiple of the packet width);
/// NaN when any of them is NaN, −∞ when nk = 0.
template <class Scalar>
void max_per_query(const Scalar* st, Index ld, Index nqp, Index nk, Scalar* mx) {
    using traits = block_kernel_traits<Scalar>;
    using ops = typename traits::ops;
    constexpr Index w = traits::width;
    std::fill(mx, mx + nqp, -std::numeric_limits<Scalar>::infinity());
    for (Index j = 0; j < nk; ++j) {
        const Scalar* col = st + j * ld;
        if constexpr (w > 1) {
            for (Index c = 0; c < nqp; c += w)
                ops::store(mx + c, ops::max_nan(ops::load(mx + c), ops::load(col + c)));
        } else {
            for (Index c = 0; c < nqp; ++c)
                mx[c] = nan_propagating_max(mx[c], col[c]);
        }
    }
}

/// True when every entry of x is finite. Eigen's allFinite() tests one coefficient at a time
/// (about 4 % of the bf16 attention at L = 2048, for a check on each output column); x·0 is 0
/// for a finite x and NaN for ±∞ or NaN, so the vectorised sum of x·0 is 0 exactly when all are
/// (under -ffast-math, which may fold x·0 to 0, Eigen's test).
template <class Derived>
bool all_finite(const Eigen::MatrixBase<Derived>& x) {
#if defined(__FAST_MATH__)
    return x.allFinite();
#else
    using Scalar = typename Derived::Scalar;
    return (x.array() * Scalar(0)).sum() == Scalar(0);
#endif
}

/// Below this difference from the running max, exp() would be subnormal (or nearly so): the
/// kernel uses 0 instead. Subnormal probabilities and rescale factors make every later
/// multiply-add slow on many CPUs (double scores spread by ~1e4 ran 30x slower), and a term below
/// 2^-1021 of the largest one (which contributes exp(0) = 1 to the sum) is far below the
/// rounding of that sum, so dropping it changes no result by more than rounding. The caller's
/// floating-point environment (flush-to-zero) is left alone.
template <class Scalar>
constexpr Scalar exp_flush_below() {
    // log(numeric_limits::min()) + 1, with min() = 2^(min_exponent − 1).
    return static_cast<Scalar>((std::numeric_limits<Scalar>::min_exponent - 1) *
                               0.693147180559945309417232121458176568L) +
           Scalar(1);
}

/// exp(d), or 0 when d < exp_flush_below (NaN stays NaN).
template <class Scalar>
Scalar exp_or_zero(Scalar d) {
    return d < exp_flush_below<Scalar>() ? Scalar(0) : std::exp(d);
}

#if defined(__AVX512F__)
/// exp_shifted_per_query for float on AVX-512: exp_above_flush (shifted scores are <= 0 but for
/// NaN), under half the instructions of Eigen's pexp, with the sum of each query packet kept in a
/// register; the exp pass was a sixth of a block's time with pexp. The keys outside `ranges`
/// are written as zeros without being read.
inline void exp_shifted_per_query_avx512(float* st, Index ld, Index nqp, Index nk,
                                         const float* shift, float* sum,
                                         const query_key_ranges& ranges) {
    // It is bound by the floating-point pipes, so the entries to clear take one compare and the
    // exp's own zero-masking: 14 % faster than a compare for −∞, another for the flush and a
    // masked move (a scratch loop over one 128 × 512 block, Zen 5).
    const __m512 flush = _mm512_set1_ps(exp_flush_below<float>());
    for (Index c = 0; c < nqp; c += 16) {
        const __m512 sh = _mm512_loadu_ps(shift + c);
        __m512 total = _mm512_setzero_ps();
        // The value tiles read keys next to [lo, hi) (a tile of queries across two packets):
        // those are written as zeros, not left as they were.
        const auto [lo, hi] = ranges.of(c, c + 16, nk);
        for (Index j = 0; j < lo; ++j)
            _mm512_storeu_ps(st + j * ld + c, _mm512_setzero_ps());
        for (Index j = hi; j < nk; ++j)
            _mm512_storeu_ps(st + j * ld + c, _mm512_setzero_ps());
        for (Index j = lo; j < hi; ++j) {
            float* col = st + j * ld + c;
            const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(col), sh);
            // A −∞ score needs no test of its own: the shift is finite or +∞ (0 for a query
            // with nothing allowed yet), so its difference is −∞, below the flush; or the
            // shift is NaN, and then every probability and the sum of the query are NaN (its
            // output is NaN either way). The unordered compare keeps NaN.
            const __m512 e = exp_above_flush(d, _mm512_cmp_ps_mask(d, flush, _CMP_NLT_UQ));
            _mm512_storeu_ps(col, e);
            total = _mm512_add_ps(total, e);
        }
        _mm512_storeu_ps(sum + c, total);
    }
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
/// exp_shifted_per_query for float on AVX2: the AVX-512 pass with exp_above_flush_avx2 (1.9
/// units of 2^-24 at most, measured), the lanes to clear by an and with the compare. The fp32
/// core 7 % faster at L = 2048 than with Eigen's pexp, its two compares and the sums kept in
/// memory (paired comparison, Zen 3; docs/performance.md). As on AVX-512, the keys outside
/// `ranges` are written as zeros without being read.
inline void exp_shifted_per_query_avx2(float* st, Index ld, Index nqp, Index nk, const float* shift,
                                       float* sum, const query_key_ranges& ranges) {
    const __m256 flush = _mm256_set1_ps(exp_flush_below<float>());
    for (Index c = 0; c < nqp; c += 8) {
        const __m256 sh = _mm256_loadu_ps(shift + c);
        __m256 total = _mm256_setzero_ps();
        const auto [lo, hi] = ranges.of(c, c + 8, nk);
        for (Index j = 0; j < lo; ++j)
            _mm256_storeu_ps(st + j * ld + c, _mm256_setzero_ps());
        for (Index j = hi; j < nk; ++j)
            _mm256_storeu_ps(st + j * ld + c, _mm256_setzero_ps());
        for (Index j = lo; j < hi; ++j) {
            float* col = st + j * ld + c;
            // As on AVX-512: −∞ scores fall below the flush, NaN passes the unordered compare.
            const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(col), sh);
            const __m256 e =
                _mm256_and_ps(exp_above_flush_avx2(d), _mm256_cmp_ps(d, flush, _CMP_NLT_UQ));
            _mm256_storeu_ps(col, e);
            total = _mm256_add_ps(total, e);
        }
        _mm256_storeu_ps(sum + c, total);
    }
}
#endif

/// exp_shifted_per_query on Eigen's packets (double, and float without AVX2 with FMA), or one
/// value at a time where the packets are one lane wide or have no exp: −∞ scores and
/// differences below the flush cleared by compares, the sums kept in memory.
template <class Scalar>
void exp_shifted_per_query_packets(Scalar* st, Index ld, Index nqp, Index nk, const Scalar* shift,
                                   Scalar* sum) {
    using traits = block_kernel_traits<Scalar>;
    using ops = typename traits::ops;
    using packet = typename traits::packet;
    constexpr Index w = traits::width;
    const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
    std::fill(sum, sum + nqp, Scalar(0));
    if constexpr (w > 1 && ops::has_exp) {
        const packet pinf = ops::broadcast(minus_inf);
        const packet flush = ops::broadcast(exp_flush_below<Scalar>());
        for (Index j = 0; j < nk; ++j) {
            Scalar* col = st + j * ld;
            for (Index c = 0; c < nqp; c += w) {
                const packet x = ops::load(col + c);
                const packet d = ops::sub(x, ops::load(shift + c));
                // `less` is false for NaN, so NaN differences keep their NaN.
                const packet e = ops::clear_where(
                    ops::exp(d), ops::either(ops::equal(x, pinf), ops::less(d, flush)));
                ops::store(col + c, e);
                ops::store(sum + c, ops::add(ops::load(sum + c), e));
            }
        }
    } else {
        for (Index j = 0; j < nk; ++j) {
            Scalar* col = st + j * ld;
            for (Index c = 0; c < nqp; ++c) {
                const Scalar e = col[c] == minus_inf ? Scalar(0) : exp_or_zero(col[c] - shift[c]);
                col[c] = e;
                sum[c] += e;
            }
        }
    }
}

/// st[j·ld + c] = exp(st[j·ld + c] − shift[c]) for j < nk, c < nqp, with −∞ giving exactly 0
/// (a vectorised exp(−∞) may return a denormal instead; NaN for a query whose shift is NaN, on
/// AVX-512 and AVX2), differences below exp_flush_below giving 0 and NaN staying NaN; sum[c]
/// receives the sum over j. With `ranges` (float on AVX-512 or AVX2, see tiles_mask_boundaries),
/// the keys outside the union of the ranges of a packet of queries get 0 without being read: the
/// score tiles of a block they masked did not write them.
template <class Scalar>
void exp_shifted_per_query(Scalar* st, Index ld, Index nqp, Index nk, const Scalar* shift,
                           Scalar* sum, [[maybe_unused]] const query_key_ranges& ranges = {}) {
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<Scalar, float>) {
        exp_shifted_per_query_avx512(st, ld, nqp, nk, shift, sum, ranges);
        return;
    }
#elif defined(__AVX2__) && defined(__FMA__)
    if constexpr (std::is_same_v<Scalar, float> && block_kernel_traits<Scalar>::width == 8) {
        exp_shifted_per_query_avx2(st, ld, nqp, nk, shift, sum, ranges);
        return;
    }
#endif
    exp_shifted_per_query_packets(st, ld, nqp, nk, shift, sum);
}

}  // namespace detail
}  // namespace mha
