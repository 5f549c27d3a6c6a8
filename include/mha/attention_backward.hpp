// SPDX-License-Identifier: MIT
// The backward pass of the multi-head attention core: given the forward's inputs and the
// gradient of a loss with respect to its output, the gradients with respect to Q, K, V and the
// scores (hence any additive bias). Layout as in attention.hpp's multi_head_attention_core:
//   q : (H·d_k) × Nq,  k : (H_kv·d_k) × Nk,  v : (H_kv·d_v) × Nk,  d_out : (H·d_v) × Nq
// Softmax goes through the tiled backward (detail/tiled/backward.hpp) unless
// `options.algorithm` is `materialized` or score gradients are asked for: it recomputes the
// weights block by block from the forward's per-query log-sum-exp (given, or recomputed by a
// tiled forward) and holds no Lk × Lq matrix. ReLU and sigmoid, soft-capping, ALiBi and sinks,
// and the cases above, go through
// the materialised backward (detail/materialized_backward.hpp), which recomputes the scores and
// weights of one (sequence, head) at a time and holds 4 · Lk × Lq scalars per thread.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include <mha/attention.hpp>
#include <mha/batch.hpp>
#include <mha/core.hpp>
#include <mha/detail/check.hpp>
#include <mha/detail/head_problem.hpp>
#include <mha/detail/materialized_backward.hpp>
#include <mha/detail/tiled/backward.hpp>
#include <mha/mask.hpp>
#include <mha/options.hpp>

