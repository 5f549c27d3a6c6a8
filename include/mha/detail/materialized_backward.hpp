// SPDX-License-Identifier: MIT
// The materialised backward pass of the attention core: each (sequence, head) recomputes its
// Lk × Lq scores and weights as the forward did, then goes back through the normalisation by
// its exact derivative. Memory: one head's scores, weights and their gradients (4 · Lk × Lq) per
// thread.
//
// With W the normalised weights of masked scores S, out = V·W, and dO the output's gradient:
//   dV = dO·Wᵀ,  dW = Vᵀ·dO,  dS = J(S)ᵀ·dW per query column,  dQ = scale·K·dS,  dK = scale·Q·dSᵀ
// where J is the Jacobian of the normalisation (softmax: dS = W ∘ (dW − Σ W∘dW); ReLU: the
// quotient rule of max(s, 0) / Σ max(s, 0); sigmoid: dS = dW ∘ W ∘ (1 − W)). An excluded key's
// score is constant (−∞ by selection), so its dS is 0 by selection too: a NaN in an excluded
// value or key column never reaches a gradient, as it never reaches the output.
//
// Score terms (attention_options). With soft-capping, S = c·tanh(R/c) for the scaled product R,
// so dR = dS ∘ (1 − tanh²(R/c)); ALiBi adds a constant to S, so dS passes through unchanged; a
// sink adds exp(sink) to the softmax normaliser and no value, so dS keeps the softmax form with
// W the weights including the sink's share, and ∂loss/∂sink = −Σ_i W_sink,i · Σ_j W_ji·dW_ji
// with W_sink,i = exp(sink − lse_i), the sink's own weight in query i's normaliser. The caller's
// score modifier has no derivative here: the backward takes no modifier.
//
// Determinism: one task per (sequence, key/value head). A task owns the dK and dV columns of its
// sequence in its key/value head's rows and the dQ rows of its query heads, and sums its query
// heads in increasing order; every product inside a task runs on one thread. So the bits do not
// depend on the thread count or on which thread runs a task.
#pragma once

#include <cmath>
#include <limits>
#include <vector>

#include <mha/batch.hpp>
#include <mha/core.hpp>
#include <mha/detail/gemm.hpp>
#include <mha/detail/head_problem.hpp>
#include <mha/detail/mask_view.hpp>
#include <mha/detail/materialized.hpp>
#include <mha/detail/parallel.hpp>
#include <mha/detail/score_terms.hpp>
#include <mha/normalization.hpp>
#include <mha/options.hpp>

