// SPDX-License-Identifier: MIT
// Block kernels of the bf16 tiled attention on AMX tiles (detail/amx.hpp says when they are
// compiled in and usable; detail/tiled/forward_bf16.hpp runs them for bf16_kernel::amx).
//
// Orientation. A tile's rows are contiguous, and the output accumulator of the tiled kernel is
// dv × queries column-major, i.e. one row of 16 value lanes per query in a tile's eyes. So both
// products are computed with queries as the tile rows:
//   scores   S (queries × keys, row-major, fp32) = Qᵀ · K: Qᵀ staged per task as rows of d_k
//            (rounded up to 32, zero-filled); K per key block in pairs of d along the rows and
//            keys along the words (the pair-interleaved order TDPBF16PS takes for its second
//            operand; pack_query_pairs of block_kernels_bf16.hpp writes exactly that order).
//   values   acc (queries × value rows, the accumulator's own memory) += P · Vᵀ: P rows of bf16
//            probabilities per query (keys along the row), V in pairs of keys (pack_value_pairs).
// The softmax between them runs along a query's row of S: scale, mask, NaN-propagating max,
// exp (the AVX-512 exp of the fp32 kernel, with the same flush and -∞ rules as
// exp_pack_probability_pairs), fp32 sum, and P rounded to bf16 (nearest-even) for P·V, as the
// vdpbf16ps kernel rounds it.
//
// Padding. Query, key and value counts are rounded up to 32 and d_k to 32 (two 16-row tiles or
// one 32-element chunk per step); the padding of every operand is zero, so padded entries add
// exact zeros, and padded rows and columns of S and acc are never read.
//
// Rounding. Each tile product sums 32 exact products per step in k order into fp32 (nearest-even,
// subnormals as zero), so the error model of the vdpbf16ps kernel (docs/performance.md,
// "bfloat16"; require_bf16_attention_close in tests/support/check.hpp) holds; the bits differ.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include <mha/core.hpp>
#include <mha/detail/amx.hpp>
#include <mha/detail/tiled/block_kernels.hpp>
#include <mha/detail/tiled/block_kernels_bf16.hpp>
#include <mha/detail/tiled/block_softmax.hpp>
#include <mha/detail/tiled/online_softmax.hpp>
#include <mha/detail/tiled/probabilities_bf16.hpp>

namespace mha {
namespace detail {

/// n rounded up to a multiple of 32: the step of the AMX kernels (two 16-row tiles, or one
/// 32-element chunk of a tile row).
constexpr Index amx_padded(Index n) {
    return (n + 31) / 32 * 32;
}

/// The AMX pass's tasks take this many query blocks (tiled_settings::query_block) each: it
/// packs each key block's K and V once per task and runs the queries 32 at a time, each 32 with
/// only the keys it may see, so larger tasks pack fewer times without computing masked keys.
inline constexpr Index amx_query_blocks_per_task = 4;
/// The AMX pass's largest key block: 32 queries' fp32 scores of 256 keys (32 KiB) stay in L1
/// between the tile stores, the scaling and the exp pass (512 keys spilled them to L2).
inline constexpr Index amx_key_block = 256;

#if defined(MHA_BF16_AMX)

/// qt ← Qᵀ for queries [0, nq): row c holds Q(0 : dk, c) then zeros up to dkp; rows nq … nqp
/// zero.
inline void stage_queries_amx(const Eigen::bfloat16* q, Index q_stride, Index dk, Index nq,
                              Index nqp, Index dkp, std::uint16_t* qt) {
    for (Index c = 0; c < nqp; ++c) {
        std::uint16_t* row = qt + c * dkp;
        Index d = 0;
        if (c < nq) {
            std::memcpy(row, q + c * q_stride,
                        static_cast<std::size_t>(dk) * sizeof(std::uint16_t));
            d = dk;
        }
        std::fill(row + d, row + dkp, std::uint16_t(0));
    }
}

/// r[i] ← column i of the 16 × 16 matrix of 32-bit words whose rows are r[0 … 15].
MHA_ALWAYS_INLINE void transpose_16x16_words(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; ++i) {  // pairs of rows interleaved word by word
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {  // then two words at a time: 4 × 4 blocks in each 128-bit lane
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int i = 0; i < 4; ++i) {  // then the lanes, twice
        t[i] = _mm512_shuffle_i32x4(u[i], u[4 + i], 0x88);
        t[4 + i] = _mm512_shuffle_i32x4(u[i], u[4 + i], 0xdd);
        t[8 + i] = _mm512_shuffle_i32x4(u[8 + i], u[12 + i], 0x88);
        t[12 + i] = _mm512_shuffle_i32x4(u[8 + i], u[12 + i], 0xdd);
    }
    for (int i = 0; i < 8; ++i) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
        r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);
    }
}

