// SPDX-License-Identifier: MIT
// The materialised attention kernel: each (sequence, head) computes its Lk × Lq scores in full,
// masks them, normalises each column, then multiplies by V. The simple reference path against
// which the tiled kernel is tested, and the path of the normalisations without an online form
// (relu, sigmoid). Memory: one head's Lk × Lq scores at a time.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <mha/core.hpp>
#include <mha/detail/gemm.hpp>
#include <mha/detail/head_problem.hpp>
#include <mha/detail/mask_view.hpp>
#include <mha/detail/score_terms.hpp>
#include <mha/normalization.hpp>
#include <mha/options.hpp>

namespace mha {
namespace detail {

/// Masks the scores s (Lk × Lq) of one (sequence, head) in place (see mask_view::apply).
template <class Scalar, class DS>
void apply_mask(const mask_view<Scalar>& mask, Eigen::MatrixBase<DS>& s) {
    const Index lk = s.rows();
    for (Index i = 0; i < s.cols(); ++i) {
        const auto range = mask.key_range(i);
        mask.apply(&s.derived().coeffRef(0, i), 1, i, 0, lk, range.first, range.second);
    }
}

/// P·V by GEMM lets 0·NaN from an excluded value column into a query's output. Such outputs are
/// the only non-finite ones that can be wrong; recompute them from the allowed keys alone.
/// With `skip_zero_weights` (a score modifier, which may exclude keys by −∞ as a mask does), keys
/// of weight exactly 0 are skipped too.
template <class Scalar, class DV, class DW, class DO>
void repair_excluded_values(const mask_view<Scalar>& mask, const Eigen::MatrixBase<DV>& v,
                            const Eigen::MatrixBase<DW>& weights, Eigen::MatrixBase<DO>& out,
                            bool skip_zero_weights = false) {
    for (Index i = 0; i < out.cols(); ++i) {
        if (out.col(i).allFinite()) continue;
        out.col(i).setZero();
        const auto range = mask.key_range(i);
        for (Index j = range.first; j < range.second; ++j) {
            if (mask.excludes(j, i)) continue;
            if (skip_zero_weights && weights(j, i) == Scalar(0)) continue;
            out.col(i) += weights(j, i) * v.col(j);
        }
    }
}

/// Softmax of each column of the masked scores s (Lk × Lq) with a sink logit in every
/// normaliser: w_j = exp(s_j − m) / (Σ exp(s_k − m) + exp(sink − m)), m = max(max s, sink). A
/// column with no allowed key gets weights exactly 0.
template <class Scalar, class DS>
void softmax_columns_with_sink(Eigen::MatrixBase<DS>& s, Scalar sink) {
    const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
    for (Index i = 0; i < s.cols(); ++i) {
        auto column = s.col(i);
        Scalar m = sink;
        for (Index j = 0; j < column.size(); ++j)
            m = nan_propagating_max(m, column(j));
        column =
            (column.array() == minus_inf).select(Scalar(0), (column.array() - m).exp()).matrix();
        const Scalar sum = column.sum() + std::exp(sink - m);
        column *= Scalar(1) / sum;
    }
}

/// lse[i·stride] = log Σ_j exp(s(j, i)) of each column of the masked scores (−∞ for a column
/// with no allowed key; NaN when a NaN score takes part); with a sink (`sink` not −∞), the sum
/// also holds exp(sink).
template <class Scalar, class DS>
void log_sum_exp_columns(const Eigen::MatrixBase<DS>& s, Scalar* lse, Index stride,
                         Scalar sink = -std::numeric_limits<Scalar>::infinity()) {
    const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
    for (Index i = 0; i < s.cols(); ++i) {
        Scalar m = sink;
        for (Index j = 0; j < s.rows(); ++j)
            m = nan_propagating_max(m, s(j, i));
        if (m == minus_inf) {
            lse[i * stride] = minus_inf;
            continue;
        }
        Scalar sum = sink == minus_inf ? Scalar(0) : std::exp(sink - m);
        for (Index j = 0; j < s.rows(); ++j)
            if (s(j, i) != minus_inf) sum += std::exp(s(j, i) - m);
        lse[i * stride] = m + std::log(sum);
    }
}

/// The materialised attention of one (sequence, head) with at least one query and one key;
/// `scores` (Lk × Lq) is scratch and ends holding the weights. The two products pack into `gemm`
/// when given (see product_into). `hp` gives the mask, scale, score terms and log-sum-exp of
/// the head; `mod` is the caller's score modifier.
template <class Scalar, class DQ, class DK, class DV, class DO, class DS, class Mod>
void attend_one_head(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                     const Eigen::MatrixBase<DV>& v, const head_problem<Scalar>& hp,
                     normalization normalize, Eigen::MatrixBase<DO>& out,
                     Eigen::MatrixBase<DS>& scores, std::vector<gemm_buffers<Scalar>>* gemm,
                     const Mod& mod) {
    const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
    const mask_view<Scalar>& mask = *hp.mask;
    product_into(scores.derived(), k.derived().transpose(), q.derived(), hp.scale, gemm);
    const bool modified = modifies_scores(hp, mod);
    if (modified)
        for (Index i = 0; i < scores.cols(); ++i)
            modify_query_column(hp, mod, &scores.derived().coeffRef(0, i), i, 0, scores.rows());
    const bool masked = !mask.is_unmasked();
    if (masked) apply_mask<Scalar>(mask, scores);
    if (hp.lse != nullptr)
        log_sum_exp_columns(scores, hp.lse, hp.lse_stride, hp.has_sink ? hp.sink : minus_inf);
    if (hp.has_sink)
        softmax_columns_with_sink(scores, hp.sink);
    else
        normalize_columns(scores, normalize);
    product_into(out.derived(), v.derived(), scores.derived(), Scalar(1), gemm);
    if (masked || is_active_modifier_v<Mod>)
        repair_excluded_values<Scalar>(mask, v, scores, out, is_active_modifier_v<Mod>);
}

/// The buffers of materialized_attention, kept between calls (see attention_workspace).
template <class Scalar>
struct materialized_workspace {
    vector<Scalar> scores;  // one head's Lk × Lq, grown to the largest
    mask_views<Scalar> masks;
};

/// The multi-head materialised attention over a packed batch. `outputs` holds what the request
/// asks for, sized and zeroed (see size_outputs). `gemm`: packing buffers for the products, one
/// per thread; null: Eigen's own products, whose bits may depend on the thread count (Eigen's
/// OpenMP product chooses its blocking by it).
/// `mod`: the caller's score modifier (its block predicate is not needed here).
template <class Scalar, class Mod = no_score_modifier>
void materialized_attention(const attention_problem<Scalar>& p, attention_outputs<Scalar>& outputs,
                            materialized_workspace<Scalar>& ws,
                            std::vector<gemm_buffers<Scalar>>* gemm, const Mod& mod = Mod{}) {
    const packed_batch& batch = p.batch;
    const head_layout& heads = p.heads;
    const Index num_heads = heads.num_heads;
    const weights_mode mode = p.request.weights;
    ws.masks.build(p.mask, num_heads, batch);
    // One head's scores at a time, in a buffer sized once for the largest sequence.
    Index largest = 0;
    for (Index b = 0; b < batch.size(); ++b)
        largest = std::max(largest, batch.key_length(b) * batch.query_length(b));
    if (ws.scores.size() < largest) ws.scores.resize(largest);
    matrix<Scalar>* lse = p.request.log_sum_exp ? &outputs.log_sum_exp : nullptr;
    using const_view = Eigen::Map<const matrix<Scalar>, 0, Eigen::OuterStride<>>;
    for (Index b = 0; b < batch.size(); ++b) {
        const Index lq = batch.query_length(b);
        const Index lk = batch.key_length(b);
        // Empty sequences create no blocks: a block of an empty matrix offsets a null pointer.
        if (lq == 0) continue;
        Eigen::Map<matrix<Scalar>> scores(ws.scores.data(), lk, lq);
        for (Index h = 0; h < num_heads; ++h) {
            const head_problem<Scalar> hp = make_head_problem(p, b, h, ws.masks(b, h), lse);
            Eigen::Map<matrix<Scalar>, 0, Eigen::OuterStride<>> out_bh(
                hp.out, heads.dv, lq, Eigen::OuterStride<>(hp.out_stride));
            if (lk == 0) {  // no key: output 0, log-sum-exp −∞ (the sink's logit with one), the
                            // weights (0 × Lq) are set
                out_bh.setZero();
                if (hp.lse != nullptr)
                    for (Index i = 0; i < lq; ++i)
                        hp.lse[i * hp.lse_stride] =
                            hp.has_sink ? hp.sink : -std::numeric_limits<Scalar>::infinity();
                continue;
            }
            attend_one_head<Scalar>(
                const_view(hp.q, heads.dk, lq, Eigen::OuterStride<>(hp.q_stride)),
                const_view(hp.k, heads.dk, lk, Eigen::OuterStride<>(hp.k_stride)),
                const_view(hp.v, heads.dv, lk, Eigen::OuterStride<>(hp.v_stride)), hp, p.normalize,
                out_bh, scores, gemm, mod);
            if (mode == weights_mode::per_head)
                outputs.weights[static_cast<std::size_t>(b * num_heads + h)] = scores;
            else if (mode == weights_mode::averaged)
                outputs.weights[static_cast<std::size_t>(b)] += scores / Scalar(num_heads);
        }
    }
}

}  // namespace detail
}  // namespace mha
