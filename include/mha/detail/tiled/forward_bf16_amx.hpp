// SPDX-License-Identifier: MIT
// The online pass of the bf16 tiled attention on AMX tiles (bf16_kernel::amx where
// detail/amx.hpp allows it; detail/tiled/forward_bf16.hpp chooses it per call): the key blocks,
// masks, running max and sum and the rescaling of the vdpbf16ps pass, with the scores and P·V as
// tile products and the softmax along each query's row (the kernels and their layouts:
// detail/tiled/block_kernels_amx.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include <mha/core.hpp>
#include <mha/detail/tiled/bf16_problem.hpp>
#include <mha/detail/tiled/block_kernels_amx.hpp>
#include <mha/detail/tiled/block_kernels_bf16.hpp>
#include <mha/detail/tiled/online_softmax.hpp>
#include <mha/normalization.hpp>

namespace mha {
namespace detail {

#if defined(MHA_BF16_AMX)
/// The keys [lo, hi) of a key block (block-relative, nk keys) that queries [c0, c1) of the task
/// may see (their intervals from key_intervals), and whether any of them sees less than the
/// whole block; lo >= hi when none sees any.
struct chunk_keys {
    Index lo, hi;
    bool partial;
};

inline chunk_keys keys_of_chunk(const tile_scratch<float>& t, Index c0, Index c1, Index j0,
                                Index nk) {
    chunk_keys r{nk, 0, false};
    for (Index c = c0; c < c1; ++c) {
        const Index f = std::clamp(t.first[static_cast<std::size_t>(c)] - j0, Index(0), nk);
        const Index e = std::clamp(t.last[static_cast<std::size_t>(c)] - j0, f, nk);
        r.partial = r.partial || f > 0 || e < nk;
        if (f < e) {
            r.lo = std::min(r.lo, f);
            r.hi = std::max(r.hi, e);
        }
    }
    return r;
}

/// The softmax of a chunk's rows of scores against keys [a, b) of the block (b − a a multiple of
/// 32, keys from na on padding): scale, mask, the block max folded with the running one, and
/// the probabilities rounded to bf16 into pr, their fp32 sums into t.block_sum.
inline void softmax_chunk_amx(const bf16_head_problem& p, Index i0, Index j0, Index c0, Index c1,
                              Index a, Index b, Index na, bool masked, float* sr, std::uint16_t* pr,
                              Index ld, tile_scratch<float>& t) {
    const float minus_inf = -std::numeric_limits<float>::infinity();
    const auto& mask = *p.f.mask;
    // The scale goes into the exp pass's subtraction (one pass over the row fewer) where that
    // gives the same max: a positive finite scale keeps the order of the scores (rounding is
    // monotonic, so max(fl(s·x)) = fl(s·max x)) and keeps −∞; an elementwise mask's bias adds
    // to the scaled score, so it takes the scaling pass.
    const bool scale_in_exp = p.f.scale > 0 && std::isfinite(p.f.scale) && !mask.has_elementwise();
    const Index n = na - a;
    for (Index c = c0; c < c1; ++c) {
        float* row = sr + (c - c0) * ld + a;
        float block_max = minus_inf;
        if (!scale_in_exp) block_max = scale_row(row, n, p.f.scale, !masked);
        if (masked) {
            const Index f = std::clamp(t.first[static_cast<std::size_t>(c)] - j0, a, na);
            const Index e = std::clamp(t.last[static_cast<std::size_t>(c)] - j0, f, na);
            mask.apply(row, 1, i0 + c, j0 + a, n, f - a, e - a);
        }
        if (scale_in_exp)
            block_max = row_max_nan(row, n) * p.f.scale;
        else if (masked)
            block_max = row_max_nan(row, n);
        // As online_pass: a query with nothing allowed yet shifts by 0.
        const float m_new = nan_propagating_max(t.m(c), block_max);
        t.block_max(c) = m_new;
        t.block_sum(c) = exp_row_amx(row, n, b - a, scale_in_exp ? p.f.scale : 1.0f,
                                     m_new == minus_inf ? 0.0f : m_new, pr + (c - c0) * ld + a);
    }
    for (Index c = c1 - c0; c < 32; ++c)  // padding queries
        std::fill(pr + c * ld + a, pr + c * ld + b, std::uint16_t(0));
}

/// online_pass_bf16 on AMX tiles (block_kernels_amx.hpp): the same key blocks, masks, running
/// max and sum, and the same rescaling of the accumulator; the scores and P·V as tile products,
/// the softmax along each query's row of scores.
inline void online_pass_bf16_amx(const bf16_head_problem& p, Index i0, Index nq,
                                 const tiled_settings& cfg, bf16_thread_state& s) {
    tile_scratch<float>& t = s.t;
    const Index dv = p.f.dv;
    const Index nqp = amx_padded(nq), dkp = amx_padded(p.f.dk), dvp = amx_padded(dv);
    t.acc.leftCols(nqp).setZero();  // the padding queries' columns too: tiles read them
    t.m.head(nq).setConstant(-std::numeric_limits<float>::infinity());
    t.l.head(nq).setZero();
    const interval_summary iv = key_intervals(p.f, i0, nq, 0, p.f.lk, t);
    if (iv.lo >= iv.hi) return;
    stage_queries_amx(p.q + i0 * p.f.q_stride, p.f.q_stride, p.f.dk, nq, nqp, dkp, s.q_rows.data());
    const amx_tile_scope tiles;
    for (Index j0 = iv.lo; j0 < iv.hi; j0 += cfg.key_block) {
        const Index nk = std::min(cfg.key_block, iv.hi - j0), nkp = amx_padded(nk);
        pack_key_pairs_amx(p.k + j0 * p.f.k_stride, p.f.k_stride, p.f.dk, nk, nkp, dkp,
                           s.k_pairs.data());
        pack_value_pairs(p.v + j0 * p.f.v_stride, p.f.v_stride, dv, nk, dvp, s.vp.data());
        // Pairs beyond the block's keys: zero (P is zero there too, but a stale value could be
        // infinite, and 0·∞ is NaN).
        std::fill(s.vp.data() + (nk + 1) / 2 * dvp * 2, s.vp.data() + nkp / 2 * dvp * 2,
                  std::uint16_t(0));
        // 32 queries at a time through scores, softmax and P·V: their scores (32 × nkp fp32,
        // 32 KiB for 256 keys) and probabilities stay in L1 between the three passes.
        for (Index c0 = 0; c0 < nqp; c0 += 32) {
            const Index c1 = std::min(nq, c0 + 32);
            // The tiles take only the keys [a, b) the chunk's queries may see, in steps of 32 (a
            // causal mask's diagonal block, a window's edges): the others would be masked to −∞
            // and add exact zeros. A chunk that sees none of the block skips it.
            const chunk_keys keys = keys_of_chunk(t, c0, c1, j0, nk);
            if (keys.lo >= keys.hi) continue;
            const Index a = keys.lo / 32 * 32, b = std::min(amx_padded(keys.hi), nkp);
            float* sr = s.s_rows.data();          // 32 × nkp
            std::uint16_t* pr = s.p_rows.data();  // 32 × nkp
            scores_amx_32(s.q_rows.data() + c0 * dkp, dkp,
                          s.k_pairs.data() + key_pair_word(0, a, dkp / 2) * 2, b - a, sr + a, nkp);
            softmax_chunk_amx(p, i0, j0, c0, c1, a, b, std::min(b, nk),
                              keys.partial || p.f.mask->has_elementwise(), sr, pr, nkp, t);
            fold_block_statistics(t, c0, c1);
            accumulate_values_amx(pr + a, 32, b - a, nkp, s.vp.data() + a / 2 * dvp * 2, dvp,
                                  t.acc.data() + c0 * t.acc.rows(), t.acc.rows());
        }
    }
}
#endif  // MHA_BF16_AMX

}  // namespace detail
}  // namespace mha