/// Word index of the pair (K(2p, j), K(2p+1, j)) in the key pairs of pack_key_pairs_amx: tiles
/// of 16 keys, each tile's rows (pairs) of 16 words contiguous, so that a 16-pair × 16-key tile
/// is 1 KiB in one piece (rows a block's width apart fell into the same few L1 sets).
constexpr Index key_pair_word(Index p, Index j, Index pair_rows) {
    return ((j / 16) * pair_rows + p) * 16 + j % 16;
}

/// kp ← K(:, 0 : nk) in pairs of d, 16-key tiles (key_pair_word, pair_rows = dkp / 2); zero for
/// keys nk … nkp, for the partner of an odd d_k and for the pairs up to dkp / 2. A pair is one
/// 32-bit word of a key's column, so this is a transpose of words: 16 keys × 16 pairs at a time
/// in registers (a copy word by word took a third of the whole pass, gathers a quarter), the
/// edges word by word.
inline void pack_key_pairs_amx(const Eigen::bfloat16* k, Index k_stride, Index dk, Index nk,
                               Index nkp, Index dkp, std::uint16_t* kp) {
    auto* words = reinterpret_cast<std::uint32_t*>(kp);
    const Index full = dk / 2, rows = dkp / 2;
    Index p0 = 0;
    for (; p0 + 16 <= full; p0 += 16) {
        Index j = 0;
        for (; j + 16 <= nk; j += 16) {
            __m512i r[16];
            for (int l = 0; l < 16; ++l)
                r[l] = _mm512_loadu_si512(k + (j + l) * k_stride + 2 * p0);
            transpose_16x16_words(r);
            for (int i = 0; i < 16; ++i)
                _mm512_storeu_si512(words + key_pair_word(p0 + i, j, rows), r[i]);
        }
        for (; j < nk; ++j)
            for (Index p = p0; p < p0 + 16; ++p)
                std::memcpy(words + key_pair_word(p, j, rows), k + j * k_stride + 2 * p,
                            sizeof(std::uint32_t));
    }
    for (Index p = p0; p < rows; ++p)
        for (Index j = 0; j < nk; ++j) {
            const Eigen::bfloat16* col = k + j * k_stride;
            const std::uint32_t lo = 2 * p < dk ? bf16_bits(col[2 * p]) : 0u;
            const std::uint32_t hi = 2 * p + 1 < dk ? bf16_bits(col[2 * p + 1]) : 0u;
            words[key_pair_word(p, j, rows)] = lo | (hi << 16);
        }
    for (Index j = nk; j < nkp; ++j)
        for (Index p = 0; p < rows; ++p)
            words[key_pair_word(p, j, rows)] = 0u;
}

