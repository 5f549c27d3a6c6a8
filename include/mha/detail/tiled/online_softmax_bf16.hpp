// SPDX-License-Identifier: MIT
// The online softmax of one task of the bf16 tiled kernel (the loop: detail/tiled/forward_bf16.hpp;
// its fp32 twin: detail/tiled/online_softmax.hpp): the queries packed for the kernel's score
// tiles, the masked fp32 scores of a key block, the pass over key blocks with fp32 statistics and
// P rounded to bf16 for P·V, and the final division with the repair of non-finite columns.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include <Eigen/Core>

#include <mha/core.hpp>
#include <mha/detail/bf16_conversions.hpp>
#include <mha/detail/head_problem.hpp>
#include <mha/detail/score_terms.hpp>
#include <mha/detail/tiled/bf16_problem.hpp>
#include <mha/detail/tiled/block_kernels.hpp>
#include <mha/detail/tiled/block_kernels_bf16.hpp>
#include <mha/detail/tiled/block_softmax.hpp>
#include <mha/detail/tiled/few_query_scores.hpp>
#include <mha/detail/tiled/online_softmax.hpp>
#include <mha/detail/tiled/plan_bf16.hpp>
#include <mha/detail/tiled/probabilities_bf16.hpp>
#include <mha/detail/tiled/tile_scratch.hpp>
#include <mha/normalization.hpp>