namespace mha {

/// What a backward call computes besides dQ, dK and dV, and on how many threads.
struct backward_request {
    /// Keep each (sequence, head)'s gradient with respect to its masked scores
    /// (`attention_gradients::d_scores`), which is the gradient of an additive bias. These are
    /// Lk × Lq matrices, so the call then runs the materialised backward.
    bool score_gradients = false;
    /// 0: OpenMP's default (omp_get_max_threads()); ignored without OpenMP. The results do not
    /// depend on it, bit for bit.
    int threads = 0;
};

/// The gradients of a loss with respect to the inputs of the attention core.
template <class Scalar>
struct attention_gradients {
    matrix<Scalar> dq;  ///< (H·d_k) × Nq, like q
    matrix<Scalar> dk;  ///< (H_kv·d_k) × Nk, like k: a key/value head sums over its query heads
    matrix<Scalar> dv;  ///< (H_kv·d_v) × Nk, like v
    /// When `backward_request::score_gradients`: B·H matrices, sequence b and head h at index
    /// b·H + h, each Lk × Lq of its sequence: ∂loss/∂(scale·kᵀq + bias) per (key, query), 0 at
    /// excluded keys. For an additive bias given as one matrix per (sequence, head) this is its
    /// gradient; for a shared one, sum it with `additive_bias_gradient`. Else empty.
    std::vector<matrix<Scalar>> d_scores;
    /// With `attention_options::sinks`: H values, ∂loss/∂sinks[h] summed over the batch's
    /// sequences in order. Else empty.
    std::vector<Scalar> d_sinks;
};

/// What the forward pass returned that the tiled backward reuses (see
/// `multi_head_attention_core_backward`). Pointers to matrices the caller keeps alive during the
/// call; both null, or both set.
template <class Scalar>
struct attention_forward_results {
    /// (H·d_v) × Nq: the forward's output for these inputs and mask.
    const matrix<Scalar>* output = nullptr;
    /// H × Nq: the forward's `attention_outputs::log_sum_exp` (asked for with
    /// `attention_request::log_sum_exp`).
    const matrix<Scalar>* log_sum_exp = nullptr;
};

namespace detail {

/// The backward pass behind both public overloads; `forward` may be null.
template <class DQ, class DK, class DV, class DG>
attention_gradients<typename DQ::Scalar> core_backward(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
    Index num_heads, Index num_kv_heads, const packed_batch& batch,
    const Eigen::MatrixBase<DG>& d_out,
    const attention_forward_results<typename DQ::Scalar>* forward,
    const attention_mask<typename DQ::Scalar>& mask, const attention_options& options,
    const backward_request& request) {
    using Scalar = typename DQ::Scalar;
    static_assert(detail::is_supported_scalar_v<Scalar>, "mha: Scalar must be float or double");
    static_assert(detail::same_scalars_v<Scalar, typename DK::Scalar, typename DV::Scalar,
                                         typename DG::Scalar>,
                  "mha: every matrix of one call must have the same scalar type (all float or all "
                  "double); convert with .template cast<T>()");
    constexpr const char* where = "mha::multi_head_attention_core_backward";
    const auto checked = detail::check_core_call(where, num_heads, num_kv_heads, batch, q, k, v,
                                                 "d_out", d_out, mask, options);
    const detail::head_layout heads = checked.heads;
    const Scalar scale = checked.scale;

    if (forward != nullptr) {
        if ((forward->output == nullptr) != (forward->log_sum_exp == nullptr))
            detail::fail<value_error>(where, "forward", "both matrices set, or neither",
                                      "one of them");
        if (forward->output != nullptr) {
            detail::check_size(where, "forward.output->rows()", d_out.rows(),
                               forward->output->rows(), "d_out.rows()");
            detail::check_size(where, "forward.output->cols()", q.cols(), forward->output->cols(),
                               "q.cols()");
            detail::check_size(where, "forward.log_sum_exp->rows()", num_heads,
                               forward->log_sum_exp->rows(), "num_heads");
            detail::check_size(where, "forward.log_sum_exp->cols()", q.cols(),
                               forward->log_sum_exp->cols(), "q.cols()");
        }
    }

    attention_gradients<Scalar> grads;
    grads.dq.setZero(q.rows(), q.cols());
    grads.dk.setZero(k.rows(), k.cols());
    grads.dv.setZero(v.rows(), v.cols());
    if (request.score_gradients)
        for (Index b = 0; b < batch.size(); ++b)
            for (Index h = 0; h < num_heads; ++h)
                grads.d_scores.push_back(
                    matrix<Scalar>::Zero(batch.key_length(b), batch.query_length(b)));
    // The kernel reads the inputs through views of inner stride 1; others are copied once.
    const detail::const_matrix_ref<Scalar> q_ref(q), k_ref(k), v_ref(v), d_out_ref(d_out);
    matrix<Scalar> unused_out(0, 0);
    const detail::attention_problem<Scalar> problem{q_ref,
                                                    k_ref,
                                                    v_ref,
                                                    detail::matrix_ref<Scalar>(unused_out),
                                                    heads,
                                                    batch,
                                                    mask,
                                                    scale,
                                                    options.normalize,
                                                    attention_request{},
                                                    nullptr,
                                                    &options};
    // The tiled backward has no score terms yet: they run the materialised one.
    const bool terms = options.softcap || !options.alibi_slopes.empty() || !options.sinks.empty();
    if (uses_tiled_kernel(options.normalize, options.algorithm) && !request.score_gradients &&
        !terms) {
        matrix<Scalar> own_out, own_lse;
        const matrix<Scalar>* out = forward != nullptr ? forward->output : nullptr;
        const matrix<Scalar>* lse = forward != nullptr ? forward->log_sum_exp : nullptr;
        if (out == nullptr || lse == nullptr) {
            // Nothing saved: the tiled forward recomputes the output and log-sum-exp.
            own_out.setZero(d_out.rows(), d_out.cols());
            attention_request want_lse;
            want_lse.log_sum_exp = true;
            const attention_problem<Scalar> fp{
                q_ref,  k_ref, v_ref, matrix_ref<Scalar>(own_out), heads,
                batch,  mask,  scale, options.normalize,           want_lse,
                nullptr};
            attention_outputs<Scalar> fo;
            size_outputs(fp, fo);
            tiled_settings settings;
            settings.threads = request.threads;
            tiled_attention(fp, fo, settings);
            own_lse = std::move(fo.log_sum_exp);
            out = &own_out;
            lse = &own_lse;
        }
        tiled_backward_settings settings;
        settings.threads = request.threads;
        const tiled_backward_io<Scalar> io{const_matrix_ref<Scalar>(*out),
                                           const_matrix_ref<Scalar>(*lse),
                                           d_out_ref,
                                           grads.dq,
                                           grads.dk,
                                           grads.dv};
        tiled_backward(problem, io, settings);
        return grads;
    }
    matrix<Scalar> d_sink_shares;  // H × B
    if (!options.sinks.empty()) d_sink_shares.setZero(num_heads, batch.size());
    backward_outputs<Scalar> outputs{grads.dq, grads.dk, grads.dv,
                                     request.score_gradients ? &grads.d_scores : nullptr,
                                     options.sinks.empty() ? nullptr : &d_sink_shares};
    materialized_backward(problem, d_out_ref, outputs, request.threads);
    // Each task wrote its own (head, sequence) share; the sum runs over sequences in order.
    for (Index h = 0; h < d_sink_shares.rows(); ++h) {
        Scalar sum(0);
        for (Index b = 0; b < d_sink_shares.cols(); ++b)
            sum += d_sink_shares(h, b);
        grads.d_sinks.push_back(sum);
    }
    return grads;
}

}  // namespace detail

/// The gradients of the multi-head attention core (see the layout at the top of this header)
/// for the same arguments as `multi_head_attention_core` and `d_out`, the gradient of the loss
/// with respect to its output. Softmax, ReLU and sigmoid normalisation, every mask, packed
/// batches, Lq ≠ Lk, d_k ≠ d_v and grouped heads; soft-capping, ALiBi and sinks (the sinks'
/// gradient in `attention_gradients::d_sinks`), which run the materialised backward.
/// `options.algorithm` chooses the kernel as for the forward: softmax runs the tiled backward
/// (memory linear in L) unless it is `materialized` or `request.score_gradients` is set; without
/// the forward's results this overload recomputes them with a tiled forward first. A query with no
/// key to attend to gets dQ = 0 and contributes nothing to dK and dV; an excluded key gets nothing
/// from the queries that exclude it. The results are the same bit for bit on every thread count.
template <class DQ, class DK, class DV, class DG>
attention_gradients<typename DQ::Scalar> multi_head_attention_core_backward(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
    Index num_heads, Index num_kv_heads, const packed_batch& batch,
    const Eigen::MatrixBase<DG>& d_out, const attention_mask<typename DQ::Scalar>& mask = {},
    const attention_options& options = {}, const backward_request& request = {}) {
    return detail::core_backward(
        q, k, v, num_heads, num_kv_heads, batch, d_out,
        static_cast<const attention_forward_results<typename DQ::Scalar>*>(nullptr), mask, options,
        request);
}

/// As above, reusing the forward's output and log-sum-exp (`forward`, from a
/// `multi_head_attention_core` call on the same inputs, mask and options with
/// `attention_request::log_sum_exp`), so that the tiled backward needs no forward of its own.
/// The materialised backward does not read them.
template <class DQ, class DK, class DV, class DG>
attention_gradients<typename DQ::Scalar> multi_head_attention_core_backward(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
    Index num_heads, Index num_kv_heads, const packed_batch& batch,
    const Eigen::MatrixBase<DG>& d_out,
    const attention_forward_results<typename DQ::Scalar>& forward,
    const attention_mask<typename DQ::Scalar>& mask = {}, const attention_options& options = {},
    const backward_request& request = {}) {
    return detail::core_backward(q, k, v, num_heads, num_kv_heads, batch, d_out, &forward, mask,
                                 options, request);
}

/// The backward pass with as many key/value heads as query heads.
template <class DQ, class DK, class DV, class DG>
attention_gradients<typename DQ::Scalar> multi_head_attention_core_backward(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
    Index num_heads, const packed_batch& batch, const Eigen::MatrixBase<DG>& d_out,
    const attention_mask<typename DQ::Scalar>& mask = {}, const attention_options& options = {},
    const backward_request& request = {}) {
    return multi_head_attention_core_backward(q, k, v, num_heads, num_heads, batch, d_out, mask,
                                              options, request);
}

/// The gradient of an additive bias given as `count` matrices (1: shared by every sequence and
/// head; B: one per sequence; B·H: one per sequence and head, as in `additive_bias`), from the
/// per-(sequence, head) score gradients of a backward call with `num_heads` heads. A shared
/// matrix's gradient sums its uses in index order.
template <class Scalar>
std::vector<matrix<Scalar>> additive_bias_gradient(const std::vector<matrix<Scalar>>& d_scores,
                                                   Index count, Index num_sequences,
                                                   Index num_heads) {
    constexpr const char* where = "mha::additive_bias_gradient";
    detail::check_size(where, "d_scores.size()", num_sequences * num_heads,
                       static_cast<Index>(d_scores.size()), "num_sequences · num_heads");
    if (count != 1 && count != num_sequences && count != num_sequences * num_heads)
        detail::fail<shape_error>(where, "count",
                                  "1, " + std::to_string(num_sequences) + " (sequences) or " +
                                      std::to_string(num_sequences * num_heads) +
                                      " (sequences x heads)",
                                  count);
    if (count == num_sequences * num_heads) return d_scores;
    std::vector<matrix<Scalar>> result(static_cast<std::size_t>(count));
    for (Index b = 0; b < num_sequences; ++b)
        for (Index h = 0; h < num_heads; ++h) {
            const auto& g = d_scores[static_cast<std::size_t>(b * num_heads + h)];
            auto& r = result[static_cast<std::size_t>(count == 1 ? 0 : b)];
            if (h == 0 && (count != 1 || b == 0))
                r = g;
            else
                r += g;
        }
    return result;
}

}  // namespace mha