/// s (nqp × nkp, row-major, ld lds) ← Qᵀ·K from qt (nqp × dkp) and the key pairs kp
/// (pack_key_pairs_amx); nqp, nkp and dkp multiples of 32. Keys outer: a step's four key tiles
/// (2 KiB per 32 of d_k) serve every query tile. Needs an amx_tile_scope.
inline void scores_amx(const std::uint16_t* qt, Index nqp, Index dkp, const std::uint16_t* kp,
                       Index nkp, float* s, Index lds) {
    const Index qt_stride = dkp * 2, s_stride = lds * 4, rows = dkp / 2;
    for (Index j0 = 0; j0 < nkp; j0 += 32)
        for (Index c0 = 0; c0 < nqp; c0 += 32) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (Index d = 0; d < dkp; d += 32) {
                const std::uint16_t* a = qt + c0 * dkp + d;
                const std::uint16_t* b0 = kp + key_pair_word(d / 2, j0, rows) * 2;
                const std::uint16_t* b1 = kp + key_pair_word(d / 2, j0 + 16, rows) * 2;
                _tile_loadd(4, a, qt_stride);
                _tile_loadd(5, a + 16 * dkp, qt_stride);
                _tile_loadd(6, b0, 64);
                _tile_loadd(7, b1, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
            float* out = s + c0 * lds + j0;
            _tile_stored(0, out, s_stride);
            _tile_stored(1, out + 16, s_stride);
            _tile_stored(2, out + 16 * lds, s_stride);
            _tile_stored(3, out + 16 * lds + 16, s_stride);
        }
}

/// scores_amx for 32 queries: where d_k fits in 64 (dkp 32 or 64), their Q tiles stay in tile
/// registers for the whole row of keys, so a step of 16 keys loads only its key tiles (measured
/// about 5 % of the whole core at L = 2048, d_k = 64: the step's stores wait on fewer loads).
inline void scores_amx_32(const std::uint16_t* qt, Index dkp, const std::uint16_t* kp, Index nkp,
                          float* s, Index lds) {
    if (dkp > 64) {
        scores_amx(qt, 32, dkp, kp, nkp, s, lds);
        return;
    }
    const Index q_stride = dkp * 2, s_stride = lds * 4, rows = dkp / 2;
    _tile_loadd(4, qt, q_stride);             // queries 0–15, d 0–31
    _tile_loadd(6, qt + 16 * dkp, q_stride);  // queries 16–31, d 0–31
    if (dkp == 64) {
        _tile_loadd(5, qt + 32, q_stride);             // queries 0–15, d 32–63
        _tile_loadd(7, qt + 16 * dkp + 32, q_stride);  // queries 16–31, d 32–63
    }
    for (Index j0 = 0; j0 < nkp; j0 += 16) {
        const std::uint16_t* b = kp + key_pair_word(0, j0, rows) * 2;
        _tile_zero(0);
        _tile_zero(1);
        _tile_loadd(2, b, 64);
        _tile_dpbf16ps(0, 4, 2);
        _tile_dpbf16ps(1, 6, 2);
        if (dkp == 64) {
            _tile_loadd(3, b + 16 * 32, 64);
            _tile_dpbf16ps(0, 5, 3);
            _tile_dpbf16ps(1, 7, 3);
        }
        _tile_stored(0, s + j0, s_stride);
        _tile_stored(1, s + 16 * lds + j0, s_stride);
    }
}

/// acc (nqp query rows × dvp value lanes, row stride ld_acc floats) += P·Vᵀ from the probability
/// rows pr (nqp × nkp bf16, row stride ldp) and the value pairs vp (nkp / 2 rows of dvp words);
/// nqp, nkp and dvp multiples of 32. Needs an amx_tile_scope.
inline void accumulate_values_amx(const std::uint16_t* pr, Index nqp, Index nkp, Index ldp,
                                  const std::uint16_t* vp, Index dvp, float* acc, Index ld_acc) {
    const Index pr_stride = ldp * 2, vp_stride = dvp * 4, acc_stride = ld_acc * 4;
    for (Index c0 = 0; c0 < nqp; c0 += 32)
        for (Index e0 = 0; e0 < dvp; e0 += 32) {
            float* out = acc + c0 * ld_acc + e0;
            _tile_loadd(0, out, acc_stride);
            _tile_loadd(1, out + 16, acc_stride);
            _tile_loadd(2, out + 16 * ld_acc, acc_stride);
            _tile_loadd(3, out + 16 * ld_acc + 16, acc_stride);
            for (Index j = 0; j < nkp; j += 32) {
                const std::uint16_t* a = pr + c0 * ldp + j;
                const std::uint16_t* b = vp + ((j / 2) * dvp + e0) * 2;
                _tile_loadd(4, a, pr_stride);
                _tile_loadd(5, a + 16 * ldp, pr_stride);
                _tile_loadd(6, b, vp_stride);
                _tile_loadd(7, b + 32, vp_stride);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
            _tile_stored(0, out, acc_stride);
            _tile_stored(1, out + 16, acc_stride);
            _tile_stored(2, out + 16 * ld_acc, acc_stride);
            _tile_stored(3, out + 16 * ld_acc + 16, acc_stride);
        }
}

/// row[0 : nk) *= scale; returns the largest of the scaled row when `want_max` (NaN when any is
/// NaN, −∞ for nk = 0; max_per_query on a row), else −∞. One pass: the row is read once.
inline float scale_row(float* row, Index nk, float scale, bool want_max) {
    const __m512 f = _mm512_set1_ps(scale);
    __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    __mmask16 nan = 0;
    Index j = 0;
    for (; j + 16 <= nk; j += 16) {
        const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(row + j), f);
        _mm512_storeu_ps(row + j, x);
        nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        mx = _mm512_max_ps(mx, x);
    }
    if (j < nk) {
        const auto m = static_cast<__mmask16>((1u << (nk - j)) - 1u);
        const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + j), f);
        _mm512_mask_storeu_ps(row + j, m, x);
        nan |= _mm512_mask_cmp_ps_mask(m, x, x, _CMP_UNORD_Q);
        mx = _mm512_mask_max_ps(mx, m, mx, x);
    }
    if (!want_max) return -std::numeric_limits<float>::infinity();
    return nan != 0 ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(mx);
}