namespace mha {
namespace detail {

/// Query padding of a kernel's score tile.
template <bf16_kernel Kernel>
constexpr Index bf16_padded_queries(Index nq) {
    if constexpr (uses_dot_pairs(Kernel))
        return bf16_padded(nq);
    else
        return padded_queries<float>(nq);
}

/// The leading dimension of Sᵀ (s.t.s) and of the portable kernel's fp32 qt for a block of nqp
/// padded queries: the float core's (score_stride) for the portable kernel, whose tiles and
/// passes are the float core's; nqp for the vdpbf16ps kernels, which read Sᵀ with their own
/// packing (the padding is unmeasured there: no CPU here has AVX512-BF16).
template <bf16_kernel Kernel>
constexpr Index bf16_score_stride(Index nqp) {
    if constexpr (uses_dot_pairs(Kernel))
        return nqp;
    else
        return score_stride<float>(nqp);
}

/// The scaled, masked fp32 scores of queries [i0, i0+nq) against keys [j0, j0+nk) into s.t.s
/// (ld bf16_score_stride), with the score terms, as masked_scores does for fp32. Returns true when
/// it also wrote each query's max into mx (native kernel, blocks left as computed).
template <bf16_kernel Kernel>
bool masked_scores_bf16(const bf16_head_problem& p, [[maybe_unused]] const bf16_packed_head& packed,
                        Index i0, Index nq, Index nqp, const key_block& block,
                        const interval_summary& iv, bf16_thread_state& s,
                        [[maybe_unused]] float* mx) {
    const auto [j0, nk, interior, ranges] = block;
    tile_scratch<float>& t = s.t;
    float* st = t.s.data();
    const Index lds = bf16_score_stride<Kernel>(nqp);
    const Eigen::bfloat16* k = p.k + j0 * p.f.k_stride;
    const auto& mask = *p.f.mask;
    const bool terms = modifies_scores(p.f, no_score_modifier{});
    const bool as_computed = interior && !terms && !mask.has_elementwise();
    if constexpr (uses_dot_pairs(Kernel)) {
#if defined(MHA_BF16_NATIVE)
        // The block's keys copied contiguous (64 KB for 512 keys of d_k = 64): a score tile then
        // reads its 6 keys from adjacent cache lines instead of 6 columns a QKV row apart, which
        // the hardware prefetcher did not keep up with (profiled: the tile's first products
        // waited on K; about 2.5× the time of the P·V tiles of the same size).
        // With the head's keys packed once per call, the block is a slice of them.
        const Index dk = p.f.dk;
        const Eigen::bfloat16* kc = packed.k != nullptr ? packed.k + j0 * dk : s.kb16.data();
        if (packed.k == nullptr)
            for (Index j = 0; j < nk; ++j)
                std::copy_n(k + j * p.f.k_stride, dk, s.kb16.data() + j * dk);
        // A boundary block whose mask is intervals alone is masked in the tiles' registers,
        // which then take its max as for an interior block: no pass of −∞ stores, no max pass.
        const bool in_tiles = !interior && !terms && !mask.has_elementwise();
        const block_key_limits limits =
            in_tiles ? limits_in(t, nq, nqp, j0, nk) : block_key_limits{};
        transposed_scores_bf16(s.qp.data(), nqp, dk, kc, dk, nk, p.f.scale, st, lds, ranges,
                               as_computed || in_tiles ? mx : nullptr, limits);
        // The tiles' max skips NaN scores, which still reach the output through their own exp.
        // A max of −∞ (every score of the query NaN or −∞, or no key of it in the block) would
        // read as "no key yet": those blocks take the NaN-propagating pass instead, a boundary
        // block after masking by selection (its tiles skipped rows outside `ranges`).
        if (as_computed || in_tiles) {
            if (std::none_of(mx, mx + nq,
                             [](float m) { return m == -std::numeric_limits<float>::infinity(); }))
                return true;
            if (as_computed) return false;
        }
#endif
    } else if (reads_queries_in_place<float>(nq)) {
        // A decode step's few queries (widened d-contiguous into t.qt by pack_queries_bf16) read
        // the block's keys in place, widened in registers: one pass over a bf16 cache, not a
        // widening pass and a product pass over twice the bytes.
        few_query_scores(t.qt.data(), p.f.dk, nq, p.f.dk, p.f.scale, k, p.f.k_stride, nk, st, lds);
    } else {
        widen_columns(k, p.f.k_stride, p.f.dk, nk, s.kb.data(), s.kb.rows());
        // The fp32 tiles compute the unscaled products of exact bf16 values (the queries were
        // widened unscaled); the scale then multiplies each score once, as the native kernel.
        transposed_scores(t.qt.data(), lds, nqp, p.f.dk, s.kb.data(), s.kb.rows(), nk, st, lds,
                          ranges);
        const auto [lo, hi] = ranges.of(0, nqp, nk);
        for (Index r = lo; r < hi; ++r)
            for (Index c = 0; c < nqp; ++c)
                st[r * lds + c] *= p.f.scale;
    }
    // Before the mask, which then replaces excluded entries whatever the terms made of them.
    if (terms)
        for (Index r = 0; r < nk; ++r)
            modify_key_column(p.f, no_score_modifier{}, st + r * lds, i0, nq, j0 + r);
    if (as_computed) return false;
    mask_by_selection(mask, st, lds, i0, nq, j0, nk, iv, interior, t);
    return false;
}

/// Queries [i0, i0+nq) as Kernel's score tiles read them: pair-interleaved (vdpbf16ps), d_k
/// contiguous in fp32 for a decode step's few queries, else transposed in fp32 with ld `lds`.
/// Unscaled and exact: the scale multiplies the fp32 scores.
template <bf16_kernel Kernel>
void pack_queries_bf16(const bf16_head_problem& p, Index i0, Index nq, Index nqp, Index lds,
                       bf16_thread_state& s) {
    const Eigen::bfloat16* q = p.q + i0 * p.f.q_stride;
    if constexpr (uses_dot_pairs(Kernel)) {
        pack_query_pairs(q, p.f.q_stride, p.f.dk, nq, nqp, s.qp.data());
    } else if (reads_queries_in_place<float>(nq)) {
        // t.qt's storage holds these d_k × nq, as few_query_scores reads them.
        widen_columns(q, p.f.q_stride, p.f.dk, nq, s.t.qt.data(), p.f.dk);
    } else {
        // qt(c, d) = Q(d, c), zero padding queries.
        float* qt = s.t.qt.data();
        for (Index d = 0; d < p.f.dk; ++d) {
            for (Index c = 0; c < nq; ++c)
                qt[d * lds + c] = bf16_to_float(q[c * p.f.q_stride + d]);
            std::fill(qt + d * lds + nq, qt + d * lds + nqp, 0.0f);
        }
    }
}

/// acc += V·P over the key block, P being the block's probabilities in s.t.s (ld `lds`) rounded
/// to bf16, or already rounded and pair-interleaved in s.pp when `packed_p`.
template <bf16_kernel Kernel>
void accumulate_block_values_bf16(const bf16_head_problem& p,
                                  [[maybe_unused]] const bf16_packed_head& packed, Index nq,
                                  Index nqp, Index lds, const key_block& block,
                                  [[maybe_unused]] bool packed_p, bf16_thread_state& s) {
    tile_scratch<float>& t = s.t;
    const Index dv = p.f.dv, j0 = block.j0, nk = block.nk;
    float* st = t.s.data();
    const Eigen::bfloat16* v = p.v + j0 * p.f.v_stride;
    if constexpr (uses_dot_pairs(Kernel)) {
#if defined(MHA_BF16_NATIVE)
        const Index dvp = bf16_padded(dv);
        // The packed pairs serve a block that starts on a pair and ends on one (or at the last
        // key, whose partner is the packing's 0): else a pair would join a key of the block with
        // one outside, P = 0 for it, and a non-finite value there would turn 0·V into NaN.
        const bool slice = packed.v != nullptr && j0 % 2 == 0 && (nk % 2 == 0 || j0 + nk == p.f.lk);
        const std::uint16_t* vb = slice ? packed.v + (j0 / 2) * dvp * 2 : s.vp.data();
        if (!slice) pack_value_pairs(v, p.f.v_stride, dv, nk, dvp, s.vp.data());
        if (!packed_p) pack_probability_pairs(st, lds, nqp, nk, s.pp.data());
        accumulate_values_bf16(vb, dvp, nk, s.pp.data(), nqp, nq, t.acc.data(), t.acc.rows(),
                               block.ranges);
#endif
    } else {
        // Padding queries too (their probabilities are finite and no output reads them): whole
        // packets. The rows past nqp (score_stride's padding) hold nothing.
        for (Index r = 0; r < nk; ++r)
            round_to_bf16_in_place(st + r * lds, nqp);
        if (nq <= block_kernel_traits<float>::value_queries) {
            // One value tile reads V once: in place, widened in registers.
            accumulate_values(v, p.f.v_stride, dv, nk, st, lds, nq, t.acc.data(), t.acc.rows(),
                              block.ranges);
        } else {
            widen_columns(v, p.f.v_stride, dv, nk, t.v.data(), dv);
            accumulate_values(t.v.data(), dv, dv, nk, st, lds, nq, t.acc.data(), t.acc.rows(),
                              block.ranges);
        }
    }
}

/// The online pass of queries [i0, i0+nq) over all their allowed keys (online_pass on bf16
/// inputs): leaves the unnormalised output in s.t.acc and the running max and sum in s.t.m, l.
template <bf16_kernel Kernel>
void online_pass_bf16(const bf16_head_problem& p, const bf16_packed_head& packed, Index i0,
                      Index nq, Index k_lo, Index k_hi, const tiled_settings& cfg,
                      bf16_thread_state& s) {
    tile_scratch<float>& t = s.t;
    const float minus_inf = -std::numeric_limits<float>::infinity();
    t.acc.leftCols(nq).setZero();
    t.m.head(nq).setConstant(minus_inf);
    t.l.head(nq).setZero();
    const interval_summary iv = key_intervals(p.f, i0, nq, k_lo, k_hi, t);
    if (iv.lo >= iv.hi) return;
    const Index nqp = bf16_padded_queries<Kernel>(nq);
    const Index lds = bf16_score_stride<Kernel>(nqp);
    pack_queries_bf16<Kernel>(p, i0, nq, nqp, lds, s);
    float* st = t.s.data();
    for (Index j0 = iv.lo; j0 < iv.hi; j0 += cfg.key_block) {
        const Index nk = std::min(cfg.key_block, iv.hi - j0);
        const key_block block = key_block_at(t, iv, nq, j0, nk);
        if (!masked_scores_bf16<Kernel>(p, packed, i0, nq, nqp, block, iv, s, t.block_max.data()))
            max_per_query(st, lds, nqp, nk, t.block_max.data());
        for (Index c = 0; c < nqp; ++c) {
            // As online_pass: a query with nothing allowed yet shifts by 0.
            const float m_new = c < nq ? nan_propagating_max(t.m(c), t.block_max(c)) : 0.0f;
            t.block_max(c) = m_new;
            t.shift(c) = m_new == minus_inf ? 0.0f : m_new;
        }
        // The sums l take the fp32 probabilities; P·V takes them rounded to bf16. The native
        // kernel's exp pass writes the rounded pairs straight away (st is not needed after).
        bool packed_p = false;
#if defined(MHA_BF16_NATIVE)
        if constexpr (uses_dot_pairs(Kernel)) {
            // With the ranges: a block masked in the tiles has rows they did not write.
            exp_pack_probability_pairs(st, lds, nqp, nk, t.shift.data(), t.block_sum.data(),
                                       s.pp.data(), block.ranges);
            packed_p = true;
        }
#endif
        if (!packed_p) exp_shifted_per_query(st, lds, nqp, nk, t.shift.data(), t.block_sum.data());
        fold_block_statistics(t, 0, nq);
        accumulate_block_values_bf16<Kernel>(p, packed, nq, nqp, lds, block, packed_p, s);
    }
}

/// Recomputes output column i from its allowed keys alone, in fp32 from the bf16 inputs (see
/// "Poisoned values" in detail/tiled/forward.hpp).
inline void repair_column_bf16(const bf16_head_problem& p, Index i, float m, float inv_l) {
    Eigen::Map<vector<float>> out(p.f.out + i * p.f.out_stride, p.f.dv);
    out.setZero();
    const auto& mask = *p.f.mask;
    const auto range = mask.key_range(i);
    const Eigen::bfloat16* qi = p.q + i * p.f.q_stride;
    for (Index j = range.first; j < range.second; ++j) {
        if (mask.excludes(j, i)) continue;
        const Eigen::bfloat16* kj = p.k + j * p.f.k_stride;
        float dot = 0;
        for (Index d = 0; d < p.f.dk; ++d)
            dot += bf16_to_float(qi[d]) * bf16_to_float(kj[d]);
        float sc = modified_score(p.f, no_score_modifier{}, i, j, p.f.scale * dot);
        if (mask.has_bias()) sc += mask.bias(j, i);
        if (sc == -std::numeric_limits<float>::infinity()) continue;
        const float w = round_to_bf16(std::exp(sc - m)) * inv_l;
        const Eigen::bfloat16* vj = p.v + j * p.f.v_stride;
        for (Index e = 0; e < p.f.dv; ++e)
            out(e) += w * bf16_to_float(vj[e]);
    }
}

/// out = acc / l for queries [i0, i0+nq), 0 for a query with no allowed key, non-finite columns
/// repaired, log-sum-exp written when asked, the sink folded in (finalize_block on bf16 inputs).
inline void finalize_block_bf16(const bf16_head_problem& p, Index i0, Index nq,
                                tile_scratch<float>& t) {
    const float minus_inf = -std::numeric_limits<float>::infinity();
    for (Index c = 0; c < nq; ++c) {
        Eigen::Map<vector<float>> out(p.f.out + (i0 + c) * p.f.out_stride, p.f.dv);
        const bool no_key = t.m(c) == minus_inf;
        const float alpha = fold_sink(p.f, t.m(c), t.l(c));
        if (p.f.lse != nullptr)
            p.f.lse[(i0 + c) * p.f.lse_stride] =
                t.m(c) == minus_inf ? minus_inf : t.m(c) + std::log(t.l(c));
        if (no_key) {  // exactly 0, with or without a sink
            out.setZero();
            continue;
        }
        const float inv_l = 1.0f / t.l(c);
        out = t.acc.col(c).head(p.f.dv) * (alpha * inv_l);
        if (!all_finite(out)) repair_column_bf16(p, i0 + c, t.m(c), inv_l);
    }
}

}  // namespace detail
}  // namespace mha