namespace mha {
namespace detail {

/// The scratch of one thread of the backward pass, kept for its next task.
template <class Scalar>
struct backward_thread_state {
    matrix<Scalar> scores, weights, d_weights, d_scores;  // Lk × Lq each
    matrix<Scalar> cap_slope;  // Lk × Lq with soft-capping: 1 − tanh²(R/c), else empty
    matrix<Scalar> product;    // dK or dV of one head before summing
    std::vector<gemm_buffers<Scalar>> gemm;  // one set: products stay on this thread
};

/// dS from dW (both Lk × Lq) for the masked scores S and weights W of one head, in place of dW
/// into `d_scores`. Excluded keys (S = −∞) get exactly 0.
template <class Scalar>
void normalization_backward(const matrix<Scalar>& s, const matrix<Scalar>& w,
                            const matrix<Scalar>& dw, normalization normalize, matrix<Scalar>& ds) {
    const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
    const Index lk = s.rows();
    ds.resize(lk, s.cols());
    for (Index i = 0; i < s.cols(); ++i) {
        switch (normalize) {
            case normalization::softmax: {
                // Σ_j W_j·dW_j over the keys that take part (a skipped key may hold dW = NaN).
                Scalar dot(0);
                for (Index j = 0; j < lk; ++j)
                    if (s(j, i) != minus_inf) dot += w(j, i) * dw(j, i);
                for (Index j = 0; j < lk; ++j)
                    ds(j, i) = s(j, i) == minus_inf ? Scalar(0) : w(j, i) * (dw(j, i) - dot);
                break;
            }
            case normalization::relu: {
                // w_j = r_j / Σr with r = max(s, 0): ∂w_j/∂s_l = [s_l > 0]·(δ_jl − w_j) / Σr, so
                // dS_l = (dW_l − Σ_j w_j·dW_j) / Σr. The weights are divided here, not taken from
                // `w` (which holds r·(1/Σr)): a single positive key then has w = x / x = 1
                // exactly, Σ w·dW = dW exactly, and its dS is exactly 0 however the compiler
                // contracts products into FMAs (a form with dW_l·Σr − Σ r_j·dW_j is not: an FMA
                // keeps one product unrounded and leaves the other's rounding error, / (Σr)²).
                // A key takes part in Σr when it is allowed and positive, or NaN (which must
                // reach the gradient).
                auto positive = [&](Index j) {
                    const Scalar x = s(j, i);
                    return x != minus_inf && (x > Scalar(0) || x != x);
                };
                Scalar sum(0);
                for (Index j = 0; j < lk; ++j)
                    if (positive(j)) sum += s(j, i);
                // All scores ≤ 0: the weights are the constant 0, so is the gradient. Only when
                // active does anything divide by the sum (never 0/0).
                const bool active = sum > Scalar(0) || sum != sum;
                Scalar dot(0);
                if (active)
                    for (Index j = 0; j < lk; ++j)
                        if (positive(j)) dot += s(j, i) / sum * dw(j, i);
                for (Index j = 0; j < lk; ++j)
                    ds(j, i) = active && positive(j) ? (dw(j, i) - dot) / sum : Scalar(0);
                break;
            }
            case normalization::sigmoid:
                for (Index j = 0; j < lk; ++j)
                    ds(j, i) = s(j, i) == minus_inf ? Scalar(0)
                                                    : dw(j, i) * w(j, i) * (Scalar(1) - w(j, i));
                break;
        }
    }
}

/// The gradients of one multi-head call, and whether the per-head score gradients are kept.
template <class Scalar>
struct backward_outputs {
    matrix<Scalar>& dq;                     // (H·d_k) × Nq
    matrix<Scalar>& dk;                     // (H_kv·d_k) × Nk
    matrix<Scalar>& dv;                     // (H_kv·d_v) × Nk
    std::vector<matrix<Scalar>>* d_scores;  // B·H matrices Lk × Lq, or null
    matrix<Scalar>* d_sinks = nullptr;      // H × B: each (head, sequence)'s share, or null
};

/// The score terms of head h in sequence b as the score functions of score_terms.hpp read them
/// (the head problem's views are not set: only the terms, lengths and indices are).
template <class Scalar>
head_problem<Scalar> score_terms_of(const attention_problem<Scalar>& p, Index b, Index h) {
    head_problem<Scalar> hp{};
    hp.lq = p.batch.query_length(b);
    hp.lk = p.batch.key_length(b);
    hp.sequence = b;
    hp.head = h;
    if (p.terms != nullptr) {
        const auto hi = static_cast<std::size_t>(h);
        hp.alibi = !p.terms->alibi_slopes.empty();
        if (hp.alibi) hp.alibi_slope = static_cast<Scalar>(p.terms->alibi_slopes[hi]);
        hp.has_sink = !p.terms->sinks.empty();
        if (hp.has_sink) hp.sink = static_cast<Scalar>(p.terms->sinks[hi]);
    }
    return hp;  // soft-capping is applied by the backward itself, which keeps its slope
}

/// −Σ_i W_sink,i · Σ_j W_ji·dW_ji over the columns of one head: the gradient of its sink logit,
/// from the masked scores S (Lk × Lq, −∞ at excluded keys), the weights W and their gradient dW.
template <class Scalar>
Scalar sink_gradient(const matrix<Scalar>& s, const matrix<Scalar>& w, const matrix<Scalar>& dw,
                     Scalar sink) {
    const Scalar minus_inf = -std::numeric_limits<Scalar>::infinity();
    Scalar total(0);
    for (Index i = 0; i < s.cols(); ++i) {
        Scalar m = sink, dot(0);
        for (Index j = 0; j < s.rows(); ++j)
            if (s(j, i) != minus_inf) m = nan_propagating_max(m, s(j, i));
        Scalar sum = std::exp(sink - m);
        for (Index j = 0; j < s.rows(); ++j)
            if (s(j, i) != minus_inf) {
                sum += std::exp(s(j, i) - m);
                dot += w(j, i) * dw(j, i);
            }
        total -= std::exp(sink - m) / sum * dot;
    }
    return total;
}

/// The backward pass of one (sequence b, key/value head g) task; see the top of this file.
template <class Scalar>
void backward_task(const attention_problem<Scalar>& p, const const_matrix_ref<Scalar>& d_out,
                   Index b, Index g, const mask_views<Scalar>& masks,
                   backward_outputs<Scalar>& outputs, backward_thread_state<Scalar>& ts) {
    using const_view = Eigen::Map<const matrix<Scalar>, 0, Eigen::OuterStride<>>;
    using view = Eigen::Map<matrix<Scalar>, 0, Eigen::OuterStride<>>;
    const head_layout& heads = p.heads;
    const Index lq = p.batch.query_length(b), lk = p.batch.key_length(b);
    const Index q0 = p.batch.query_offset(b), k0 = p.batch.key_offset(b);
    const Index dk = heads.dk, dv = heads.dv;
    const Index group = heads.num_heads / heads.num_kv_heads;
    if (lq == 0 || lk == 0) return;  // no query, or no key: every gradient stays 0
    const const_view k(p.k.data() + k0 * p.k.outerStride() + g * dk, dk, lk,
                       Eigen::OuterStride<>(p.k.outerStride()));
    const const_view v(p.v.data() + k0 * p.v.outerStride() + g * dv, dv, lk,
                       Eigen::OuterStride<>(p.v.outerStride()));
    view dk_g(outputs.dk.data() + k0 * outputs.dk.outerStride() + g * dk, dk, lk,
              Eigen::OuterStride<>(outputs.dk.outerStride()));
    view dv_g(outputs.dv.data() + k0 * outputs.dv.outerStride() + g * dv, dv, lk,
              Eigen::OuterStride<>(outputs.dv.outerStride()));
    ts.scores.resize(lk, lq);
    ts.d_weights.resize(lk, lq);
    for (Index h = g * group; h < (g + 1) * group; ++h) {
        const mask_view<Scalar>& mask = masks(b, h);
        const const_view q(p.q.data() + q0 * p.q.outerStride() + h * dk, dk, lq,
                           Eigen::OuterStride<>(p.q.outerStride()));
        const const_view d_o(d_out.data() + q0 * d_out.outerStride() + h * dv, dv, lq,
                             Eigen::OuterStride<>(d_out.outerStride()));
        view dq_h(outputs.dq.data() + q0 * outputs.dq.outerStride() + h * dk, dk, lq,
                  Eigen::OuterStride<>(outputs.dq.outerStride()));
        // The forward's scores and weights, recomputed as the forward computes them.
        product_into(ts.scores, k.transpose(), q, p.scale, &ts.gemm, 1);  // Lk × Lq
        const head_problem<Scalar> terms = score_terms_of(p, b, h);
        const bool capped = p.terms != nullptr && p.terms->softcap.has_value();
        if (capped) {
            const auto c = static_cast<Scalar>(*p.terms->softcap);
            ts.cap_slope = (ts.scores.array() * (Scalar(1) / c)).tanh();  // tanh(R/c)
            ts.scores = c * ts.cap_slope.array();
            ts.cap_slope = Scalar(1) - ts.cap_slope.array().square();
        }
        if (terms.alibi)
            for (Index i = 0; i < lq; ++i)
                modify_query_column(terms, no_score_modifier{}, &ts.scores(0, i), i, 0, lk);
        const bool masked = !mask.is_unmasked();
        if (masked) apply_mask<Scalar>(mask, ts.scores);
        ts.weights = ts.scores;
        if (terms.has_sink)
            softmax_columns_with_sink(ts.weights, terms.sink);
        else
            normalize_columns(ts.weights, p.normalize);
        product_into(ts.d_weights, v.transpose(), d_o, Scalar(1), &ts.gemm, 1);  // Lk × Lq
        normalization_backward(ts.scores, ts.weights, ts.d_weights, p.normalize, ts.d_scores);
        if (terms.has_sink && outputs.d_sinks != nullptr)
            (*outputs.d_sinks)(h, b) =
                sink_gradient(ts.scores, ts.weights, ts.d_weights, terms.sink);
        // dS is the gradient of the scores as the bias and the mask see them; soft-capping sits
        // before them, so dQ and dK take it through the cap's slope.
        if (outputs.d_scores != nullptr)
            (*outputs.d_scores)[static_cast<std::size_t>(b * heads.num_heads + h)] = ts.d_scores;
        if (capped) ts.d_scores.array() *= ts.cap_slope.array();
        // dV_g += dO·Wᵀ and dK_g += scale·Q·dSᵀ, summed over the group's heads in order.
        ts.product.resize(dv, lk);
        product_into(ts.product, d_o, ts.weights.transpose(), Scalar(1), &ts.gemm, 1);
        dv_g += ts.product;
        ts.product.resize(dk, lk);
        product_into(ts.product, q, ts.d_scores.transpose(), p.scale, &ts.gemm, 1);
        dk_g += ts.product;
        product_into(dq_h, k, ts.d_scores, p.scale, &ts.gemm, 1);  // dk × Lq
        if (masked) {
            // K·dS lets 0·NaN from an excluded key column into dQ; such columns are recomputed
            // from the keys that take part alone (as the forward repairs its output).
            for (Index i = 0; i < lq; ++i) {
                if (dq_h.col(i).allFinite()) continue;
                dq_h.col(i).setZero();
                for (Index j = 0; j < lk; ++j)
                    if (ts.scores(j, i) != -std::numeric_limits<Scalar>::infinity())
                        dq_h.col(i) += (p.scale * ts.d_scores(j, i)) * k.col(j);
            }
        }
    }
}

/// The materialised backward pass over a validated problem (its `out` is not read). `outputs`
/// is sized and zeroed by the caller; `threads`: 0 for OpenMP's default.
template <class Scalar>
void materialized_backward(const attention_problem<Scalar>& p,
                           const const_matrix_ref<Scalar>& d_out, backward_outputs<Scalar>& outputs,
                           int threads) {
    mask_views<Scalar> masks;
    masks.build(p.mask, p.heads.num_heads, p.batch);
    const Index kv_heads = p.heads.num_kv_heads;
    std::vector<backward_thread_state<Scalar>> states;
    parallel_tasks(
        p.batch.size() * kv_heads, threads, states,
        // Each thread packs its products into its own buffers, kept for its next task.
        [](backward_thread_state<Scalar>& ts) {
            if (ts.gemm.empty()) ts.gemm.resize(1);
            return scoped_gemm_buffers<Scalar>(&ts.gemm.front());
        },
        [&](Index task, backward_thread_state<Scalar>& ts) {
            backward_task(p, d_out, task / kv_heads, task % kv_heads, masks, outputs, ts);
        });
}

}  // namespace detail
}  // namespace mha