/// The largest of row[0 : nk), NaN when any is NaN, −∞ for nk = 0 (max_per_query on a row).
inline float row_max_nan(const float* row, Index nk) {
    __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    __mmask16 nan = 0;
    Index j = 0;
    for (; j + 16 <= nk; j += 16) {
        const __m512 x = _mm512_loadu_ps(row + j);
        nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        mx = _mm512_max_ps(mx, x);
    }
    if (j < nk) {
        const auto m = static_cast<__mmask16>((1u << (nk - j)) - 1u);
        const __m512 x = _mm512_mask_loadu_ps(mx, m, row + j);
        nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        mx = _mm512_max_ps(mx, x);
    }
    return nan != 0 ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(mx);
}

/// pr[0 : nkp) ← bf16(exp(scale·row[j] − shift)) for j < nk, the difference from one fused
/// multiply-add (0 where the score is −∞ or the difference is below exp_flush_below; NaN stays
/// NaN), 0 beyond nk; returns the fp32 sum of the unrounded exponentials
/// (exp_pack_probability_pairs along a query's row, which takes scaled scores: scale 1).
inline float exp_row_amx(const float* row, Index nk, Index nkp, float scale, float shift,
                         std::uint16_t* pr) {
    const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    const __m512 flush = _mm512_set1_ps(exp_flush_below<float>());
    const __m512 sh = _mm512_set1_ps(shift), f = _mm512_set1_ps(scale);
    auto probabilities = [&](Index j) {
        const Index left = std::min<Index>(16, std::max<Index>(0, nk - j));
        const auto valid = static_cast<__mmask16>((1u << left) - 1u);
        const __m512 x = _mm512_maskz_loadu_ps(valid, row + j);
        const __m512 d = _mm512_fmsub_ps(x, f, sh);
        // Ordered compares are false for NaN, so NaN differences keep their NaN.
        const __mmask16 cleared =
            static_cast<__mmask16>(~valid | _mm512_cmp_ps_mask(x, minus_inf, _CMP_EQ_OQ) |
                                   _mm512_cmp_ps_mask(d, flush, _CMP_LT_OQ));
        const __m512 e = _mm512_maskz_mov_ps(static_cast<__mmask16>(~cleared), exp_nonpositive(d));
        const __m256bh b = _mm512_cvtneps_pbh(e);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + j),
                            reinterpret_cast<const __m256i&>(b));
        return e;
    };
    // Two running sums (nkp is a multiple of 32): the additions of one do not wait on the other.
    __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
    for (Index j = 0; j < nkp; j += 32) {
        even = _mm512_add_ps(even, probabilities(j));
        odd = _mm512_add_ps(odd, probabilities(j + 16));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(even, odd));
}

#endif  // MHA_BF16_AMX

}  // namespace detail
}  // namespace mha
