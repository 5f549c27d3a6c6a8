// SPDX-License-Identifier: MIT
// The online pass of the bf16 tiled attention on AMX tiles (bf16_kernel::amx where
// detail/amx.hpp allows it; detail/tiled/forward_bf16.hpp chooses it per call): the key blocks,
// masks, running max and sum and the rescaling of the vdpbf16ps pass, with the scores and P·V as
// tile products and the softmax along each query's row (the kernels and their layouts:
// detail/tiled/block_kernels_amx.hpp).
#pragma once

#include <algorithm>
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
/// online_pass_bf16 on AMX tiles (block_kernels_amx.hpp): the same key blocks, masks, running
/// max and sum, and the same rescaling of the accumulator; the scores and P·V as tile products,
/// the softmax along each query's row of scores.
inline void online_pass_bf16_amx(const bf16_head_problem& p, Index i0, Index nq,
                                 const tiled_settings& cfg, bf16_thread_state& s) {
    tile_scratch<float>& t = s.t;
    const float minus_inf = -std::numeric_limits<float>::infinity();
    const Index dv = p.f.dv;
    const Index nqp = amx_padded(nq), dkp = amx_padded(p.f.dk), dvp = amx_padded(dv);
    t.acc.leftCols(nqp).setZero();  // the padding queries' columns too: tiles read them
    t.m.head(nq).setConstant(minus_inf);
    t.l.head(nq).setZero();
    const interval_summary iv = key_intervals(p.f, i0, nq, 0, p.f.lk, t);
    if (iv.lo >= iv.hi) return;
    stage_queries_amx(p.q + i0 * p.f.q_stride, p.f.q_stride, p.f.dk, nq, nqp, dkp, s.q_rows.data());
    const auto& mask = *p.f.mask;
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
        const bool interior = iv.max_first <= j0 && j0 + nk <= iv.min_last;
        const bool masked = !interior || mask.has_elementwise();
        // 32 queries at a time through scores, softmax and P·V: their scores (32 × nkp fp32,
        // 64 KiB for 512 keys) and probabilities stay in L1/L2 between the three passes.
        for (Index c0 = 0; c0 < nqp; c0 += 32) {
            float* sr = s.s_rows.data();          // 32 × nkp
            std::uint16_t* pr = s.p_rows.data();  // 32 × nkp
            scores_amx(s.q_rows.data() + c0 * dkp, 32, dkp, s.k_pairs.data(), nkp, sr, nkp);
            const Index c1 = std::min(nq, c0 + 32);
            for (Index c = c0; c < c1; ++c) {
                float* row = sr + (c - c0) * nkp;
                // Unmasked blocks take the max in the scaling pass; masked ones after the mask.
                float block_max = scale_row(row, nk, p.f.scale, !masked);
                if (masked) {
                    const Index f =
                        std::clamp(t.first[static_cast<std::size_t>(c)] - j0, Index(0), nk);
                    const Index e = std::clamp(t.last[static_cast<std::size_t>(c)] - j0, f, nk);
                    mask.apply(row, 1, i0 + c, j0, nk, f, e);
                    block_max = row_max_nan(row, nk);
                }
                // As online_pass: a query with nothing allowed yet shifts by 0.
                const float m_new = nan_propagating_max(t.m(c), block_max);
                t.block_max(c) = m_new;
                t.block_sum(c) = exp_row_amx(row, nk, nkp, m_new == minus_inf ? 0.0f : m_new,
                                             pr + (c - c0) * nkp);
            }
            std::fill(pr + std::max<Index>(c1 - c0, 0) * nkp, pr + 32 * nkp, std::uint16_t(0));
            fold_block_statistics(t, c0, c1);
            accumulate_values_amx(pr, 32, nkp, s.vp.data(), dvp, t.acc.data() + c0 * t.acc.rows(),
                                  t.acc.rows());
        }
    }
}
#endif  // MHA_BF16_AMX

}  // namespace detail
}  // namespace mha
