// SPDX-License-Identifier: MIT
/// @file
/// Scaled dot-product attention: the score and weighted-sum kernels, single-head attention on any
/// Q/K/V views, and the multi-head core over a packed batch. These entry points check their
/// arguments, then hand a validated problem to a kernel: detail/materialized.hpp (the reference)
/// or detail/tiled/ (the fast path for softmax).
///
/// Shapes (one column per token):
///   q : d_k × Lq      k : d_k × Lk      v : d_v × Lk
///   scores, weights : Lk × Lq (column i holds query i's view of every key)
///   out : d_v × Lq
///
/// Order inside the scores: scale → soft-capping → ALiBi → score modifier → additive bias → mask →
/// normalise, with attention sinks in the softmax normaliser (docs/score_modifiers.md). Masks are
/// applied by selection (an excluded score becomes −∞ whatever K held, so NaN in excluded keys
/// never leaks). A query with no key to attend to gets output 0 and weights 0.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <mha/attention_bf16.hpp>
#include <mha/batch.hpp>
#include <mha/core.hpp>
#include <mha/detail/call_checks.hpp>
#include <mha/detail/gemm.hpp>
#include <mha/detail/head_problem.hpp>
#include <mha/detail/materialized.hpp>
#include <mha/detail/score_terms.hpp>
#include <mha/detail/tiled/forward.hpp>
#include <mha/mask.hpp>
#include <mha/normalization.hpp>
#include <mha/options.hpp>
#include <mha/score_modifiers.hpp>

