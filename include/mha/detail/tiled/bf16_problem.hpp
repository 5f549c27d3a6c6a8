// SPDX-License-Identifier: MIT
// What every pass of the bf16 tiled attention shares (detail/tiled/forward_bf16.hpp drives them):
// the validated call and one (sequence, head) of it, one thread's buffers for each kernel, and
// the fold of a key block's softmax statistics into the running ones.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include <Eigen/Core>

#include <mha/batch.hpp>
#include <mha/core.hpp>
#include <mha/detail/aligned_vector.hpp>
#include <mha/detail/head_problem.hpp>
#include <mha/detail/mask_view.hpp>
#include <mha/detail/tiled/block_kernels_amx.hpp>
#include <mha/detail/tiled/block_kernels_bf16.hpp>
#include <mha/detail/tiled/forward.hpp>
#include <mha/detail/tiled/online_softmax.hpp>
#include <mha/mask.hpp>

namespace mha {
namespace detail {

/// A validated bf16 multi-head call (shapes as attention_problem, masks in fp32).
struct bf16_attention_problem {
    Eigen::Ref<const Eigen::Matrix<Eigen::bfloat16, Eigen::Dynamic, Eigen::Dynamic>, 0,
               Eigen::OuterStride<>>
        q, k, v;
    mutable matrix_ref<float> out;
    head_layout heads;
    const packed_batch& batch;
    const attention_mask<float>& mask;
    float scale;
    bool log_sum_exp;
    /// One entry per sequence: its keys and values are read there (a decode step's caches) and
    /// k and v are not read; null: keys and values in k and v.
    const sequence_keys_values<Eigen::bfloat16>* per_sequence = nullptr;
    /// Soft-capping, ALiBi and sinks (validated by check_score_terms); null: none.
    const attention_options* terms = nullptr;
};

/// One (sequence, head) of a bf16 call: `f` carries everything but the inputs as the fp32
/// passes read it; the bf16 inputs are q, k and v.
using bf16_head_problem = located_head_problem<float, Eigen::bfloat16>;

inline bf16_head_problem make_bf16_head_problem(const bf16_attention_problem& p, Index b, Index h,
                                                const mask_view<float>& mask, matrix<float>* lse) {
    bf16_head_problem r = locate_head_problem<float, Eigen::bfloat16>(p, b, h, mask, lse);
    set_score_terms(r.f, p.terms, h);
    return r;
}

/// One thread's buffers: the fp32 tile (scores, accumulator, bookkeeping, intervals; the
/// portable kernel's widened queries and values) and the packed bf16 operands.
struct bf16_thread_state {
    tile_scratch<float> t;
    matrix<float> kb;  // portable: dk × key_block, the block's keys widened
    aligned_vector<std::uint16_t> qp, vp, pp;  // native: the pair-interleaved Q, V and P
    aligned_vector<Eigen::bfloat16> kb16;      // native: the block's keys, contiguous
    // amx (block_kernels_amx.hpp): Qᵀ (nqp × dkp), the key pairs (dkp / 2 × nkp words), the
    // scores (32 × nkp fp32) and the probabilities (32 × nkp bf16) of 32 queries, padded to 32.
    aligned_vector<std::uint16_t> q_rows, k_pairs, p_rows;
    aligned_vector<float> s_rows;
    tile_scratch_key made_for;
};

template <bf16_kernel Kernel>
void make_bf16_scratch(bf16_thread_state& s, Index dk, Index dv, const tiled_settings& cfg) {
    s.t = make_tile_scratch<float>(dk, dv, cfg);
    const Index nqp = bf16_padded(cfg.query_block);
    const Index pairs = (cfg.key_block + 1) / 2;
    // Rows: the native value tiles write whole 16-row packets.
    s.t.acc.resize(std::max<Index>(bf16_padded(dv), 1), cfg.query_block);
    if (s.t.s.rows() < nqp) s.t.s.resize(nqp, cfg.key_block);
    for (auto* v : {&s.t.block_max, &s.t.shift, &s.t.block_sum})
        if (v->size() < nqp) v->resize(nqp);
    for (auto* v : {&s.t.key_from, &s.t.key_to})
        if (static_cast<Index>(v->size()) < nqp) v->resize(static_cast<std::size_t>(nqp));
    if constexpr (uses_dot_pairs(Kernel)) {
        s.qp.assign(static_cast<std::size_t>((dk + 1) / 2 * nqp * 2), 0);
        s.vp.assign(static_cast<std::size_t>(pairs * bf16_padded(dv) * 2), 0);
        s.pp.assign(static_cast<std::size_t>(pairs * nqp * 2), 0);
        s.kb16.assign(static_cast<std::size_t>(std::max<Index>(dk, 1) * cfg.key_block),
                      Eigen::bfloat16(0.0f));
        if constexpr (Kernel == bf16_kernel::amx) {
            // Tiles of 16 queries × 16 value lanes read and write whole rows and columns of the
            // accumulator, which is padded to 32 both ways.
            const Index nq32 = amx_padded(cfg.query_block), nk32 = amx_padded(cfg.key_block);
            const Index dk32 = amx_padded(dk), dv32 = amx_padded(dv);
            s.t.acc.resize(dv32, nq32);
            s.vp.assign(
                static_cast<std::size_t>(std::max(pairs * bf16_padded(dv), nk32 / 2 * dv32) * 2),
                0);
            s.q_rows.assign(static_cast<std::size_t>(nq32 * dk32), 0);
            s.k_pairs.assign(static_cast<std::size_t>(dk32 / 2 * nk32 * 2), 0);
            s.p_rows.assign(static_cast<std::size_t>(32 * nk32), 0);
            s.s_rows.assign(static_cast<std::size_t>(32 * nk32), 0.0f);
        }
    } else {
        s.kb.resize(std::max<Index>(dk, 1), cfg.key_block);
    }
}

/// Folds a key block's softmax statistics of queries [c0, c1) into the running ones: the new max
/// (t.block_max), the block's sum of exponentials (t.block_sum); the accumulator is rescaled
/// where the max moved, cleared where the query had no allowed key before.
inline void fold_block_statistics(tile_scratch<float>& t, Index c0, Index c1) {
    const float minus_inf = -std::numeric_limits<float>::infinity();
    for (Index c = c0; c < c1; ++c) {
        const float m_old = t.m(c);
        const float m_new = t.block_max(c);
        if (m_new == minus_inf) continue;
        if (m_old == minus_inf) {
            t.acc.col(c).setZero();
            t.l(c) = t.block_sum(c);
        } else if (m_new != m_old) {
            const float alpha = exp_or_zero(m_old - m_new);
            t.acc.col(c) *= alpha;
            t.l(c) = alpha * t.l(c) + t.block_sum(c);
        } else {
            t.l(c) += t.block_sum(c);
        }
        t.m(c) = m_new;
    }
}

}  // namespace detail
}  // namespace mha