namespace mha {

/// scores = scale · kᵀ·q   (Lk × Lq).
template <class DK, class DQ, class DS>
void attention_scores(const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DQ>& q,
                      typename DQ::Scalar scale, const Eigen::MatrixBase<DS>& scores_) {
    static_assert(detail::is_supported_scalar_v<typename DQ::Scalar>,
                  "mha: scores must be float, double or long double; integer scores would be "
                  "truncated");
    static_assert(
        detail::same_scalars_v<typename DQ::Scalar, typename DK::Scalar, typename DS::Scalar>,
        "mha: every matrix of one call must have the same scalar type (all float or all double); "
        "convert with .template cast<T>()");
    constexpr const char* where = "mha::attention_scores";
    auto& scores = const_cast<Eigen::MatrixBase<DS>&>(scores_);
    detail::check_size(where, "k.rows()", q.rows(), k.rows(), "q.rows(), the key width d_k");
    detail::check_size(where, "scores.rows()", k.cols(), scores.rows(), "k.cols()");
    detail::check_size(where, "scores.cols()", q.cols(), scores.cols(), "q.cols()");
    scores.noalias() = scale * (k.transpose() * q);
}

/// out = v · weights   (d_v × Lq): each query's weighted sum of the value columns.
template <class DV, class DW, class DO>
void weighted_sum_of_values(const Eigen::MatrixBase<DV>& v, const Eigen::MatrixBase<DW>& weights,
                            const Eigen::MatrixBase<DO>& out_) {
    static_assert(
        detail::same_scalars_v<typename DV::Scalar, typename DW::Scalar, typename DO::Scalar>,
        "mha: every matrix of one call must have the same scalar type (all float or all double); "
        "convert with .template cast<T>()");
    constexpr const char* where = "mha::weighted_sum_of_values";
    auto& out = const_cast<Eigen::MatrixBase<DO>&>(out_);
    detail::check_size(where, "weights.rows()", v.cols(), weights.rows(), "v.cols()");
    detail::check_size(where, "out.rows()", v.rows(), out.rows(), "v.rows()");
    detail::check_size(where, "out.cols()", weights.cols(), out.cols(), "weights.cols()");
    out.noalias() = v * weights;
}

namespace detail {

/// Whether a call runs the tiled kernel: softmax, unless the materialised one is asked for.
inline bool uses_tiled_kernel(normalization normalize, attention_algorithm algorithm) {
    return normalize == normalization::softmax && algorithm != attention_algorithm::materialized;
}

/// Refuses an output that shares memory with an input: the kernels write each query block's
/// output while other blocks and heads still read Q, K and V. Inputs that Eigen had to copy into
/// a temporary (and an output written through one) cannot overlap and pass.
template <class Scalar>
void check_output_apart(const char* where, const attention_problem<Scalar>& p) {
    check_no_overlap(where, "out", p.out, "q", p.q);
    check_no_overlap(where, "out", p.out, "k", p.k);
    check_no_overlap(where, "out", p.out, "v", p.v);
}

/// The buffers of an attention call, kept for the next call: with the shapes of an earlier call
/// on the same workspace, and without weights, a call allocates nothing.
template <class Scalar>
struct attention_workspace {
    tiled_workspace<Scalar> tiled;
    materialized_workspace<Scalar> materialized;
    std::vector<gemm_buffers<Scalar>> gemm;  // GEMM packing, one per thread (see product_into)
};

/// Sizes what `p.request` asks for in `outputs`: zero weights (the kernels write or add only
/// the blocks they visit) and a log-sum-exp matrix that every kernel fills.
template <class Scalar>
void size_outputs(const attention_problem<Scalar>& p, attention_outputs<Scalar>& outputs) {
    const packed_batch& batch = p.batch;
    outputs.weights.clear();
    if (p.request.weights != weights_mode::none)
        for (Index b = 0; b < batch.size(); ++b) {
            const Index copies =
                p.request.weights == weights_mode::per_head ? p.heads.num_heads : 1;
            for (Index h = 0; h < copies; ++h)
                outputs.weights.push_back(
                    matrix<Scalar>::Zero(batch.key_length(b), batch.query_length(b)));
        }
    if (p.request.log_sum_exp)
        outputs.log_sum_exp.setConstant(p.heads.num_heads, p.q.cols(),
                                        std::numeric_limits<Scalar>::quiet_NaN());
    else
        outputs.log_sum_exp.resize(0, 0);
}

/// Runs the kernel the options select on a validated problem. `workspace`: the buffers of the
/// call, kept for the next one; null: the call's own. `mod`: the caller's score modifier.
template <class Scalar, class Mod = no_score_modifier>
attention_outputs<Scalar> attend(const attention_problem<Scalar>& p, attention_algorithm algorithm,
                                 attention_workspace<Scalar>* workspace, const Mod& mod = Mod{}) {
    attention_outputs<Scalar> outputs;
    size_outputs(p, outputs);
    if (uses_tiled_kernel(p.normalize, algorithm)) {
        tiled_attention(p, outputs, tiled_settings{},
                        workspace != nullptr ? &workspace->tiled : nullptr, mod);
        return outputs;
    }
    materialized_workspace<Scalar> local;
    // Packing buffers even for a call without a workspace: the products then run the GEMM kernel
    // with the blocking of one serial product on any thread count (detail/gemm.hpp). Eigen's own
    // OpenMP product chooses its k-blocks by the thread count, and with 2 threads its results
    // differed from 1 thread's (double, AVX2, L = 2053 keys: tests/test_grouped_heads.cpp).
    std::vector<gemm_buffers<Scalar>> local_gemm;
    materialized_attention(p, outputs, workspace != nullptr ? workspace->materialized : local,
                           workspace != nullptr ? &workspace->gemm : &local_gemm, mod);
    return outputs;
}

}  // namespace detail

/// The buffers of `multi_head_attention_core`, kept between calls: pass the same workspace to
/// repeated calls and, once a call has run with given shapes (and thread count), later calls
/// with those shapes and without weights allocate nothing. It only grows. One workspace serves
/// one call at a time: one per thread. The layer keeps its own (forward_workspace).
template <class Scalar>
struct core_workspace {
    detail::attention_workspace<Scalar> internal;  ///< the kernels' buffers; internal
};

/// Single-head attention on any Q/K/V views (see the shapes at the top of this header), into
/// `out` (d_v × Lq). Returns what `request` asks for besides: the weights (one Lk × Lq matrix
/// for either weights mode) and each query's log-sum-exp (1 × Lq). `out` must not share an
/// element with q, k or v (value_error; disjoint row blocks of one matrix are fine).
template <class DQ, class DK, class DV, class DO>
attention_outputs<typename DQ::Scalar> scaled_dot_product_attention(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
    const Eigen::MatrixBase<DO>& out_, const attention_mask<typename DQ::Scalar>& mask = {},
    const attention_options& options = {}, const attention_request& request = {}) {
    using Scalar = typename DQ::Scalar;
    static_assert(detail::is_supported_scalar_v<Scalar>, "mha: Scalar must be float or double");
    static_assert(detail::same_scalars_v<Scalar, typename DK::Scalar, typename DV::Scalar,
                                         typename DO::Scalar>,
                  "mha: every matrix of one call must have the same scalar type (all float or all "
                  "double); convert with .template cast<T>()");
    constexpr const char* where = "mha::scaled_dot_product_attention";
    auto& out = const_cast<Eigen::MatrixBase<DO>&>(out_);
    detail::check_size(where, "k.rows()", q.rows(), k.rows(), "q.rows(), the key width d_k");
    detail::check_size(where, "v.cols()", k.cols(), v.cols(), "k.cols(), the number of keys");
    detail::check_size(where, "out.rows()", v.rows(), out.rows(), "v.rows(), the value width");
    detail::check_size(where, "out.cols()", q.cols(), out.cols(),
                       "q.cols(), the number of queries");
    const Scalar scale = detail::resolve_scale<Scalar>(where, options, q.rows());
    detail::check_request(where, options, request);
    detail::check_score_terms(where, options, 1);
    mask.validate(where, 1, {q.cols()}, {k.cols()});
    const packed_batch batch = packed_batch::single(q.cols(), k.cols());
    attention_outputs<Scalar> outputs;
    detail::with_matrix_ref<Scalar>(out, [&](detail::matrix_ref<Scalar> o) {
        const detail::attention_problem<Scalar> problem{q,
                                                        k,
                                                        v,
                                                        o,
                                                        {1, 1, q.rows(), v.rows()},
                                                        batch,
                                                        mask,
                                                        scale,
                                                        options.normalize,
                                                        request,
                                                        nullptr,
                                                        &options};
        detail::check_output_apart(where, problem);
        outputs = detail::attend(problem, options.algorithm,
                                 static_cast<detail::attention_workspace<Scalar>*>(nullptr));
    });
    return outputs;
}

/// Returns the single-head attention output (d_v × Lq).
template <class DQ, class DK, class DV>
matrix<typename DQ::Scalar> scaled_dot_product_attention(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
    const attention_mask<typename DQ::Scalar>& mask = {}, const attention_options& options = {}) {
    matrix<typename DQ::Scalar> out(v.rows(), q.cols());
    scaled_dot_product_attention(q, k, v, out, mask, options);
    return out;
}

namespace detail {

/// multi_head_attention_core with the buffers of `workspace` (null: the call's own).
template <class DQ, class DK, class DV, class DO, class Mod>
attention_outputs<typename DQ::Scalar> multi_head_attention_core_with(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
    Index num_heads, Index num_kv_heads, const packed_batch& batch,
    const Eigen::MatrixBase<DO>& out_, const attention_mask<typename DQ::Scalar>& mask,
    const attention_options& options, const attention_request& request,
    attention_workspace<typename DQ::Scalar>* workspace, const Mod& modifier) {
    using Scalar = typename DQ::Scalar;
    static_assert(is_supported_scalar_v<Scalar>, "mha: Scalar must be float or double");
    static_assert(
        same_scalars_v<Scalar, typename DK::Scalar, typename DV::Scalar, typename DO::Scalar>,
        "mha: every matrix of one call must have the same scalar type (all float or all "
        "double); convert with .template cast<T>()");
    constexpr const char* where = "mha::multi_head_attention_core";
    auto& out = const_cast<Eigen::MatrixBase<DO>&>(out_);
    const auto checked =
        check_core_call(where, num_heads, num_kv_heads, batch, q, k, v, "out", out, mask, options);
    const head_layout heads = checked.heads;
    const Scalar scale = checked.scale;
    check_request(where, options, request);
    attention_outputs<Scalar> outputs;
    with_matrix_ref<Scalar>(out, [&](matrix_ref<Scalar> o) {
        const attention_problem<Scalar> problem{
            q, k, v, o, heads, batch, mask, scale, options.normalize, request, nullptr, &options};
        check_output_apart(where, problem);
        outputs = attend(problem, options.algorithm, workspace, modifier);
    });
    return outputs;
}

}  // namespace detail

/// The multi-head attention core over a packed batch, on already projected Q, K and V, with
/// `num_kv_heads` key/value heads shared by groups of num_heads / num_kv_heads query heads
/// (grouped-query attention; multi-query with one key/value head):
///   q : (H·d_k) × Nq,  k : (H_kv·d_k) × Nk,  v : (H_kv·d_v) × Nk,  out : (H·d_v) × Nq
/// with Nq and Nk the batch's total query and key counts. Query head h of sequence b attends
/// with rows [h·d_k, (h+1)·d_k) of Q and rows [g·d_k, (g+1)·d_k) of K, [g·d_v, (g+1)·d_v) of V,
/// g = h / (H / H_kv), in the columns of sequence b only: K and V are read in place, never
/// repeated. Masks and weights are per query head. Returns what `request` asks for besides the
/// output (see attention_outputs). `out` must not share an element with q, k or v (value_error;
/// disjoint row blocks of one matrix, as in a fused QKV buffer, are fine). `modifier`, when
/// given (make_score_modifier), changes each score in the kernels, compiled in with the call.
template <class DQ, class DK, class DV, class DO, class Mod = detail::no_score_modifier,
          std::enable_if_t<!detail::is_bfloat16_v<typename DQ::Scalar>, int> = 0>
attention_outputs<typename DQ::Scalar> multi_head_attention_core(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
    Index num_heads, Index num_kv_heads, const packed_batch& batch,
    const Eigen::MatrixBase<DO>& out, const attention_mask<typename DQ::Scalar>& mask = {},
    const attention_options& options = {}, const attention_request& request = {},
    const Mod& modifier = Mod{}) {
    return detail::multi_head_attention_core_with(
        q, k, v, num_heads, num_kv_heads, batch, out, mask, options, request,
        static_cast<detail::attention_workspace<typename DQ::Scalar>*>(nullptr), modifier);
}

/// The multi-head attention core (see the overload above) with the buffers of `workspace`,
/// kept for the next call: repeated calls of one shape allocate nothing after the first
/// (without weights).
template <class DQ, class DK, class DV, class DO, class Mod = detail::no_score_modifier,
          std::enable_if_t<!detail::is_bfloat16_v<typename DQ::Scalar>, int> = 0>
attention_outputs<typename DQ::Scalar> multi_head_attention_core(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
    Index num_heads, Index num_kv_heads, const packed_batch& batch,
    const Eigen::MatrixBase<DO>& out, const attention_mask<typename DQ::Scalar>& mask,
    const attention_options& options, const attention_request& request,
    core_workspace<typename DQ::Scalar>& workspace, const Mod& modifier = Mod{}) {
    return detail::multi_head_attention_core_with(q, k, v, num_heads, num_kv_heads, batch, out,
                                                  mask, options, request, &workspace.internal,
                                                  modifier);
}
/// The multi-head attention core with as many key/value heads as query heads:
///   q : (H·d_k) × Nq,  k : (H·d_k) × Nk,  v : (H·d_v) × Nk,  out : (H·d_v) × Nq
/// Head h of sequence b attends with rows [h·d_k, (h+1)·d_k) of the columns of sequence b only.
template <class DQ, class DK, class DV, class DO,
          std::enable_if_t<!detail::is_bfloat16_v<typename DQ::Scalar>, int> = 0>
attention_outputs<typename DQ::Scalar> multi_head_attention_core(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
    Index num_heads, const packed_batch& batch, const Eigen::MatrixBase<DO>& out_,
    const attention_mask<typename DQ::Scalar>& mask = {}, const attention_options& options = {},
    const attention_request& request = {}) {
    return multi_head_attention_core(q, k, v, num_heads, num_heads, batch, out_, mask, options,
                                     request);
}

}  // namespace mha

#if defined(MHA_EXTERN_TEMPLATES)
// Every attention call, of the kernels' entry points and of the layer, reaches the kernels
// through detail::attend: declared here, defined once by src/mha_instantiate.cpp, they are not
// compiled again in each translation unit (see MHA_EXTERN_TEMPLATES in mha/core.hpp).
extern template mha::attention_outputs<float>
mha::detail::attend<float, mha::detail::no_score_modifier>(
    const mha::detail::attention_problem<float>&, mha::attention_algorithm,
    mha::detail::attention_workspace<float>*, const mha::detail::no_score_modifier&);
extern template mha::attention_outputs<double>
mha::detail::attend<double, mha::detail::no_score_modifier>(
    const mha::detail::attention_problem<double>&, mha::attention_algorithm,
    mha::detail::attention_workspace<double>*, const mha::detail::no_score_modifier&);
#endif
